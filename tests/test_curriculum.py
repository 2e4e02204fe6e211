"""The curriculum sampler: stages in order, unstable prompts preferred, exact resume, reports."""

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.curriculum import CurriculumSampler, Stage
from nanopost.tools.difficulty import (estimate_pass_rates, load_pass_rates, per_difficulty_table, save_pass_rates,
                                       write_report_table)
from nanopost.plumbing.data_files import load_rl
from nanopost.plumbing.metrics import MetricsLogger, read_metrics
from nanopost.schedules import temperature_at
from tiny import larger_task, write_jsonl

ROOT = Path(__file__).resolve().parents[1]

LEVELS = [1, 2, 3, 4, 5]


def leveled(per_level: int = 20) -> list[dict]:
    return [{"id": f"L{d}-{i}", "prompt": f"q{d}-{i}", "answer": "1", "difficulty": d}
            for d in LEVELS for i in range(per_level)]


def population(true_p: list[float], copies: int) -> tuple[list[dict], dict[str, float]]:
    """Prompts whose true pass rates are known: `copies` prompts at each rate."""
    records = [{"id": f"p{j}-{c}", "prompt": "q", "answer": "1"} for j in range(len(true_p)) for c in range(copies)]
    truth = {f"p{j}-{c}": p for j, p in enumerate(true_p) for c in range(copies)}
    return records, truth


def observe(records, truth, rng, k=8) -> list[float]:
    """A simulated policy's group results: the fraction correct of k Bernoulli(p) draws."""
    return [sum(rng.random() < truth[r["id"]] for _ in range(k)) / k for r in records]


def simulate(sampler, truth, steps, n=8, seed=0, start=0) -> list[str]:
    """Train against the simulated policy; returns the ids drawn."""
    rng = random.Random(seed)
    chosen = []
    for step in range(start, start + steps):
        batch = sampler.sample(n, step)
        sampler.update(batch, observe(batch, truth, rng), step)
        chosen += [r["id"] for r in batch]
    return chosen


def see_all(sampler, records, truth, seed=0) -> None:
    """One group of every prompt, so each has a pass-rate estimate."""
    sampler.update(records, observe(records, truth, random.Random(seed)), 0)


# ---------------------------------------------------------------- stages


