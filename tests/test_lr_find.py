"""LR range test: stops at divergence and suggests a sane lr on a known curve, and runs on SFT."""

import json
import math

import pytest

from nanopost.tools.lr_find import LRFindConfig, lr_range_test, lr_schedule, range_test, suggest
from tiny import larger_task


def synthetic_loss(lr: float) -> float:
    """2.0 at tiny lrs, falling fastest around 1e-3 (to 0.5), blowing up past 1e-2."""
    x = math.log10(lr)
    fall = 1.5 / (1 + math.exp(-3 * (x + 3)))
    blow = 20 * max(0.0, x + 2) ** 2
    return 2.0 - fall + blow + 0.01 * math.sin(37 * x)  # a little deterministic noise


def test_schedule_is_geometric_from_start_to_end():
    lrs = lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))


def test_stops_at_divergence_and_suggests_a_sane_lr():
    result = range_test(synthetic_loss, lr_schedule(1e-6, 10.0, 140), log=lambda *_: None)
    assert result.diverged and result.lrs[-1] < 1.0  # stopped well before end_lr
    assert max(result.smoothed[:-1]) <= 4 * min(result.smoothed)  # ... at the first step above 4x the minimum
    assert result.smoothed[-1] > 4 * min(result.smoothed)
    # The loss falls fastest near 1e-3 and is lowest just below 1e-2 (the EMA's lag moves it up a little).
    assert 3e-4 <= result.suggested <= 3e-3
    assert result.suggested == pytest.approx(result.min_loss_lr / 10)
    assert 3e-4 <= result.steepest_lr <= 3e-3


def test_nan_loss_stops_the_test():
    result = range_test(lambda lr: math.nan if lr > 1e-2 else 2.0 - lr, lr_schedule(1e-4, 1.0, 50),
                        log=lambda *_: None)
    assert result.diverged and math.isnan(result.losses[-1]) and result.lrs[-1] > 1e-2


def test_a_loss_that_only_rises_is_flagged():
    s = suggest([1e-5, 1e-4, 1e-3, 1e-2, 1e-1], [1.0, 1.1, 1.3, 1.8, 3.0])
    assert s["min_loss_lr"] == 1e-5 and "never fell" in s["note"]


def test_range_test_on_a_tiny_sft_run(tmp_path):
    ckpt, train, _ = larger_task(tmp_path)
    cfg = LRFindConfig(model=str(ckpt), train=str(train), out=str(tmp_path / "lrf"), start_lr=1e-4, end_lr=10.0,
                       steps=40, max_len=64, batch_rows=16, device="cpu")
    result = lr_range_test(cfg, log=lambda *_: None)
    assert result.losses[0] == pytest.approx(result.smoothed[0])
    assert 1e-4 <= result.suggested <= 1.0
    rows = (tmp_path / "lrf" / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed" and len(rows) == len(result.lrs) + 1
    assert json.loads((tmp_path / "lrf" / "lr_find.json").read_text())["suggested"] == result.suggested
