"""Diagnostics on synthetic metric streams: each kind of run gets exactly its own finding."""

import math

import numpy as np
import pytest

from nanopost.tools.monitor import (LiveMonitor, diagnose, format_report, generalization_loss, gl_alpha_stop,
                              up_s_stop)

STEPS = 300


def warnings(findings):
    return {f.code for f in findings if f.severity != "info"}


def noise(seed, n=STEPS, scale=1.0):
    return np.random.default_rng(seed).normal(0.0, scale, n)


def sft_run(loss, val_loss=None, *, lr=3e-4, grad_norm=None, every=25):
    """Train rows from a loss curve (one per step) and eval rows from val_loss(step) every `every` steps."""
    rows = []
    gn = grad_norm if grad_norm is not None else 1.0 + 0.05 * noise(99, len(loss))
    for i, l in enumerate(loss, start=1):
        rows.append({"kind": "train", "step": i, "loss": float(l), "lr": lr, "grad_norm": float(gn[i - 1]),
                     "loss_tokens": 512})
        if val_loss is not None and i % every == 0:
            rows.append({"kind": "eval", "step": i, "val_loss": float(val_loss(i)), "accuracy": 0.5})
    return rows


def clean_sft():
    s = np.arange(1, STEPS + 1)
    loss = 0.5 + 2.0 * np.exp(-s / 50) + 0.02 * noise(0)
    return sft_run(loss, lambda i: 0.6 + 2.0 * np.exp(-i / 60))


def rl_run(*, accuracy, format_, heldout, length=None, entropy=None, kl=None, zero_std=None, every=20, seed=0):
    """GRPO-like rows; each argument is a function of the step (train) or of the eval step (heldout)."""
    rng = np.random.default_rng(seed)
    rows = [{"kind": "eval", "step": 0, "accuracy": heldout(0)}]
    for s in range(1, STEPS + 1):
        acc = float(np.clip(accuracy(s) + rng.normal(0, 0.02), 0, 1))
        fmt = float(np.clip(format_(s) + rng.normal(0, 0.02), 0, 1))
        rows.append({
            "kind": "train", "step": s, "reward_mean": acc + 0.5 * fmt, "reward_std": 0.4,
            "reward_accuracy_mean": acc, "reward_format_mean": fmt,
            "len_mean": (length or (lambda s: 80 + 0.05 * s))(s) + rng.normal(0, 3), "len_max": 128,
            "truncated_frac": 0.02, "zero_std_frac": (zero_std or (lambda s: 0.2))(s),
            "entropy": (entropy or (lambda s: 0.8 - 0.001 * s))(s) + rng.normal(0, 0.01),
            "kl": (kl or (lambda s: 0.0001 * s))(s) * (1 + rng.normal(0, 0.05)),
            "loss": rng.normal(0, 0.01), "grad_norm": 0.5 + rng.normal(0, 0.05), "lr": 1e-6, "temperature": 1.0,
        })
        if s % every == 0:
            rows.append({"kind": "eval", "step": s, "accuracy": heldout(s)})
    return rows


def rising(lo, hi, scale=STEPS):
    return lambda s: lo + (hi - lo) * (1 - math.exp(-3 * s / scale))


def clean_rl():
    return rl_run(accuracy=rising(0.2, 0.6), format_=rising(0.3, 0.95), heldout=rising(0.18, 0.55))


def test_a_clean_sft_run_has_no_finding():
    findings = diagnose(clean_sft())
    assert findings == []
    assert format_report(findings).startswith("No problems found.")


def test_a_clean_grpo_run_has_no_finding():
    assert diagnose(clean_rl()) == []


def test_overfitting_sft_run_is_called_overfitting_with_its_best_step():
    s = np.arange(1, STEPS + 1)
    loss = 0.1 + 2.0 * np.exp(-s / 60) + 0.01 * noise(1)
    # val_loss: lowest at step 100, rising afterwards while the train loss keeps falling
    rows = sft_run(loss, lambda i: 0.8 + 0.5 * ((i - 100) / 100) ** 2)
    findings = diagnose(rows)
    assert warnings(findings) == {"overfitting"}
    f = next(f for f in findings if f.code == "overfitting")
    assert f.evidence["best_step"] == 100 and f.evidence["last_step"] == 300
    assert "weight_decay" in f.message and "step 100" in f.message


