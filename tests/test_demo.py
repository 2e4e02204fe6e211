"""The demo pipeline at toy scale: every stage runs, the report has its parts, the base is cached."""

import subprocess
import sys
from pathlib import Path

from demo import TOY, DemoConfig, gain, intervals_apart, run_demo, run_seeds
from nanopost.plumbing.metrics import read_metrics

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_toy_demo_writes_a_complete_report(tmp_path):
    lines = []
    results = run_demo(DemoConfig(out=str(tmp_path), **TOY), log=lines.append)
    assert list(results) == ["base", "sft", "control", "grpo"]
    report = (tmp_path / "report.md").read_text()
    assert "| stage | greedy accuracy (95% CI) | avg@2 | pass@2 | worked out |" in report
    for stage in results:
        assert f"| {stage} |" in report
    assert "| level | base | sft | control | grpo |" in report
    assert all(f"| {lvl} |" in report for lvl in range(1, 10))
    grpo_rows = [r for r in read_metrics(tmp_path / "grpo") if r["kind"] == "train"]
    assert [r["step"] for r in grpo_rows] == [1, 2] and all("reward_accuracy_mean" in r for r in grpo_rows)
    # The worked-out share is logged beside the rewards (weight 0: it pays nothing).
    assert all(0 <= r["reward_worked_out_mean"] <= 1 for r in grpo_rows)
    # The control's budget is its steps (a time budget would not repeat), and SFT and the control
    # report held-out accuracy as they train, for the figure's shared time axis.
    assert any(line.startswith(f"control: SFT continued for {TOY['control_steps']} steps") for line in lines)
    control_rows = read_metrics(tmp_path / "control")
    assert max(r["step"] for r in control_rows if r["kind"] == "train") == TOY["control_steps"]
    for stage in ("sft", "control"):
        assert [r for r in read_metrics(tmp_path / stage) if r["kind"] == "eval" and "accuracy" in r]
    assert (tmp_path / "story.png").stat().st_size > 0 and "![the demo at a glance](story.png)" in report

    again = []
    run_demo(DemoConfig(out=str(tmp_path), **TOY), log=again.append)
    assert any(line.startswith("base model: cached") for line in again)


def test_toy_demo_over_seeds_writes_one_report_over_them(tmp_path):
    lines = []
    per_seed = run_seeds(DemoConfig(out=str(tmp_path), seeds=[0, 1], **TOY), log=lines.append)
    assert list(per_seed) == [0, 1]
    assert all((tmp_path / f"seed-{s}" / "report.md").is_file() for s in (0, 1))
    report = (tmp_path / "report.md").read_text()
    assert "| seed | sft | control | grpo | gain | apart |" in report
    for seed, r in per_seed.items():
        assert f"| {seed} | {r['sft']['accuracy']:.3f} (" in report
        assert f"| {gain(r):+.3f} |" in report
    assert "| mean ± sd | " in report
    assert "| level | seed 0 | seed 1 | mean |" in report and all(f"| {lvl} |" in report for lvl in range(1, 10))
    assert "Levels 4–6 together: " in report
    assert (tmp_path / "story.png").stat().st_size > 0 and "![the demo over seeds](story.png)" in report
    # Each seed draws its own data: the two SFT sets differ.
    assert (tmp_path / "seed-0" / "data" / "sft.jsonl").read_text() != (tmp_path / "seed-1" / "data" / "sft.jsonl").read_text()


def test_gain_and_intervals_are_read_against_the_better_rival():
    def stage(acc, lo, hi):
        return {"accuracy": acc, "accuracy_lo": lo, "accuracy_hi": hi}
    r = {"sft": stage(0.10, 0.06, 0.15), "control": stage(0.20, 0.15, 0.26), "grpo": stage(0.45, 0.39, 0.51)}
    assert abs(gain(r) - 0.25) < 1e-12 and intervals_apart(r)
    r["control"]["accuracy_hi"] = 0.40
    assert not intervals_apart(r)


def test_a_device_the_machine_lacks_is_refused_before_any_work(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "demo.py"), "--toy", "--device", "cuda:99", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --device cuda:99: ") and not proc.stdout
    assert not out.exists()
