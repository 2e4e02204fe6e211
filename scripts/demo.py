"""The end-to-end demo: base model -> SFT -> GRPO, with a control arm, on multi-step arithmetic.

Nothing can be downloaded, so the demo builds its own base: a digit-splitting byte-level BPE
tokenizer and a small Qwen2-style model pretrained from scratch on task text, saved as a normal
Hugging Face checkpoint and cached. Then:

    SFT      on chat-format examples of levels 1-6 in which, as in data mixing thinking and
             non-thinking answers, a minority work the problem out (<think> each operation digit by
             digit, then its equation </think> <answer> result </answer>) and the rest answer with
             an empty think block
    GRPO     from the SFT model, on all levels with accuracy + format + thinking rewards,
             a curriculum and a temperature schedule: it learns which of the two behaviours the
             SFT model imitates gets answers right
    control  SFT continued from the same SFT model on the same data, for a number of steps that
             takes about GRPO's wall time, so "GRPO helped" cannot mean "it just trained longer"

Each stage is evaluated on the same fixed held-out split (data/arithmetic/test.jsonl): greedy
accuracy with a 95% interval, avg@k, and accuracy per difficulty level; SFT and the control are
evaluated on it as they train too. Everything lands in out/demo/, with report.md as the summary
and story.png as the figure.

The pretraining text is worked digit by digit (tasks/arithmetic.py, work="columns"): a model
this small cannot add two-digit numbers in one go, but it can write one column at a time.

    python scripts/demo.py                 # the full demo, about 10 minutes on 2 CPU cores
    python scripts/demo.py --seeds 0,1,2   # once per seed, and a report over them (out/demo/report.md)
    python scripts/demo.py --toy           # the same pipeline at toy scale, seconds
    python scripts/demo.py --help          # every option
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanopost.data import tokenize_prompt
from nanopost.plumbing.data_files import load_rl
from nanopost.eval import EvalItem, evaluate
from nanopost.grpo_loop import GRPOConfig, train_grpo
from nanopost.model import ModelConfig, Transformer
from nanopost.plumbing.config import main_guard, parse_config, save_config
from nanopost.plumbing.hf_io import load_model, load_tokenizer, save_model
from nanopost.plumbing.metrics import read_metrics
from nanopost.plumbing.runtime import pick_device
from nanopost.plumbing.tokenizer import train_bpe
from nanopost.plumbing.training_checkpoint import checkpoint_path
from nanopost.prompts import PromptTemplate
from nanopost.rewards import sample_reward
from nanopost.sft_loop import SFTConfig, train_sft
from nanopost.tasks import get_task, write_jsonl
from nanopost.tools.monitor import LiveMonitor, diagnose, format_report
from nanopost.tools.plot import plot_runs

TEMPLATE = PromptTemplate(instruction="Solve it.")
PROJECT = Path(__file__).resolve().parent.parent


# Accuracy decides. Format and thinking are small bonuses: among wrong answers they favour the
# ones that work the problem out, and together they never outweigh one right answer. The thinking
# reward pays only true steps grounded in the question's numbers that end at the answer (here each
# operation's equation; its digit columns start from digits, not from the question's numbers, so
# they count as steps that are not paid), and free text earns nothing (arithmetic_weight 1).
REWARDS = {"accuracy": 1.0, "format": 0.1, "thinking": 0.1}
THINKING = {"arithmetic_weight": 1.0}

@dataclass
class DemoConfig:
    out: str = "out/demo"
    seed: int = 0
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "run the whole demo once per seed (each its own base, data and runs, in OUT/seed-N) and report "
                "over them in OUT/report.md; empty: --seed alone"})
    test_file: str = field(default=str(PROJECT / "data" / "arithmetic" / "test.jsonl"),
                           metadata={"help": "held-out split (the same for every stage)"})
    test_per_level: int = field(default=30, metadata={"help": "held-out prompts per level"})
    sft_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6],
                                  metadata={"help": "levels of the SFT examples"})
    sft_worked: float = field(default=0.3, metadata={
        "help": "fraction of SFT examples with the equations written out; the rest answer with an empty "
                "think block"})
    work: str = field(default="columns", metadata={
        "help": "how worked examples reason: 'equations' (one per operation) or 'columns' (each operation "
                "digit by digit first)"})
    max_len: int = field(default=192, metadata={"help": "tokens per pretraining and SFT row"})
    tag_tokens: bool = field(default=False, metadata={
        "help": "make <think> </think> <answer> </answer> one token each (as Qwen3 has its think tags) rather "
                "than 3-4 byte-pair pieces; off: GRPO then learned far less here (docs/EXPERIMENTS.md)"})
    # the base model
    vocab_size: int = 384
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    pretrain_docs: int = 30000
    pretrain_steps: int = 500
    pretrain_lr: float = 3e-3
    # SFT
    # A pool SFT goes through about twice: repeating a smaller one five times memorises its bare
    # answers, and on some seeds GRPO then starts from a model whose worked answers are weaker.
    sft_examples: int = 40000
    sft_steps: int = 900
    sft_lr: float = 1e-3
    # GRPO
    grpo_steps: int = 60
    grpo_prompts: int = 8
    group_size: int = 8
    grpo_lr: float = 1e-5
    # the control
    control_steps: int = field(default=210, metadata={
        "help": "SFT steps of the control (about GRPO's wall time; the report gives both)"})
    control_lr: float = 3e-4
    temperature: float = 0.8
    temperature_end: float = 1.0
    max_new_tokens: int = 160
    eval_k: int = 2
    threads: int = field(default=2, metadata={"help": "CPU threads"})
    device: str = field(default="auto", metadata={"help": "auto (a GPU if there is one) | cpu | cuda | ..."})


# The same pipeline in seconds: for the tests and for trying changes to the demo itself.
TOY = dict(control_steps=2, test_per_level=1, pretrain_docs=300, pretrain_steps=10, sft_examples=200, sft_steps=10, grpo_steps=2,
           grpo_prompts=4, group_size=4, hidden_size=32, layers=1, eval_k=2, vocab_size=300, max_new_tokens=16)


def write_data(cfg: DemoConfig, root: Path) -> dict[str, Path]:
    """Training pools from the task generator (never overlapping the held-out split) and the test slice."""
    task = get_task("arithmetic", split="train", work=cfg.work)
    rng = random.Random(cfg.seed)
    docs = [task.sample(rng) for _ in range(cfg.pretrain_docs)]
    sft = task.make_split(cfg.sft_examples, seed=cfg.seed + 1, levels=cfg.sft_levels)
    # Below one half, so the SFT model's most likely first move is to skip the reasoning.
    worked = random.Random(cfg.seed + 3)
    sft = [r if worked.random() < cfg.sft_worked else {**r, "reasoning": ""} for r in sft]
    grpo = task.make_split(max(4000, cfg.grpo_steps * cfg.grpo_prompts), seed=cfg.seed + 2)
    per_level: dict[int, int] = {}
    test = []
    for r in load_rl(cfg.test_file):
        if per_level.get(r["difficulty"], 0) < cfg.test_per_level:
            per_level[r["difficulty"]] = per_level.get(r["difficulty"], 0) + 1
            test.append(r)
    files = {name: root / f"{name}.jsonl" for name in ("pretrain", "sft", "grpo", "test", "test_sft")}
    write_jsonl([{"text": f"{d['prompt']}\n{d['reasoning']}\nAnswer: {d['answer']}"} for d in docs], files["pretrain"])
    write_jsonl([{"prompt": TEMPLATE.user_message(r["prompt"]), "completion": TEMPLATE.target(r["reasoning"], r["answer"])}
                 for r in sft], files["sft"])
    write_jsonl([{k: r[k] for k in ("id", "prompt", "answer", "difficulty")} for r in grpo], files["grpo"])
    write_jsonl([{k: r[k] for k in ("id", "prompt", "answer", "difficulty")} for r in test], files["test"])
    # The same questions as chats, so SFT and the control report held-out accuracy as they go. The
    # replies are mixed as the SFT data's are, so the held-out loss is that data's, on new questions.
    mixed = random.Random(cfg.seed + 4)
    replies = [task.solve(r["prompt"]) for r in test]
    write_jsonl([{"prompt": TEMPLATE.user_message(r["prompt"]),
                  "completion": TEMPLATE.target(x["reasoning"] if mixed.random() < cfg.sft_worked else "", x["answer"])}
                 for r, x in zip(test, replies)], files["test_sft"])
    return files


def build_base(cfg: DemoConfig, root: Path, files: dict[str, Path], log) -> Path:
    """Tokenizer + random model, pretrained on plain task text; cached by its settings."""
    base = root / "base"
    key = {k: getattr(cfg, k) for k in ("seed", "work", "max_len", "tag_tokens", "vocab_size", "hidden_size", "layers",
                                        "heads", "kv_heads", "pretrain_docs", "pretrain_steps", "pretrain_lr")}
    key["template"] = TEMPLATE.user_message("{question}")  # the tokenizer is trained on prompts too
    key["tokenizer_texts"] = "pretraining documents + SFT prompts"
    marker = base / "demo_base.json"
    if marker.is_file() and json.loads(marker.read_text()) == key:
        log(f"base model: cached in {base}")
        return base / "model"
    texts = [json.loads(line)["text"] for line in files["pretrain"].read_text().splitlines()][:4000]
    # The prompt's fixed wording (tags included) should be a few tokens, not dozens of bytes:
    # train on it too. Prompts only, so the base does not depend on how the SFT answers look.
    texts += [r["prompt"] for r in map(json.loads, files["sft"].read_text().splitlines()[:1000])]
    tags = TEMPLATE.think_tags + TEMPLATE.answer_tags if cfg.tag_tokens else ()
    tokenizer = train_bpe(texts, cfg.vocab_size, split_digits=True, added_tokens=tags)
    model_cfg = ModelConfig(model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=int(cfg.hidden_size * 8 / 3) // 8 * 8, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                            max_position_embeddings=512, tie_word_embeddings=True,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    model.init_weights(generator=torch.Generator().manual_seed(cfg.seed))
    init = base / "init"
    save_model(model, init)
    tokenizer.save(init)
    log(f"base model: {model.num_params() / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}; pretraining")
    train_sft(SFTConfig(model=str(init), train=str(files["pretrain"]), out=str(base / "run"), format="text",
                        max_len=cfg.max_len, batch_rows=32, max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                        warmup_steps=20, eval_every=0, log_every=50, seed=cfg.seed, overwrite=True,
                        device=cfg.device), log=log)
    final = base / "model"
    src = checkpoint_path(base / "run", "last")
    save_model(load_model(src), final)
    load_tokenizer(src).save(final)
    marker.write_text(json.dumps(key))
    return final


def worked_out(completion: str, item: EvalItem | None = None) -> float:
    """1.0 when the think block holds reasoning, 0.0 for an empty or missing one."""
    return float(re.search(r"<think>\s*[^<\s]", completion) is not None)


def eval_stage(model_dir: Path, items_file: Path, cfg: DemoConfig, k: int) -> dict:
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, device=pick_device(cfg.device))
    task = get_task("arithmetic", split="test")
    items = [EvalItem(tokenize_prompt(tokenizer, TEMPLATE.messages(r["prompt"])), r["answer"], r["difficulty"], r)
             for r in load_rl(items_file)]
    return evaluate(model, tokenizer, items, max_new_tokens=cfg.max_new_tokens, k=k, temperature=1.0,
                    check=lambda c, it: task.check(c, it.record), seed=cfg.seed,
                    measures={"worked_out": worked_out})


def run_demo(cfg: DemoConfig, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    pick_device(cfg.device)  # a device this machine lacks is refused before any work
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    t_start = time.perf_counter()
    files = write_data(cfg, root / "data")
    base = build_base(cfg, root, files, log)

    # A rerun of the demo trains every stage again into the same directories (only the base is cached).
    log(f"SFT on levels {','.join(map(str, cfg.sft_levels))}, {cfg.sft_worked:.0%} of the examples worked out")
    sft_run = root / "sft"
    held_out = dict(val=str(files["test_sft"]), eval_accuracy_samples=10**6, max_new_tokens=cfg.max_new_tokens,
                    device=cfg.device)
    train_sft(SFTConfig(model=str(base), train=str(files["sft"]), out=str(sft_run), max_len=cfg.max_len, batch_rows=32,
                        max_steps=cfg.sft_steps, lr=cfg.sft_lr, warmup_steps=20, eval_every=max(math.ceil(cfg.sft_steps / 3), 1),
                        log_every=50, seed=cfg.seed, overwrite=True, **held_out), log=log, monitor=LiveMonitor)
    sft_model = checkpoint_path(sft_run, "last")

    log("GRPO: accuracy + format + thinking rewards, curriculum easy -> hard, hotter late")
    grpo_run = root / "grpo"
    grpo_cfg = GRPOConfig(
        model=str(sft_model), train=str(files["grpo"]), val=str(files["test"]), out=str(grpo_run),
        task="arithmetic", instruction=TEMPLATE.instruction,
        # worked_out (weight 0) pays nothing: it only logs the share of completions that work it out.
        rewards={**REWARDS, "worked_out": 0.0},
        # Dr. GRPO's unscaled advantages: dividing by a group's std would blow the small
        # format/thinking differences of an all-wrong group up to full size, and the policy
        # then learns to please them instead of getting answers right (seen in practice here).
        adv_scale="none", steps=cfg.grpo_steps, prompts_per_step=cfg.grpo_prompts, group_size=cfg.group_size,
        max_new_tokens=cfg.max_new_tokens, dynamic_sampling="drop", lr=cfg.grpo_lr,
        # Four evaluations: by step 50 the live monitor judges format against held-out accuracy, not
        # against the train accuracy, which falls as the curriculum brings harder prompts in.
        eval_every=max(cfg.grpo_steps // 4, 1), eval_samples=10**6, log_every=10, seed=cfg.seed, overwrite=True,
        device=cfg.device,
        # Easy levels first, all levels later with the hard ones in; prompts the model sometimes
        # solves are preferred (p(1 - p) weighting); the later stage samples hotter.
        curriculum="learnability",
        curriculum_stages=[{"until": 0.4, "max_difficulty": max(cfg.sft_levels), "temperature": cfg.temperature},
                           {"until": 1.0, "temperature": cfg.temperature_end}])
    t0 = time.perf_counter()
    train_grpo(grpo_cfg,
               extra_rewards={"thinking": sample_reward("thinking", **THINKING), "worked_out": worked_out},
               log=log, monitor=LiveMonitor)
    grpo_seconds = time.perf_counter() - t0

    # A step budget, not GRPO's wall time: a budget in seconds would follow the machine's load of the
    # moment, and the control would not repeat. Its steps are chosen to take about GRPO's time.
    log(f"control: SFT continued for {cfg.control_steps} steps (GRPO took {grpo_seconds:.0f}s)")
    control_run = root / "control"
    t0 = time.perf_counter()
    train_sft(SFTConfig(model=str(sft_model), train=str(files["sft"]), out=str(control_run), max_len=cfg.max_len,
                        batch_rows=32, max_steps=cfg.control_steps, lr=cfg.control_lr, schedule="constant",
                        warmup_steps=0, eval_every=max(cfg.control_steps // 2, 1), log_every=100, seed=cfg.seed + 7,
                        overwrite=True, **held_out),
              log=log, monitor=LiveMonitor)
    control_seconds = time.perf_counter() - t0

    log("evaluating every stage on the held-out split")
    results = {}
    for name, model_dir in [("base", base), ("sft", sft_model), ("control", checkpoint_path(control_run, "last")),
                            ("grpo", checkpoint_path(grpo_run, "last"))]:
        # The base model has never seen the chat format; sampling it k more times shows nothing.
        results[name] = eval_stage(model_dir, files["test"], cfg, k=0 if name == "base" else cfg.eval_k)
        log(f"  {name:8s} accuracy {results[name]['accuracy']:.3f}")
    total = time.perf_counter() - t_start
    report = render_report(cfg, results, grpo_seconds, control_seconds, total)
    findings = diagnose(read_metrics(grpo_run))
    report += "\n## Diagnostics of the GRPO run\n\n" + (format_report(findings) if findings else "No finding.") + "\n"
    try:
        story_figure([root], [results], root / "story.png")
        # Every logged curve, on a time axis: runs of very different step costs line up.
        plot_runs([sft_run, grpo_run, control_run], root / "curves.png", x="minutes")
        report += "\n![the demo at a glance](story.png)\n\n![training curves](curves.png)\n"
    except ModuleNotFoundError as e:  # matplotlib is optional; the report says why the picture is missing
        report += f"\n(no figures: {e})\n"
    (root / "report.md").write_text(report)
    (root / "results.json").write_text(json.dumps({"results": results, "seconds": total}, indent=2, default=str))
    log(f"report: {root / 'report.md'} ({total / 60:.1f} min)")
    return results


def render_report(cfg: DemoConfig, results: dict, grpo_seconds: float, control_seconds: float,
                  total_seconds: float) -> str:
    k = cfg.eval_k
    lines = ["# nanopost demo report", "",
             f"Held-out multi-step arithmetic, {results['sft']['n']} prompts ({cfg.test_per_level} per level). "
             f"SFT saw levels {', '.join(map(str, cfg.sft_levels))}, {cfg.sft_worked:.0%} of its examples worked out "
             f"and the rest answered with an empty think block; GRPO trained on all levels. "
             f"GRPO trained for {grpo_seconds:.0f}s; the control, SFT continued on the same data, for {cfg.control_steps} "
             f"steps in {control_seconds:.0f}s. Total {total_seconds / 60:.1f} min.",
             "", f"| stage | greedy accuracy (95% CI) | avg@{k} | pass@{k} | worked out |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} ({r['accuracy_lo']:.3f}–{r['accuracy_hi']:.3f}) "
                     f"| {_fmt(r.get(f'avg@{k}'))} | {_fmt(r.get(f'pass@{k}'))} | {r['worked_out']:.2f} |")
    levels = sorted({lvl for r in results.values() for lvl in r["per_difficulty"]}, key=float)
    name = lambda lvl: f"{float(lvl):g}"  # noqa: E731  (levels are read back as floats)
    lines += ["", "Greedy accuracy per difficulty level (level = 3·(digits−1) + operations):", "",
              "| level | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for lvl in levels:
        lines.append(f"| {name(lvl)} | " + " | ".join(f"{r['per_difficulty'].get(lvl, float('nan')):.2f}"
                                                for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


# ------------------------------------------------------------------------------ the figure

COLORS = {"sft": "C0", "control": "C2", "grpo": "C1"}


def story_figure(roots: list[Path], results: list[dict], out: Path) -> Path:
    """The demo at a glance, over one seed or several (one line or dot per seed):

    held-out accuracy against minutes of training (GRPO and the control start where SFT ends), greedy
    accuracy per level, GRPO's training reward beside its held-out accuracy and worked-out share, and
    each stage's final greedy accuracy with its 95% interval.
    """
    from nanopost.tools.plot import require_matplotlib, series

    Figure = require_matplotlib()
    fig = Figure(figsize=(15, 3.6), layout="constrained")
    over_time, per_level, grpo_ax, final = fig.subplots(1, 4, width_ratios=[1.3, 1.2, 1.2, 0.8])
    for i, root in enumerate(roots):
        runs = {name: read_metrics(root / name) for name in STAGES}
        sft_end = series(runs["sft"], "train", "loss", x="minutes")[0][-1]
        sft_last = series(runs["sft"], "eval", "accuracy", x="minutes")
        for name, rows in runs.items():
            x, y = series(rows, "eval", "accuracy", x="minutes")
            start = 0.0 if name == "sft" else sft_end
            if name == "control":  # the control starts from the SFT model: its line starts at SFT's last point
                x, y = np.r_[sft_last[0][-1:] - sft_end, x], np.r_[sft_last[1][-1:], y]
            over_time.plot(x + start, y, "o-", color=COLORS[name], ms=3, alpha=0.9 if len(roots) == 1 else 0.6,
                           label=name if i == 0 else None)
        steps, accuracy = series(runs["grpo"], "train", "reward_accuracy_mean")
        smooth = np.convolve(accuracy, np.ones(5) / 5, mode="same") if len(accuracy) >= 5 else accuracy
        grpo_ax.plot(steps, smooth, color="C1", alpha=0.8, label="train accuracy reward" if i == 0 else None)
        grpo_ax.plot(*series(runs["grpo"], "train", "reward_worked_out_mean"), color="C4", alpha=0.8,
                     label="worked out (train)" if i == 0 else None)
        grpo_ax.plot(*series(runs["grpo"], "eval", "accuracy"), "o-", color="C3", ms=3,
                     label="held-out accuracy" if i == 0 else None)
    over_time.set(title="held-out greedy accuracy", xlabel="minutes of training (SFT, then each arm)")
    over_time.legend()
    grpo_ax.set(title="GRPO", xlabel="step", ylim=(0, 1.02))
    grpo_ax.legend(fontsize=8)

    levels = sorted({float(lvl) for r in results for lvl in r["grpo"]["per_difficulty"]})
    width = 0.8 / len(STAGES)
    for j, name in enumerate(STAGES):
        values = np.array([[r[name]["per_difficulty"].get(lvl, r[name]["per_difficulty"].get(str(lvl), np.nan))
                            for lvl in levels] for r in results], dtype=float)
        xs = np.arange(len(levels)) + (j - 1) * width
        per_level.bar(xs, values.mean(0), width, color=COLORS[name], label=name)
        if len(results) > 1:
            per_level.errorbar(xs, values.mean(0), yerr=[values.mean(0) - values.min(0), values.max(0) - values.mean(0)],
                               fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    per_level.set(title="greedy accuracy per level" + (" (mean, min-max)" if len(results) > 1 else ""),
                  xlabel="level (1-3: one digit, 4-6: two, 7-9: three)", xticks=np.arange(len(levels)),
                  xticklabels=[f"{lvl:g}" for lvl in levels], ylim=(0, 1.02))
    per_level.legend(fontsize=8)

    for j, name in enumerate(STAGES):
        for k, r in enumerate(results):
            x = j + (k - (len(results) - 1) / 2) * 0.12
            final.errorbar(x, r[name]["accuracy"], yerr=[[r[name]["accuracy"] - r[name]["accuracy_lo"]],
                                                         [r[name]["accuracy_hi"] - r[name]["accuracy"]]],
                           fmt="o", color=COLORS[name], ms=4, capsize=2)
    final.set(title="final, 95% CI" + (" per seed" if len(results) > 1 else ""),
              xticks=range(len(STAGES)), xticklabels=STAGES, xlim=(-0.6, len(STAGES) - 0.4))
    for ax in (over_time, per_level, grpo_ax, final):
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=110)
    return out


# ------------------------------------------------------------------------------ several seeds

STAGES = ("sft", "control", "grpo")
HARD_LEVELS = (4, 5, 6)  # two-digit operands: where reasoning step by step should pay


def run_seeds(cfg: DemoConfig, log=print) -> dict[int, dict]:
    """The demo once per seed of cfg.seeds, each in OUT/seed-N, and OUT/report.md over them."""
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = {}
    for seed in cfg.seeds:
        log(f"== seed {seed}")
        per_seed[seed] = run_demo(dataclasses.replace(cfg, seed=seed, seeds=[], out=str(root / f"seed-{seed}")), log=log)
    minutes = (time.perf_counter() - t0) / 60
    report = render_seeds_report(per_seed, minutes)
    try:
        story_figure([root / f"seed-{seed}" for seed in per_seed], list(per_seed.values()), root / "story.png")
        report += "\n![the demo over seeds](story.png)\n"
    except ModuleNotFoundError as e:
        report += f"\n(no figure: {e})\n"
    (root / "report.md").write_text(report)
    (root / "results.json").write_text(json.dumps({"per_seed": per_seed, "minutes": minutes}, indent=2, default=str))
    log(f"report: {root / 'report.md'} ({minutes:.1f} min)")
    return per_seed


def gain(results: dict) -> float:
    """GRPO's greedy accuracy above the better of SFT and the control."""
    return results["grpo"]["accuracy"] - max(results["sft"]["accuracy"], results["control"]["accuracy"])