def test_overfitting_grpo_run_suggests_kl():
    rows = rl_run(accuracy=rising(0.2, 0.9), format_=rising(0.3, 0.95),
                  heldout=lambda s: 0.3 + 0.2 * min(s, 100) / 100 - 0.1 * max(s - 100, 0) / 200)
    findings = diagnose(rows)
    assert warnings(findings) == {"overfitting"}
    f = next(f for f in findings if f.code == "overfitting")
    assert f.evidence["best_step"] == 100 and "beta" in f.message


def test_reward_hacking_run_format_up_accuracy_flat():
    rows = rl_run(accuracy=lambda s: 0.3, format_=rising(0.1, 0.95),
                  heldout=lambda s: 0.3 + 0.01 * math.sin(s))
    findings = diagnose(rows)
    assert warnings(findings) == {"reward_hacking"}
    f = next(f for f in findings if f.code == "reward_hacking")
    assert "format" in f.message and f.evidence["reward_format_mean"][1] > 0.8


def test_reward_hacking_is_judged_on_two_heldout_evaluations_when_there_are_two():
    # A curriculum: train accuracy falls as the prompts get harder, the format reward rises.
    falling = lambda s: 0.5 - 0.3 * s / STEPS  # noqa: E731
    helped = rl_run(accuracy=falling, format_=rising(0.1, 0.95), heldout=lambda s: 0.1 + 0.001 * s,
                    every=STEPS // 2 + 1)  # evaluations at step 0 and halfway only
    assert len([r for r in helped if r["kind"] == "eval"]) == 2
    assert "reward_hacking" not in warnings(diagnose(helped))
    hacked = rl_run(accuracy=falling, format_=rising(0.1, 0.95), heldout=lambda s: 0.1, every=STEPS // 2 + 1)
    f = next(f for f in diagnose(hacked) if f.code == "reward_hacking")
    assert f.evidence["accuracy_metric"] == "held-out accuracy"


def test_too_low_lr_run_suggests_a_higher_lr():
    s = np.arange(1, STEPS + 1)
    loss = 2.5 - 0.0008 * s + 0.005 * noise(2)  # falling steadily, 7% over the whole run
    rows = sft_run(loss, lambda i: 2.6 - 0.0008 * i, lr=1e-6)
    findings = diagnose(rows)
    assert warnings(findings) == {"lr_too_low"}
    assert "try 3e-06 to 1e-05" in findings[0].message  # 3x to 10x the current lr


def test_too_high_lr_run_suggests_a_lower_lr():
    s = np.arange(1, STEPS + 1)
    base = 1.0 + 1.5 * np.exp(-s / 30)
    loss = base * (1 + 0.02 * noise(3) * (1 + s / 30))  # noise grows with time
    loss[[120, 180, 240, 290]] *= 3.0  # spikes
    grad = 1.0 + 0.05 * noise(4)
    grad[[121, 181, 241]] = 20.0  # bursts
    rows = sft_run(loss, lambda i: 1.2 + 1.5 * np.exp(-i / 30), lr=1e-2, grad_norm=grad)
    findings = diagnose(rows)
    assert warnings(findings) == {"lr_too_high"}
    f = findings[0]
    assert f.evidence["spike_steps"] == [121, 181, 241, 291]  # rows are 1-based steps
    assert f.evidence["grad_burst_steps"] == [122, 182, 242]
    assert "try 0.00333" in f.message  # a third of the current lr


def test_nan_loss_is_an_error():
    s = np.arange(1, STEPS + 1)
    loss = 0.5 + 2.0 * np.exp(-s / 50)
    loss[150] = math.nan
    findings = diagnose(sft_run(loss))
    assert [(f.code, f.severity) for f in findings] == [("lr_too_high", "error")]
    assert findings[0].evidence["step"] == 151


def test_a_flat_loss_points_at_the_data():
    rows = sft_run(2.3 + 0.02 * noise(5))
    findings = diagnose(rows)
    assert warnings(findings) == {"no_learning"}
    assert "loss mask" in findings[0].message


def test_length_entropy_and_kl_problems_are_named():
    rows = rl_run(accuracy=rising(0.2, 0.6), format_=rising(0.3, 0.95), heldout=rising(0.18, 0.55),
                  length=lambda s: 50 + 2 * s, entropy=lambda s: 0.8 * math.exp(-s / 40),
                  kl=lambda s: 0.002 * s)
    assert warnings(diagnose(rows)) == {"length_exploding", "entropy_collapse", "kl_runaway"}


# -- early stopping, by hand -------------------------------------------------------------------------


ERRORS = [1.0, 0.8, 0.7, 0.72, 0.71, 0.74, 0.76, 0.78, 0.69]


def test_generalization_loss_by_hand():
    # E_opt: 1.0, 0.8, 0.7, 0.7, ...; GL(3) = 100 * (0.72 / 0.7 - 1) = 2.857; GL(7) = 100 * (0.78 / 0.7 - 1) = 11.43
    gl = generalization_loss(ERRORS)
    assert gl[:3] == [0.0, 0.0, 0.0]
    assert gl[3] == pytest.approx(2.857, abs=1e-3)
    assert gl[7] == pytest.approx(11.429, abs=1e-3)
    assert gl[8] == 0.0  # a new best


def test_gl_alpha_and_up_s_fire_where_computed_by_hand():
    # GL > 5 first at index 5 (0.74 / 0.7 -> 5.71); index 4 gives 1.43
    assert gl_alpha_stop(ERRORS, 5.0) == 5
    assert gl_alpha_stop(ERRORS, 10.0) == 7  # 11.43
    # rises: 0.7->0.72 (i=3), 0.71->0.74 (5), 0.74->0.76 (6), 0.76->0.78 (7); i=4 fell
    assert up_s_stop(ERRORS, 1) == 3
    assert up_s_stop(ERRORS, 2) == 6
    assert up_s_stop(ERRORS, 3) == 7
    assert up_s_stop(ERRORS, 4) is None


def test_early_stop_finding_reports_steps_of_the_evaluations():
    rows = [{"kind": "eval", "step": 10 * (i + 1), "val_loss": e} for i, e in enumerate(ERRORS)]
    findings = diagnose(rows, gl_alpha=5.0, up_s=3)
    assert [f.code for f in findings] == ["early_stop"] and findings[0].severity == "info"
    ev = findings[0].evidence
    assert (ev["gl_step"], ev["up_step"], ev["best_step"]) == (60, 80, 90)
    assert "improved again" in findings[0].message


def test_unknown_threshold_is_named():
    with pytest.raises(ValueError, match="did you mean gl_alpha"):
        diagnose([], gl_alpa=3)


# -- live ------------------------------------------------------------------------------------------


def test_live_monitor_reports_once_and_stops_only_when_asked():
    s = np.arange(1, STEPS + 1)
    rows = sft_run(0.1 + 2.0 * np.exp(-s / 60), lambda i: 0.8 + 0.5 * ((i - 100) / 100) ** 2)
    printed = []
    watch = LiveMonitor(log=printed.append)
    new = [f.code for r in rows for f in watch.observe(r)]
    assert sorted(new) == ["early_stop", "overfitting"] and not watch.should_stop
    assert len(printed) == 2

    stopper = LiveMonitor(stop_on={"early_stop"}, log=None)
    for r in rows:
        stopper.observe(r)
        if stopper.should_stop:
            break
    # val_loss by eval step: 100 -> 0.8 (best), 125 -> 0.83125, GL = 3.9; 150 -> 0.925, GL = 15.6 > 5
    assert r["step"] == 150 and stopper.stop_reason.code == "early_stop"


def test_live_monitor_reports_nan_on_its_row():
    watch = LiveMonitor(log=None, every=1000)
    rows = sft_run(np.full(30, 2.0))
    rows[25]["loss"] = math.inf
    hits = [(r["step"], f.code) for r in rows for f in watch.observe(r)]
    assert hits[0] == (26, "lr_too_high")


def test_live_monitor_resumed_with_history_does_not_repeat_itself():
    s = np.arange(1, STEPS + 1)
    rows = sft_run(0.1 + 2.0 * np.exp(-s / 60), lambda i: 0.8 + 0.5 * ((i - 100) / 100) ** 2)
    half = next(i for i, r in enumerate(rows) if r["step"] == 200)
    watch = LiveMonitor(log=None, history=rows[:half])
    assert watch.reported == {"overfitting", "early_stop"}
    assert [f for r in rows[half:] for f in watch.observe(r)] == []
    with pytest.raises(ValueError, match="unknown finding codes"):
        LiveMonitor(stop_on={"overfit"})
