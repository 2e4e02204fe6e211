"""Learning-rate and temperature schedules: values worked out by hand at boundaries and midpoints."""

import math

import pytest
import torch

from nanopost.schedules import anneal, lr_at, set_lr, temperature_at


def test_warmup_is_linear_and_starts_above_zero():
    # warmup 4: step s gets base * (s + 1) / 4, so 0.25, 0.5, 0.75, then 1.0 at the first decay step
    lrs = [lr_at(s, base_lr=1.0, total_steps=10, warmup_steps=4) for s in range(5)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_decay_hits_midpoint_and_floor():
    kw = dict(base_lr=2.0, total_steps=12, warmup_steps=2, min_lr_ratio=0.1)
    # decay runs over steps 2..12 (10 steps); at step 7, p = 0.5, cos(pi/2) = 0:
    # min + (base - min) * 0.5 = 0.2 + 1.8 * 0.5 = 1.1
    assert lr_at(7, **kw) == pytest.approx(1.1)
    assert lr_at(2, **kw) == 2.0
    assert lr_at(12, **kw) == pytest.approx(0.2)
    # p = 0.25 at step 4.5 is not a step; step 4 is p = 0.2: 0.2 + 1.8 * 0.5 * (1 + cos(0.2 pi))
    assert lr_at(4, **kw) == pytest.approx(0.2 + 0.9 * (1 + math.cos(0.2 * math.pi)))


def test_linear_and_constant_decay():
    assert lr_at(5, base_lr=1.0, total_steps=10, kind="linear") == pytest.approx(0.5)
    assert lr_at(5, base_lr=1.0, total_steps=10, kind="linear", min_lr_ratio=0.2) == pytest.approx(0.6)
    assert lr_at(9, base_lr=1.0, total_steps=10, kind="linear") == pytest.approx(0.1)  # last update > 0
    assert lr_at(0, base_lr=3e-4, total_steps=10, kind="constant") == 3e-4
    assert lr_at(9, base_lr=3e-4, total_steps=10, kind="constant", min_lr_ratio=0.5) == 3e-4
    assert lr_at(0, base_lr=3e-4, total_steps=10, warmup_steps=3, kind="constant") == pytest.approx(1e-4)


def test_lr_is_clamped_outside_the_run():
    kw = dict(base_lr=1.0, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(10, **kw) == pytest.approx(0.1)
    assert lr_at(1000, **kw) == pytest.approx(0.1)
    assert lr_at(-5, **kw) == lr_at(0, **kw) == 0.5


def test_all_warmup_run():
    assert lr_at(3, base_lr=1.0, total_steps=4, warmup_steps=4) == 1.0
    assert lr_at(4, base_lr=1.0, total_steps=4, warmup_steps=4, min_lr_ratio=0.5) == 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_steps=0), "total_steps must be >= 1"),
    (dict(total_steps=5, warmup_steps=6), "warmup_steps must be in"),
    (dict(total_steps=5, min_lr_ratio=1.5), "min_lr_ratio must be in"),
    (dict(total_steps=5, kind="step"), "kind must be one of"),
])
def test_lr_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_at(1, base_lr=1.0, **kwargs)


def test_set_lr_sets_every_group_and_respects_lr_scale():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 2e-4)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, pytest.approx(2e-5)]


def test_anneal_endpoints_and_midpoints():
    assert anneal(0, 10, 1.0, 0.0, "linear") == 1.0
    assert anneal(5, 10, 1.0, 0.0, "linear") == 0.5
    assert anneal(10, 10, 1.0, 0.0, "cosine") == 0.0
    assert anneal(5, 10, 1.0, 0.0, "cosine") == pytest.approx(0.5)  # cos(pi/2) = 0: halfway
    assert anneal(20, 10, 1.0, 3.0, "linear") == 3.0 and anneal(-1, 10, 1.0, 3.0, "linear") == 1.0
    assert anneal(3, 0, 1.0, 3.0, "linear") == 3.0  # a zero-length schedule is already at its end