def intervals_apart(results: dict) -> bool:
    """Whether GRPO's 95% interval lies wholly above both rivals' intervals."""
    return results["grpo"]["accuracy_lo"] > max(results["sft"]["accuracy_hi"], results["control"]["accuracy_hi"])


def level_gain(results: dict, levels) -> float:
    """GRPO minus SFT, greedy accuracy averaged over `levels` (equal prompts per level)."""
    diffs = [results["grpo"]["per_difficulty"][lvl] - results["sft"]["per_difficulty"][lvl]
             for lvl in results["grpo"]["per_difficulty"] if float(lvl) in levels]
    return sum(diffs) / len(diffs) if diffs else math.nan


def _mean_sd(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def render_seeds_report(per_seed: dict[int, dict], minutes: float) -> str:
    seeds = list(per_seed)
    lines = [f"# nanopost demo over seeds {', '.join(map(str, seeds))}", "",
             f"Each seed builds its own base, data and runs (seed-N/report.md). Greedy held-out accuracy; gain = "
             f"GRPO minus the better of SFT and the control; apart = GRPO's 95% interval above both of theirs. "
             f"Total {minutes:.1f} min.", "",
             "| seed | sft | control | grpo | gain | apart |", "|---|---|---|---|---|---|"]
    for seed, r in per_seed.items():
        cells = [f"{r[s]['accuracy']:.3f} ({r[s]['accuracy_lo']:.3f}–{r[s]['accuracy_hi']:.3f})" for s in STAGES]
        lines.append(f"| {seed} | " + " | ".join(cells) + f" | {gain(r):+.3f} | {'yes' if intervals_apart(r) else 'no'} |")
    lines.append("| mean ± sd | " + " | ".join(_mean_sd([r[s]["accuracy"] for r in per_seed.values()]) for s in STAGES)
                 + f" | {_mean_sd([gain(r) for r in per_seed.values()])} | "
                 f"{sum(intervals_apart(r) for r in per_seed.values())}/{len(seeds)} |")
    levels = sorted({float(lvl) for r in per_seed.values() for lvl in r["grpo"]["per_difficulty"]})
    lines += ["", "GRPO minus SFT, greedy accuracy per level:", "",
              "| level | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for lvl in levels:
        diffs = [level_gain(r, (lvl,)) for r in per_seed.values()]
        lines.append(f"| {lvl:g} | " + " | ".join(f"{d:+.2f}" for d in diffs) + f" | {sum(diffs) / len(diffs):+.2f} |")
    hard = [level_gain(r, HARD_LEVELS) for r in per_seed.values()]
    lines += ["", f"Levels {HARD_LEVELS[0]}–{HARD_LEVELS[-1]} together: " + ", ".join(f"{d:+.3f}" for d in hard)
              + f" (mean {sum(hard) / len(hard):+.3f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    argv = sys.argv[1:]
    if "--toy" in argv:
        argv = [a for a in argv if a != "--toy"] + [x for k, v in TOY.items() for x in (f"--{k}", str(v))]
    cfg = parse_config(DemoConfig, argv, description=__doc__)
    run_seeds(cfg) if cfg.seeds else run_demo(cfg)


if __name__ == "__main__":
    main_guard(main)
