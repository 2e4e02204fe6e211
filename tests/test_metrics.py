"""metrics.jsonl rows (conversion, non-finite values, resume truncation) and the progress line."""

import json
import math

import numpy as np
import pytest
import torch

from nanopost.plumbing.metrics import MetricsLogger, Progress, format_duration, format_value, read_metrics


def test_rows_are_plain_json_lines(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log({"kind": "train", "step": 1, "loss": torch.tensor(1.5), "n": np.int64(3), "acc": np.float32(0.25),
             "rewards": {"accuracy": torch.tensor([0.5, 1.0])}, "path": tmp_path / "x"})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    row = json.loads(line)
    assert row["loss"] == 1.5 and row["n"] == 3 and row["acc"] == 0.25
    assert row["rewards"] == {"accuracy": [0.5, 1.0]} and row["path"] == str(tmp_path / "x")
    assert isinstance(row["time"], float)
    assert read_metrics(tmp_path) == [row]


def test_non_finite_values_are_strings_in_the_file_and_floats_when_read(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log({"kind": "train", "step": 1, "loss": float("nan"), "grad_norm": torch.tensor(float("inf")),
             "neg": -math.inf, "time": 0.0})
    raw = (tmp_path / "metrics.jsonl").read_text()
    assert '"loss": "nan"' in raw and '"grad_norm": "inf"' in raw and '"neg": "-inf"' in raw
    json.loads(raw)  # standard JSON: no bare NaN / Infinity tokens
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert math.isnan(row["loss"]) and row["grad_norm"] == math.inf and row["neg"] == -math.inf


def test_rows_need_kind_and_step(tmp_path):
    with pytest.raises(ValueError, match="metrics row needs 'kind'"):
        MetricsLogger(tmp_path).log({"step": 1, "loss": 1.0})
    with pytest.raises(TypeError, match="field 'obj'"):
        MetricsLogger(tmp_path).log({"kind": "train", "step": 1, "obj": object()})


def test_resume_truncates_rows_after_the_checkpoint_step(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 7):
        log.log({"kind": "train", "step": step, "loss": 1.0 / step})
        if step % 3 == 0:
            log.log({"kind": "eval", "step": step, "acc": 0.1 * step})
    # killed after step 6, the last checkpoint was at step 3: steps 4.. will be run again
    resumed = MetricsLogger(tmp_path, resume_step=3)
    rows = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    resumed.log({"kind": "train", "step": 4, "loss": 0.2})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 3, 4]
    assert resumed.truncate_after(1) == 4


def test_line_cut_by_a_crash_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert [r["step"] for r in read_metrics(path)] == [1]
    MetricsLogger(tmp_path).log({"kind": "train", "step": 2})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_corrupt_line_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: invalid JSON"):
        read_metrics(path)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_line_format_and_eta():
    clock = FakeClock()
    progress = Progress(500, clock=clock)
    clock.now += 12.4  # step 1 took long (warm-up)
    first = progress.line(1, loss=2.0)
    assert first.startswith("step   1/500 | loss 2 |")
    assert "12s elapsed" in first
    clock.now += 49.6  # then 0.5 s per step for steps 2..100
    line = progress.line(100, loss=1.2345, lr=3e-4, tok_per_s=5123.4)
    # ETA from the time since the first line: 49.6 s / 99 steps * 400 steps left = 200.4 s
    assert line == "step 100/500 | loss 1.234 | lr 3.0e-04 | 5,123 tok/s | 1m02s elapsed | ETA 3m20s"


def test_progress_eta_on_the_first_line_and_at_the_end():
    clock = FakeClock()
    progress = Progress(100, start_step=40, clock=clock)
    assert progress.line(40).endswith("ETA ?")  # nothing timed yet
    progress = Progress(100, start_step=40, clock=clock)
    clock.now += 20.0
    assert progress.line(50).endswith("20s elapsed | ETA 1m40s")  # 2 s/step for 10 steps, 50 left
    clock.now += 10.0
    assert progress.line(100).endswith("ETA 0s")


def test_value_and_duration_formats():
    assert format_value("loss", 0.0) == "loss 0"
    assert format_value("kl", 1.23e-5) == "kl 1.2e-05"
    assert format_value("tokens", 1234567) == "tokens 1,234,567"
    assert format_value("grad_norm", float("nan")) == "grad_norm nan"
    assert format_value("samples/s", 2.5) == "2.5 samples/s"
    assert format_value("loss", torch.tensor(0.5)) == "loss 0.5"
    assert format_value("mode", "train") == "mode train"
    assert [format_duration(s) for s in (0, 59.4, 62, 3600 * 2 + 300, 86400 * 3 + 3600 * 4)] == [
        "0s", "59s", "1m02s", "2h05m", "3d04h"]


def test_a_fresh_run_drops_the_rows_of_an_earlier_run(tmp_path):
    old = MetricsLogger(tmp_path)
    for step in (0, 0, 5):
        old.log({"kind": "eval", "step": step, "accuracy": 0.9})
    new = MetricsLogger(tmp_path, resume_step=0, fresh=True)
    assert read_metrics(tmp_path) == []
    new.log({"kind": "eval", "step": 0, "accuracy": 0.1})
    assert [r["accuracy"] for r in read_metrics(tmp_path)] == [0.1]
