"""Dashboards: seed groups, mean ± std across runs, and a PNG written for a small run."""

import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanopost.plumbing.metrics import MetricsLogger
from nanopost.tools.plot import group_runs, mean_std, metric_names, seed_group, series

ROOT = Path(__file__).resolve().parents[1]


def test_seed_suffixes_make_groups():
    assert seed_group("lr3e-4-seed2") == "lr3e-4"
    assert seed_group("base_seed10") == "base"
    assert seed_group("runseed1") == "run"
    assert seed_group("seedless") == "seedless"
    names = ["a-seed0", "b", "a-seed1", "c-seed0"]
    assert group_runs(names) == {"a": ["a-seed0", "a-seed1"], "b": ["b"], "c": ["c-seed0"]}
    assert group_runs(names, {"mine": ["b", "c-seed0"]}) == {"mine": ["b", "c-seed0"], "a": ["a-seed0", "a-seed1"]}
    with pytest.raises(ValueError, match="not among the runs"):
        group_runs(names, {"x": ["zzz"]})


def test_mean_std_over_the_steps_every_run_logged():
    runs = [(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0])), (np.array([2, 3, 4]), np.array([4.0, 6.0, 8.0]))]
    steps, mean, std = mean_std(runs)
    assert steps.tolist() == [2, 3]
    assert mean.tolist() == [3.0, 4.5]
    np.testing.assert_allclose(std, [np.std([2, 4], ddof=1), np.std([3, 6], ddof=1)])


def test_reward_functions_get_their_own_curves():
    rows = [{"kind": "train", "step": 1, "reward_mean": 1.0, "reward_accuracy_mean": 0.5, "reward_format_mean": 1.0,
             "reward_format_std": 0.0}]
    assert metric_names(rows, "train", "reward_*_mean") == ["reward_accuracy_mean", "reward_format_mean"]
    assert metric_names(rows, "eval", "accuracy") == []


def test_minutes_put_runs_of_different_step_costs_on_one_axis():
    # SFT: a step every 6 s; GRPO: a step every 60 s. By step they differ tenfold, by time not at all.
    sft = [{"kind": "train", "step": s, "loss": 1.0 / s, "time": 1000.0 + 6 * s} for s in range(1, 11)]
    grpo = [{"kind": "train", "step": s, "loss": 1.0 / s, "time": 5000.0 + 60 * s} for s in range(1, 11)]
    sft.append({"kind": "train", "step": 10, "loss": 0.05, "time": 1080.0})  # resumed: the last value wins
    assert series(sft, "train", "loss")[0].tolist() == list(range(1, 11))
    minutes, values = series(sft, "train", "loss", x="minutes")
    np.testing.assert_allclose(minutes, [0.1 * (s - 1) for s in range(1, 10)] + [(1080.0 - 1006.0) / 60])
    assert values[-1] == 0.05
    np.testing.assert_allclose(series(grpo, "train", "loss", x="minutes")[0], [s - 1 for s in range(1, 11)])
    with pytest.raises(ValueError, match="x must be one of step, minutes, samples"):
        series(sft, "train", "loss", x="epochs")


def test_samples_count_what_each_run_trained_on_up_to_each_row():
    # SFT: 32 examples a step; GRPO: 8 prompts x 8 completions a step; evaluations at steps 0 and 2.
    sft = [{"kind": "train", "step": s, "loss": 1.0 / s, "samples": 32} for s in range(1, 4)]
    sft.append({"kind": "train", "step": 3, "loss": 0.2, "samples": 30})  # resumed: the last row counts
    grpo = [{"kind": "eval", "step": 0, "accuracy": 0.1}]
    grpo += [{"kind": "train", "step": s, "reward_mean": s / 10, "samples": 64} for s in (1, 2)]
    grpo.append({"kind": "eval", "step": 2, "accuracy": 0.3})
    assert series(sft, "train", "loss", x="samples")[0].tolist() == [32, 64, 94]
    assert series(grpo, "train", "reward_mean", x="samples")[0].tolist() == [64, 128]
    assert series(grpo, "eval", "accuracy", x="samples")[0].tolist() == [0, 128]
    old = [{"kind": "train", "step": 1, "loss": 1.0}]
    with pytest.raises(ValueError, match="no 'samples' column"):
        series(old, "train", "loss", x="samples")


def test_plot_script_names_a_run_without_samples(tmp_path):
    run = tmp_path / "old"
    MetricsLogger(run).log({"kind": "train", "step": 1, "loss": 1.0})
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot.py"), str(run), "--x", "samples",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == f"error: {run}: metrics.jsonl has no 'samples' column " \
        "(a run logged before it was added): plot it by step or minutes\n"
    assert not (tmp_path / "x.png").exists()


def write_run(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    log = MetricsLogger(path)
    for step in range(1, 31):
        log.log({"kind": "train", "step": step, "loss": 2.0 / step + 0.05 * rng.random(), "lr": 1e-3,
                 "grad_norm": 1.0, "reward_mean": step / 30, "reward_format_mean": 0.5, "entropy": 0.5,
                 "len_mean": 40.0, "len_correct": 35.0, "len_wrong": 45.0, "truncated_frac": 0.0,
                 "zero_std_frac": 0.1, "temperature": 1.0, "samples": 32})
        if step % 10 == 0:
            log.log({"kind": "eval", "step": step, "accuracy": step / 40, "accuracy_lo": step / 50,
                     "accuracy_hi": step / 35, "val_loss": 2.5 / step})
    return path


def test_plot_script_writes_a_png(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib, or the plot extra)")
    runs = [write_run(tmp_path / f"a-seed{s}", s) for s in range(2)] + [write_run(tmp_path / "b", 5)]
    out = tmp_path / "dash.png"
    # the script itself, run in this process (a fresh interpreter would spend seconds importing torch)
    for x in ("step", "minutes", "samples"):
        monkeypatch.setattr(sys, "argv", ["plot.py", *map(str, runs), "--out", str(out), "--x", x])
        runpy.run_path(str(ROOT / "scripts" / "plot.py"), run_name="__main__")
        assert f"wrote {out}" in capsys.readouterr().out
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_missing_matplotlib_says_how_to_install_it(monkeypatch):
    import nanopost.tools.plot as plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ModuleNotFoundError, match="pip install matplotlib, or the plot extra"):
        plot.require_matplotlib()