def test_fractional_boundaries_split_steps_like_the_temperature_schedule():
    stages = [Stage(until=0.3, temperature=1.0), Stage(until=0.7, temperature=1.1), Stage(until=1.0, temperature=1.2)]
    s = CurriculumSampler(leveled(), total_steps=10, stages=stages)
    assert [s.stage_index(t) for t in range(12)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    # The same boundaries as starts of a "stages" temperature schedule change at the same steps.
    starts = [(0.3, 1.1), (0.7, 1.2)]
    for t in range(10):
        assert s.stage_settings(t)["temperature"] == temperature_at(t, 10, kind="stages", start=1.0, stages=starts)


def test_absolute_boundaries_are_step_numbers():
    s = CurriculumSampler(leveled(), total_steps=100, stages=[Stage(until=5), Stage(until=12)])
    assert [s.stage_index(t) for t in (0, 4, 5, 11, 12, 99)] == [0, 0, 1, 1, 1, 1]


def test_stages_go_from_easy_to_hard_and_stay_in_their_range():
    stages = [Stage(until=0.25, max_difficulty=2), Stage(until=0.5, min_difficulty=2, max_difficulty=4),
              Stage(until=1.0, min_difficulty=4)]
    s = CurriculumSampler(leveled(), total_steps=40, stages=stages, mix_previous=0.0)
    levels = {i: set() for i in range(3)}
    for step in range(40):
        levels[s.stage_index(step)] |= {r["difficulty"] for r in s.sample(6, step)}
    assert levels == {0: {1, 2}, 1: {2, 3, 4}, 2: {4, 5}}


def test_quantile_stages_split_by_the_data_distribution():
    records = [{"id": i, "prompt": "q", "answer": "1", "difficulty": 10.0 * i} for i in range(101)]
    s = CurriculumSampler(records, total_steps=2, stages=[Stage(until=0.5, quantiles=(0.0, 0.25)),
                                                          Stage(until=1.0, quantiles=(0.75, 1.0))], mix_previous=0.0)
    assert s.pools[0] == [str(i) for i in range(26)]  # difficulties 0 .. 250, the first quarter
    assert all(r["difficulty"] >= 750 for r in s.sample(20, 1))


def test_mix_previous_share_of_earlier_stage_prompts():
    stages = [Stage(until=0.5, max_difficulty=2), Stage(until=1.0, min_difficulty=3)]
    s = CurriculumSampler(leveled(), total_steps=1000, stages=stages, mix_previous=0.2, seed=3)
    n, steps = 10, 400
    earlier = sum(r["difficulty"] <= 2 for step in range(500, 500 + steps) for r in s.sample(n, step))
    # 4000 draws at share 0.2: standard error 0.0063, so 0.2 +- 0.025 is about 4 sigma.
    assert abs(earlier / (n * steps) - 0.2) < 0.025


def test_stage_settings_expose_temperature_and_group_size():
    stages = [Stage(until=0.5), Stage(until=1.0, temperature=1.3, group_size=16)]
    s = CurriculumSampler(leveled(), total_steps=10, stages=stages)
    assert s.stage_settings(0) == {}
    assert s.stage_settings(7) == {"temperature": 1.3, "group_size": 16}


@pytest.mark.parametrize("temperature", [0, 0.0, -0.5, float("nan")])
def test_a_stage_that_cannot_sample_is_refused_when_built(temperature):
    # Greedy groups have zero variance: refused at once, not when the stage's first step samples.
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Stage(until=1.0, temperature=temperature)


def test_difficulty_filter_without_difficulties_is_an_error_unless_pass_rates_give_them():
    records = [{"id": str(i), "prompt": "q", "answer": "1"} for i in range(10)]
    with pytest.raises(ValueError, match="has none"):
        CurriculumSampler(records, total_steps=10, stages=[Stage(until=1.0, max_difficulty=0.5)])
    rates = {str(i): i / 9 for i in range(10)}  # difficulty 1 - p
    s = CurriculumSampler(records, total_steps=10, stages=[Stage(until=1.0, max_difficulty=0.5)], pass_rates=rates)
    assert sorted(s.pools[0]) == ["5", "6", "7", "8", "9"]
    assert s.difficulty == {str(i): 1.0 - i / 9 for i in range(10)}
    with pytest.raises(ValueError, match=r"a pass rate must be in \[0, 1\], got 1.5"):
        CurriculumSampler(records, total_steps=10, stages=[Stage(until=1.0, max_difficulty=0.5)],
                          pass_rates={**rates, "3": 1.5})


# ---------------------------------------------------------------- selection


def test_prompts_are_not_repeated_within_a_step_across_refill_rounds():
    s = CurriculumSampler(leveled(2), total_steps=10, mode="learnability")
    first, refill = s.sample(6, 0), s.sample(4, 0)
    ids = [r["id"] for r in first + refill]
    assert len(set(ids)) == 10
    assert len({r["id"] for r in s.sample(10, 0)}) == 10  # only 10 records: a second pass begins


def test_learnability_concentrates_on_prompts_near_one_half():
    true_p = [0.0, 0.1, 0.5, 0.9, 1.0]
    records, truth = population(true_p, copies=20)
    s = CurriculumSampler(records, total_steps=1000, mode="learnability", seed=1)
    see_all(s, records, truth)
    chosen = Counter(truth[i] for i in simulate(s, truth, steps=200))
    total = sum(chosen.values())
    assert chosen[0.5] / total > 0.5  # 20% of the prompts under uniform sampling
    assert chosen[0.5] > 2 * chosen[0.1] and chosen[0.5] > 2 * chosen[0.9]
    # Only the floor weight (0.01 against 0.25) retries them: 40% of the pool, ~5% of the draws.
    assert (chosen[0.0] + chosen[1.0]) / total < 0.08


def test_learnability_without_a_floor_never_draws_solved_or_hopeless_prompts_once_seen():
    records, truth = population([0.0, 0.3, 0.6, 1.0], copies=10)
    s = CurriculumSampler(records, total_steps=1000, mode="learnability", floor=0.0, seed=4)
    see_all(s, records, truth)
    chosen = Counter(truth[i] for i in simulate(s, truth, steps=100))
    assert chosen[0.0] == chosen[1.0] == 0


def test_unseen_prompts_are_explored_before_known_hopeless_ones():
    records, truth = population([0.0, 0.5], copies=50)
    s = CurriculumSampler(records, total_steps=100, mode="learnability")
    hopeless = [r for r in records if truth[r["id"]] == 0.0]
    s.update(hopeless, [0.0] * len(hopeless), 0)
    drawn = s.sample(20, 0)
    # Weight 0.25 (explore) against 0.01 (floor): about one hopeless prompt in 20 is expected.
    assert sum(truth[r["id"]] == 0.5 for r in drawn) >= 17


def test_band_keeps_only_prompts_inside_the_band_once_seen():
    records, truth = population([0.0, 0.4, 0.6, 1.0], copies=10)
    s = CurriculumSampler(records, total_steps=100, mode="band", band=(0.0, 1.0), ema=1.0)
    see_all(s, records, truth)
    chosen = Counter(truth[i] for i in simulate(s, truth, steps=100, n=4))
    assert chosen[0.0] == chosen[1.0] == 0
    assert chosen[0.4] > 100 and chosen[0.6] > 100


def test_band_tops_up_from_outside_when_too_few_prompts_are_inside():
    records = [{"id": str(i), "prompt": "q", "answer": "1"} for i in range(10)]
    s = CurriculumSampler(records, total_steps=10, mode="band", band=(0.2, 0.8),
                          pass_rates={str(i): (0.5 if i < 3 else 1.0) for i in range(10)})
    ids = [r["id"] for r in s.sample(5, 0)]
    assert set(ids[:3]) == {"0", "1", "2"} and len(set(ids)) == 5


def test_tracked_pass_rates_converge_to_the_true_rates():
    true_p = [0.1, 0.3, 0.5, 0.7, 0.9]
    records, truth = population(true_p, copies=4)
    s = CurriculumSampler(records, total_steps=1000, mode="uniform", seed=2)
    simulate(s, truth, steps=500, n=10)  # ~250 groups per prompt
    for key, p in truth.items():
        assert abs(s.successes[key] / s.tries[key] - p) < 0.05
        assert abs(s.ema[key] - p) < 0.25  # the EMA follows the recent groups (sd ~0.07)
    errors = [abs(s.ema[k] - p) for k, p in truth.items()]
    assert sum(errors) / len(errors) < 0.08


def test_mastered_prompts_retire_after_enough_tries():
    records, truth = population([1.0, 0.5], copies=5)
    s = CurriculumSampler(records, total_steps=100, mode="uniform", retire_threshold=0.9, retire_min_tries=3)
    simulate(s, truth, steps=20, n=4)
    assert s.retired == {k for k, p in truth.items() if p == 1.0}
    assert all(s.tries[k] >= 3 for k in s.retired)
    assert s.metrics()["retired"] == 5.0
    assert all(truth[r["id"]] == 0.5 for r in s.sample(5, 20))
    assert len(s.sample(8, 21)) == 8  # when only retired prompts are left, they are drawn again


def test_metrics_report_stage_difficulty_and_coverage():
    s = CurriculumSampler(leveled(), total_steps=10, stages=[Stage(until=0.5, max_difficulty=1), Stage(until=1.0)],
                          mix_previous=0.0)
    batch = s.sample(4, 0)
    s.update(batch, [0.25, 0.5, 0.75, 1.0], 0)
    m = s.metrics()
    assert m["stage"] == 0.0 and m["batch_difficulty"] == 1.0
    assert m["seen_frac"] == 4 / 100 and m["pass_rate_mean"] == pytest.approx(0.625)
    assert "batch_pass_rate" not in m  # nothing was known about those prompts when drawn


# ---------------------------------------------------------------- resume


def test_state_survives_torch_save_and_the_next_draws_are_identical(tmp_path):
    records, truth = population([0.1, 0.5, 0.9, 1.0], copies=10)
    for r, d in zip(records, range(len(records))):
        r["difficulty"] = d % 5
    kw = dict(total_steps=40, stages=[Stage(until=0.5, max_difficulty=2), Stage(until=1.0, temperature=1.2)],
              mode="learnability", retire_threshold=0.9, retire_min_tries=2, seed=7)
    a = CurriculumSampler(records, **kw)
    simulate(a, truth, steps=15)
    a.sample(3, 15)  # mid-step: the refill round must not repeat these
    torch.save({"sampler": a.state_dict()}, tmp_path / "state.pt")
    b = CurriculumSampler(records, **kw)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["sampler"])
    assert b.state_dict() == a.state_dict() and b.metrics() == a.metrics()
    assert [r["id"] for r in b.sample(5, 15)] == [r["id"] for r in a.sample(5, 15)]
    assert simulate(b, truth, steps=10, start=16, seed=9) == simulate(a, truth, steps=10, start=16, seed=9)


