"""Uniform prompt sampling against a curriculum, several seeds each, at the same compute.

    python scripts/curriculum_experiment.py --model CKPT_DIR --train train.jsonl --val val.jsonl \\
        --seeds 3 --steps 200 --out runs/curriculum [any scripts/grpo.py option: --group-size 8 ...]

Options of this script (all others go to GRPOConfig, see below):
    --seeds K               runs per arm, with seeds 0 .. K-1 (default 3)
    --out DIR               experiment directory: DIR/<arm>/seed<k>/ and DIR/results.md
    --temperature-step DT   curriculum temperature rise per stage (default 0.1)
    --mix-previous F        curriculum share of earlier-stage prompts (default 0.2)
    --estimate-k K          samples per prompt for the difficulty pre-pass (default 4)

Arms, with the same steps, prompts per step and group size, so the same number of rollouts:
    uniform      the loop's default sampler (a seeded shuffle per epoch) and temperature
    curriculum   three stages over the difficulty distribution, easy -> hard (quantiles 0-0.5,
                 0.25-0.75, 0.5-1 over thirds of the run), learnability weighting p(1 - p),
                 mix_previous of earlier-stage prompts, temperature T, T + DT, T + 2 DT

Difficulty is the records' "difficulty" field; when some record has none, a pass-rate pre-pass
with the starting model supplies it (cached in DIR/pass_rates.json, and also the curriculum's
starting pass-rate estimates). Its rollouts are extra compute for the curriculum arm and are
reported as such. With dynamic_sampling "refill" the arms may sample different numbers of groups;
results.md shows the groups each arm sampled.

results.md: final held-out accuracy (mean +- std over seeds), the fraction of zero-variance
groups over training, and accuracy per difficulty level; each run also gets per_difficulty.md.
"""

import argparse
import dataclasses
import statistics
from collections import Counter
from pathlib import Path

from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.plumbing.config import main_guard, parse_config
from nanopost.tools.difficulty import (estimate_pass_rates, load_pass_rates, per_difficulty_table, save_pass_rates,
                                       write_report_table)
from nanopost.data import tokenize_prompt
from nanopost.plumbing.data_files import load_rl
from nanopost.plumbing.metrics import read_metrics
from nanopost.prompts import PromptTemplate
from nanopost.rewards import accuracy_reward
from nanopost.grpo_loop import GRPOConfig, make_sampler, train_grpo
from nanopost.tools.monitor import LiveMonitor
from nanopost.plumbing.runtime import pick_device

ARMS = ("uniform", "curriculum")


def curriculum_stages(temperature: float, step: float) -> list[dict]:
    """The curriculum arm's --curriculum-stages."""
    return [{"until": 1 / 3, "quantiles": [0.0, 0.5], "temperature": temperature},
            {"until": 2 / 3, "quantiles": [0.25, 0.75], "temperature": temperature + step},
            {"until": 1.0, "quantiles": [0.5, 1.0], "temperature": temperature + 2 * step}]


def pass_rate_prepass(cfg: GRPOConfig, records: list[dict], k: int, cache: Path) -> dict[str, float] | None:
    """Pass rates of the starting model, only when some record lacks a difficulty."""
    if all(r.get("difficulty") is not None for r in records):
        return None
    if cache.is_file():
        return load_pass_rates(cache)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=pick_device(cfg.device))
    template = PromptTemplate(instruction=cfg.instruction, system=cfg.system, reasoning=cfg.reasoning)
    if cfg.task:
        from nanopost.tasks import get_task

        check = get_task(cfg.task).check
    else:
        def check(text: str, record: dict) -> float:
            return accuracy_reward(text, record["answer"])
    def render(record: dict) -> list[int]:
        return tokenize_prompt(tokenizer, template.messages(record["prompt"]))

    rates = estimate_pass_rates(model, tokenizer, records, render, check, k=k, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, seed=cfg.seed)
    save_pass_rates(cache, rates)
    return rates


def summarize(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["kind"] == "train"]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    groups = sum(r["groups_sampled"] for r in train)
    zero = sum(r["zero_std_frac"] * r["groups_sampled"] for r in train) / max(groups, 1)
    levels = {k: v for k, v in final.items() if k.startswith("accuracy_level_")}
    return {"accuracy": final["accuracy"], "zero_std_frac": zero, "groups": groups, "levels": levels}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def write_results(path: Path, cfg: GRPOConfig, results: dict[str, list[dict]], counts: Counter,
                  prepass: int) -> None:
    lines = ["# Uniform vs curriculum sampling", "",
             f"model `{cfg.model}`, train `{cfg.train}`, val `{cfg.val}` ({sum(counts.values())} prompts); "
             f"{cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.group_size} samples per run.", ""]
    if prepass:
        lines += [f"The curriculum also used a difficulty pre-pass of {prepass} generations.", ""]
    lines += ["| arm | runs | final accuracy | zero-variance groups | groups sampled | accuracy per seed |",
              "|---|---:|---:|---:|---:|---|"]
    for arm, runs in results.items():
        per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in runs)
        lines.append(f"| {arm} | {len(runs)} | {mean_std([r['accuracy'] for r in runs])} | "
                     f"{mean_std([r['zero_std_frac'] for r in runs])} | "
                     f"{statistics.mean(r['groups'] for r in runs):.0f} | {per_seed} |")
    for arm, runs in results.items():
        mean_levels = {k: statistics.mean(r["levels"].get(k, 0.0) for r in runs) for k in runs[0]["levels"]}
        if mean_levels:
            lines += ["", f"## {arm}: accuracy per difficulty (mean over seeds)", "",
                      per_difficulty_table(mean_levels, counts).rstrip()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/curriculum_experiment")
    parser.add_argument("--temperature-step", type=float, default=0.1)
    parser.add_argument("--mix-previous", type=float, default=0.2)
    parser.add_argument("--estimate-k", type=int, default=4)
    args, rest = parser.parse_known_args()
    cfg = parse_config(GRPOConfig, rest, description=__doc__)
    if not cfg.val:
        raise ValueError("--val is required: the experiment compares held-out accuracy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_rl(cfg.train)
    counts = Counter(r["difficulty"] for r in load_rl(cfg.val)[: cfg.eval_samples])
    prior = pass_rate_prepass(cfg, records, args.estimate_k, out / "pass_rates.json")
    stages = curriculum_stages(cfg.temperature, args.temperature_step)

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        for arm in ARMS:
            run = dataclasses.replace(cfg, seed=seed, out=str(out / arm / f"seed{seed}"), curriculum="uniform",
                                      curriculum_stages=[])
            sampler = None
            if arm == "curriculum":
                # The schedule changes at the stage boundaries too, so the loop samples at the
                # stage temperature whether it reads the schedule or sampler.stage_settings.
                changes = [(s["until"], nxt["temperature"]) for s, nxt in zip(stages, stages[1:])]
                run = dataclasses.replace(run, temperature_schedule="stages", temperature_end=None,
                                          temperature_stages=changes, curriculum="learnability",
                                          curriculum_stages=stages, curriculum_mix_previous=args.mix_previous)
                sampler = make_sampler(run, records, pass_rates=prior)
            print(f"== {arm}, seed {seed} -> {run.out}")
            train_grpo(run, sampler=sampler, monitor=LiveMonitor)
            write_report_table(run.out, counts=counts)
            results[arm].append(summarize(Path(run.out)))
    write_results(out / "results.md", cfg, results, counts, len(records) * args.estimate_k if prior else 0)
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main_guard(main)
