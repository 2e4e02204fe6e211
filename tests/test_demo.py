"""The demo pipeline at toy scale: every stage runs, the report has its parts, the base is cached."""

from demo import TOY, DemoConfig, run_demo
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