def test_loading_state_of_other_data_is_an_error():
    s = CurriculumSampler(leveled(), total_steps=10)
    s.update(s.sample(1, 0), [1.0], 0)
    other = CurriculumSampler([{"id": "x", "prompt": "q", "answer": "1"}], total_steps=10)
    with pytest.raises(ValueError, match="not in the data"):
        other.load_state_dict(s.state_dict())


# ---------------------------------------------------------------- pass-rate pre-pass and reports


@pytest.fixture(scope="module")
def tiny_rl(tmp_path_factory):
    """A tiny random checkpoint and RL-format train / val files of the 'larger number' task."""
    d = tmp_path_factory.mktemp("curriculum")
    ckpt, train, val = larger_task(d)
    files = []
    for src in (train, val):
        rows = [json.loads(line) for line in src.read_text().splitlines()]
        rl = [{"id": f"{src.stem}{i}", "prompt": r["prompt"], "difficulty": 1 + i % 3,
               "answer": r["completion"][len("<answer>"):-len("</answer>")]} for i, r in enumerate(rows)]
        files.append(write_jsonl(rl, d / f"rl_{src.name}"))
    return ckpt, files[0], files[1]


def test_estimate_pass_rates_on_a_tiny_model_gives_a_rate_per_id(tiny_rl):
    ckpt, train, _ = tiny_rl
    records = load_rl(train)[:6]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    calls = []

    def check(text, record):  # every other answer "right", so the rates are not all 0 or 1
        calls.append(record["id"])
        return float(len(calls) % 2)

    rates = estimate_pass_rates(model, tok, records, lambda r: tok.encode(r["prompt"]), check,
                                k=3, max_new_tokens=4, batch_size=5, seed=0)
    assert set(rates) == {r["id"] for r in records}
    assert all(0.0 <= p <= 1.0 and (p * 3).is_integer() for p in rates.values())
    assert Counter(calls) == {r["id"]: 3 for r in records}
    assert model.training  # put back as it was