def test_anneal_is_clamped_and_cosine_is_slow_at_both_ends():
    assert anneal(0, 100, 1.0, 0.0) == 1.0
    assert anneal(50, 100, 1.0, 0.0) == 0.5
    assert anneal(100, 100, 1.0, 0.0) == 0.0
    assert anneal(500, 100, 1.0, 0.0) == 0.0
    assert anneal(-5, 100, 1.0, 0.0) == 1.0
    assert anneal(50, 100, 1.0, 0.0, kind="cosine") == pytest.approx(0.5)
    assert anneal(10, 100, 1.0, 0.0, kind="cosine") > anneal(10, 100, 1.0, 0.0)
    assert anneal(1000, 100, 0.2, 0.8, kind="cosine") == pytest.approx(0.8)
    assert anneal(3, 0, 1.0, 0.0) == 0.0
    assert anneal(30, 100, 0.7, 0.1, kind="constant") == 0.7


def test_anneal_rejects_an_unknown_kind_and_a_negative_length():
    with pytest.raises(ValueError, match="kind must be one of"):
        anneal(1, 10, 1.0, 0.0, kind="exp")
    with pytest.raises(ValueError, match="total_steps must be >= 0"):
        anneal(1, -10, 1.0, 0.0)


def test_temperature_constant_linear_cosine():
    assert temperature_at(50, 100) == 1.0
    assert temperature_at(50, 100, kind="constant", start=0.7, end=0.1) == 0.7
    assert temperature_at(25, 100, kind="linear", start=1.2, end=0.4) == pytest.approx(1.0)  # 1.2 - 0.8/4
    # cosine at p = 0.25: 0.4 + 0.8 * 0.5 * (1 + cos(pi/4))
    expected = 0.4 + 0.4 * (1 + math.cos(math.pi / 4))
    assert temperature_at(25, 100, kind="cosine", start=1.2, end=0.4) == pytest.approx(expected)
    assert temperature_at(500, 100, kind="linear", start=1.2, end=0.4) == pytest.approx(0.4)


def test_temperature_never_negative():
    for step in range(0, 101):
        assert temperature_at(step, 100, kind="cosine", start=1.0, end=0.0) >= 0.0
    with pytest.raises(ValueError, match="temperature end must be >= 0"):
        temperature_at(0, 100, kind="linear", end=-0.1)
    with pytest.raises(ValueError, match="temperature stage 1 must be >= 0"):
        temperature_at(0, 100, kind="stages", stages=[(0.0, 1.0), (0.5, -1.0)])


def test_temperature_stages_as_fractions():
    stages = [(0.3, 0.8), (0.6, 0.5)]
    # before 30% of 10 steps: start; from step 3 (inclusive): 0.8; from step 6: 0.5; clamped after the end
    values = [temperature_at(s, 10, kind="stages", start=1.0, stages=stages) for s in range(12)]
    assert values == [1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert temperature_at(10, 10, kind="stages", stages=[(1.0, 0.2)]) == 0.2  # boundary 1 = the end


def test_temperature_stages_as_absolute_steps():
    stages = [(0, 1.2), (100, 0.9), (250, 0.6)]  # a boundary > 1 makes every boundary a step
    assert temperature_at(0, 300, kind="stages", stages=stages) == 1.2
    assert temperature_at(99, 300, kind="stages", stages=stages) == 1.2
    assert temperature_at(100, 300, kind="stages", stages=stages) == 0.9
    assert temperature_at(250, 300, kind="stages", stages=stages) == 0.6
    assert temperature_at(10_000, 300, kind="stages", stages=stages) == 0.6


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="stages"), "needs a non-empty list"),
    (dict(kind="linear", stages=[(0.5, 1.0)]), 'only with kind="stages"'),
    (dict(kind="stages", stages=[(0.6, 1.0), (0.5, 0.7)]), "increasing order"),
    (dict(kind="stages", stages=[(float("nan"), 1.0)]), "must be >= 0"),  # a boundary no step reaches
    (dict(kind="exp"), "kind must be one of"),
])
def test_temperature_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        temperature_at(1, 10, **kwargs)
