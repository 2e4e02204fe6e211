"""Experiment statistics against hand-computed values, and seeded runs that repeat exactly."""

import json
import math

import pytest
import torch

from nanopost.tools.experiment import (arm_overrides, betainc, final_metrics, mean, parse_args, random_reward,
                                 run_experiment, std, t_cdf, t_interval, t_quantile, welch_test)
from tiny import larger_task


def t4_cdf(t):
    # Student t with 4 degrees of freedom in closed form: 1/2 + (3/4) x (1 - x^2 / 3), x = t / sqrt(4 + t^2)
    x = t / math.sqrt(4 + t * t)
    return 0.5 + 0.75 * x * (1 - x * x / 3)


def test_mean_and_sample_std():
    xs = [2, 4, 4, 4, 5, 5, 7, 9]
    assert mean(xs) == 5
    assert std(xs) == pytest.approx(math.sqrt(32 / 7))  # squared deviations sum to 32, n - 1 = 7
    assert std([3.0]) == 0.0


def test_incomplete_beta_special_cases():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert betainc(3, 1, 0.4) == pytest.approx(0.4**3)  # I_x(a, 1) = x^a
    assert betainc(2.5, 2.5, 0.5) == pytest.approx(0.5)  # symmetric
    assert betainc(2, 3, 0.9) == pytest.approx(1 - betainc(3, 2, 0.1))


def test_t_distribution_against_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 8.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        assert t_cdf(t, 4) == pytest.approx(t4_cdf(t), abs=1e-12)
    # df = 1: t = tan(pi (p - 1/2)); df = 2: t = q sqrt(2 / (1 - q^2)) with q = 2p - 1
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)  # 12.706
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-9)  # 4.303
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)


def test_t_interval_by_hand():
    # mean 3, std sqrt(2.5), se = sqrt(2.5 / 5) = 0.70711, t(0.975, 4) = 2.776445 -> half width 1.96324
    lo, hi = t_interval([1, 2, 3, 4, 5])
    assert lo == pytest.approx(3 - 1.96324, abs=1e-5) and hi == pytest.approx(3 + 1.96324, abs=1e-5)


def test_welch_equal_variances_by_hand():
    # diff 3, s^2 = 1 each, se = sqrt(1/3 + 1/3) = 0.81650, t = 3.67423, df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    w = welch_test([1, 2, 3], [4, 5, 6])
    assert (w.diff, w.df) == (pytest.approx(3.0), pytest.approx(4.0))
    assert w.t == pytest.approx(3.67423, abs=1e-5)
    assert w.p == pytest.approx(2 * (1 - t4_cdf(3.674235)), abs=1e-6)  # 0.0213
    assert (w.lo, w.hi) == (pytest.approx(3 - 2.776445 * 0.816497, abs=1e-5),
                            pytest.approx(3 + 2.776445 * 0.816497, abs=1e-5))


def test_welch_unequal_variances_by_hand():
    # a: mean 2.5, s^2 = 5/3, /4 = 0.41667; b: mean 4, s^2 = 4, /3 = 1.33333
    # t = 1.5 / sqrt(1.75) = 1.13389; df = 1.75^2 / (0.41667^2 / 3 + 1.33333^2 / 2) = 3.0625 / 0.94676 = 3.2347
    w = welch_test([1, 2, 3, 4], [2, 4, 6])
    assert w.t == pytest.approx(1.13389, abs=1e-5)
    assert w.df == pytest.approx(3.2347, abs=1e-4)
    assert 0.3 < w.p < 0.4  # far from significant


def test_welch_of_constant_samples():
    assert welch_test([1, 1], [1, 1]).p == 1.0
    assert welch_test([1, 1], [2, 2]).p == 0.0


def test_final_metrics_take_last_eval_and_train_tail():
    rows = [{"kind": "train", "step": s, "loss": float(s), "time": 1.0} for s in range(1, 11)]
    rows.append({"kind": "eval", "step": 10, "accuracy": 0.5, "time": 2.0})
    m = final_metrics(rows, tail=4)
    assert m == {"loss": (7 + 8 + 9 + 10) / 4, "accuracy": 0.5}


def test_arm_overrides_and_control_reward():
    assert arm_overrides("lr=1e-3 beta=0.04") == ["--lr", "1e-3", "--beta", "0.04"]
    assert arm_overrides("rewards='{random = 1.0}'") == ["--rewards", "{random = 1.0}"]
    with pytest.raises(ValueError, match="field=value"):
        arm_overrides("lr")
    fn = random_reward(0)
    scores = [fn(f"text {i}", {"prompt": "q"}) for i in range(400)]
    assert scores == [random_reward(0)(f"text {i}", {"prompt": "q"}) for i in range(400)]
    assert 0.4 < sum(scores) / 400 < 0.6 and set(scores) == {0.0, 1.0}