def test_experiment_script_writes_a_results_table(tiny_rl, tmp_path, monkeypatch, capsys):
    ckpt, train, val = tiny_rl
    out = tmp_path / "exp"
    path = ROOT / "scripts" / "curriculum_experiment.py"
    spec = importlib.util.spec_from_file_location("curriculum_experiment", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", [
        "curriculum_experiment.py", "--model", str(ckpt), "--train", str(train), "--val", str(val), "--seeds", "1",
        "--steps", "3", "--out", str(out), "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
        "--eval-every", "0", "--eval-samples", "6", "--device", "cpu"])
    script.main()
    table = (out / "results.md").read_text()
    assert "| uniform | 1 |" in table and "| curriculum | 1 |" in table
    assert "| all | 6 |" in table
    rows = read_metrics(out / "curriculum" / "seed0")
    temps = [r["temperature"] for r in rows if r["kind"] == "train"]
    assert temps == pytest.approx([1.0, 1.1, 1.2])  # hotter late, one stage per step
    assert (out / "uniform" / "seed0" / "per_difficulty.md").is_file()


def test_pass_rate_cache_round_trips(tmp_path):
    rates = {"a": 0.25, "b": 1.0, "7": 0.0}
    path = save_pass_rates(tmp_path / "run" / "pass_rates.json", rates)
    assert load_pass_rates(path) == rates
    path.write_text(json.dumps({"a": 1.5}))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        load_pass_rates(path)


def test_per_difficulty_table_from_an_eval_result_with_counts():
    result = {"accuracy": 0.6, "per_difficulty": {1.0: 0.9, 2.0: 0.5, None: 0.0}}
    table = per_difficulty_table(result, counts={1.0: 10, 2.0: 8, None: 2})
    assert table.splitlines() == ["| difficulty | n | accuracy |", "|---|---:|---:|", "| 1 | 10 | 0.900 |",
                                  "| 2 | 8 | 0.500 |", "| unknown | 2 | 0.000 |",
                                  "| all | 20 | 0.650 |"]  # (9 + 4 + 0) / 20


def test_per_difficulty_table_from_scored_rows_counts_them():
    rows = [{"difficulty": 2, "correct": 1.0}, {"difficulty": 2, "correct": 0.0}, {"difficulty": 1.5, "correct": 1.0}]
    assert per_difficulty_table(rows).splitlines()[2:] == ["| 1.5 | 1 | 1.000 |", "| 2 | 2 | 0.500 |",
                                                           "| all | 3 | 0.667 |"]


def test_write_report_table_uses_the_last_eval_row(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log({"kind": "eval", "step": 0, "accuracy": 0.1, "accuracy_level_1.0": 0.2, "accuracy_level_2.0": 0.0})
    log.log({"kind": "train", "step": 5, "reward_mean": 0.3})
    log.log({"kind": "eval", "step": 10, "accuracy": 0.5, "accuracy_level_1.0": 0.75, "accuracy_level_2.0": 0.25})
    path = write_report_table(tmp_path, counts={1: 4, 2: 4})
    text = path.read_text()
    assert text.startswith("# Held-out accuracy per difficulty (step 10)")
    assert "| 1 | 4 | 0.750 |" in text and "| all | 8 | 0.500 |" in text
