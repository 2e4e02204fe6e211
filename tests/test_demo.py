"""The demo pipeline at toy scale: every stage runs, the report has its parts, the base is cached."""

from demo import TOY, DemoConfig, gain, intervals_apart, run_demo, run_seeds
from nanopost.plumbing.metrics import read_metrics


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
    assert any(line.startswith("control: SFT continued for the same wall time") for line in lines)

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
    # Each seed draws its own data: the two SFT sets differ.
    assert (tmp_path / "seed-0" / "data" / "sft.jsonl").read_text() != (tmp_path / "seed-1" / "data" / "sft.jsonl").read_text()


def test_gain_and_intervals_are_read_against_the_better_rival():
    def stage(acc, lo, hi):
        return {"accuracy": acc, "accuracy_lo": lo, "accuracy_hi": hi}
    r = {"sft": stage(0.10, 0.06, 0.15), "control": stage(0.20, 0.15, 0.26), "grpo": stage(0.45, 0.39, 0.51)}
    assert abs(gain(r) - 0.25) < 1e-12 and intervals_apart(r)
    r["control"]["accuracy_hi"] = 0.40
    assert not intervals_apart(r)