def test_experiment_options_are_checked():
    with pytest.raises(ValueError, match="--seed belongs"):
        parse_args(["--kind", "sft", "--seed", "3"])
    with pytest.raises(ValueError, match="grpo"):
        parse_args(["--kind", "sft", "--control", "--model", "m", "--train", "t"])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return larger_task(tmp_path_factory.mktemp("exp"))


def sft_args(task, out, *extra):
    ckpt, train, val = task
    return ["--kind", "sft", "--out", str(out), "--model", str(ckpt), "--train", str(train), "--val", str(val),
            "--max-len", "64", "--batch-rows", "16", "--max-steps", "6", "--warmup-steps", "2", "--lr", "3e-3",
            "--eval-every", "0", "--eval-accuracy-samples", "4", "--max-new-tokens", "6", "--log-every", "1000",
            *extra]


def test_identical_seeds_give_identical_metrics_in_and_out_of_process(task, tmp_path):
    quiet = lambda *_: None  # noqa: E731
    seq = run_experiment(parse_args(sft_args(task, tmp_path / "seq", "--seeds", "2")), log=quiet)
    threads = str(torch.get_num_threads())  # the same thread count, so the same order of float sums
    par = run_experiment(parse_args(sft_args(task, tmp_path / "par", "--seeds", "2", "--jobs", "2",
                                             "--threads", threads)), log=quiet)
    a, b = seq["arms"]["base"]["metrics"], par["arms"]["base"]["metrics"]
    assert set(a) == {"val_loss", "accuracy", "loss"}
    for name in a:
        assert a[name]["values"] == b[name]["values"]  # exactly, not approximately
    assert a["loss"]["values"][0] != a["loss"]["values"][1]  # while another seed gives another run
    summary = json.loads((tmp_path / "seq" / "summary.json").read_text())
    assert summary["arms"]["base"]["metrics"]["loss"]["mean"] == pytest.approx(mean(a["loss"]["values"]))
    assert (tmp_path / "seq" / "base-seed1" / "metrics.jsonl").is_file()


def test_ab_arms_differ_only_in_the_named_field(task, tmp_path):
    exp = parse_args(sft_args(task, tmp_path, "--seeds", "2", "--ab", "lr=3e-3", "lr=1e-5", "--metrics", "loss"))
    assert [a.name for a in exp.arms] == ["lr_3e-3", "lr_1e-5"]
    summary = run_experiment(exp, log=lambda *_: None)
    (c,) = summary["comparisons"]
    assert (c["metric"], c["a"], c["b"]) == ("loss", "lr_3e-3", "lr_1e-5")
    assert c["diff"] > 0  # the tiny lr barely moves the loss in 6 steps
    assert "lr_1e-5 − lr_3e-3" in (tmp_path / "summary.md").read_text()


def test_grpo_control_arm_swaps_in_a_random_reward(task, tmp_path):
    ckpt, train, val = task
    records = [{"prompt": json.loads(line)["prompt"], "answer": json.loads(line)["completion"][8:-9]}
               for line in open(train)]
    rl = tmp_path / "rl.jsonl"
    rl.write_text("".join(json.dumps(r) + "\n" for r in records))
    exp = parse_args(["--kind", "grpo", "--seeds", "2", "--control", "--out", str(tmp_path / "x"), "--model", str(ckpt),
                      "--train", str(rl), "--val", str(rl), "--steps", "2", "--prompts-per-step", "2",
                      "--group-size", "4", "--max-new-tokens", "6", "--eval-every", "0", "--eval-samples", "4",
                      "--rewards", "{accuracy = 1.0, format = 0.1}"])
    assert [a.name for a in exp.arms] == ["base", "control"]
    assert exp.arms[1].overrides == ["--rewards", '{"random" = 1.0, "accuracy" = 0.0, "format" = 0.0}']
    summary = run_experiment(exp, log=lambda *_: None)
    control = exp.results["control"][0]
    assert "reward_random_mean" in control and "reward_accuracy_mean" in control  # the real reward still logged
    assert "reward_random_mean" not in exp.results["base"][0]
    assert {c["b"] for c in summary["comparisons"]} == {"control"}
