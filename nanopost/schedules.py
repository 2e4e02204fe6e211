"""Schedules: learning rate and sampling temperature as pure functions of the step.

Being functions of the step (not objects with state), they need nothing saved to resume: the step
in the checkpoint gives the same value again. Steps count from 0; the update made at step s uses
the value at s. Every schedule is clamped: steps before 0 get the value at 0, steps past
`total_steps` get the final value.

Learning rate, `lr_at`:

    warmup   steps 0 .. W-1:   base_lr · (s + 1) / W
             (starts at base_lr / W, not 0: an update with lr 0 would be a wasted step)
    decay    steps W .. total: p = (s − W) / (total − W), from base_lr at p = 0 to
             min_lr_ratio · base_lr at p = 1 (step `total_steps`, one past the last update when the
             run makes updates 0 .. total−1, so the last update still moves the weights)
               "cosine":   min + (base − min) · ½ (1 + cos πp)
               "linear":   base − (base − min) · p
               "constant": base (min_lr_ratio unused)

Temperature, `temperature_at` (GRPO samples with it and divides the loss logits by it, so the
policy trained is the one sampled):

    "constant"          start
    "linear", "cosine"  from start at step 0 to end at step total_steps, as `anneal`
    "stages"            piecewise constant: `start` until the first stage's boundary, then each
                        stage's temperature from its boundary (inclusive) to the next one.
                        Boundaries are fractions of total_steps if every boundary is <= 1,
                        otherwise all are absolute step numbers; so a change at step 1 must be
                        written as the fraction 1/total_steps. `stage_at` is the rule, the
                        curriculum's stages follow it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KINDS = ("constant", "linear", "cosine")


def anneal(step: float, total_steps: float, start: float, end: float, kind: str = "linear") -> float:
    """From `start` at step 0 to `end` at `total_steps`; clamped outside. total_steps=0: `end`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if kind == "constant":
        return start
    p = 1.0 if total_steps == 0 else min(max(step / total_steps, 0.0), 1.0)
    if kind == "linear":
        value = start + (end - start) * p
    else:
        value = end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    # Rounding must not step outside [start, end] (e.g. a temperature of -1e-17).
    return min(max(value, min(start, end)), max(start, end))


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate for the update at `step` (see the module docstring for the formula)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    step = max(step, 0)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * anneal(step - warmup_steps, total_steps - warmup_steps, 1.0, min_lr_ratio, kind)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr; a group with an "lr_scale" entry gets lr · lr_scale."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):  # fused/capturable optimizers keep lr on device
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def temperature_at(
    step: int,
    total_steps: int,
    *,
    kind: str = "constant",
    start: float = 1.0,
    end: float = 1.0,
    stages: Sequence[tuple[float, float]] | None = None,
) -> float:
    """The sampling temperature at `step` (see the module docstring); never negative."""
    named = [("start", start), ("end", end)] + [(f"stage {i}", t) for i, (_, t) in enumerate(stages or ())]
    for name, t in named:
        if not t >= 0:  # also catches NaN
            raise ValueError(f"temperature {name} must be >= 0, got {t}")
    if kind == "stages":
        if not stages:
            raise ValueError('kind="stages" needs a non-empty list of (boundary, temperature) stages')
        return _stage_value(step, total_steps, stages, start)
    if stages:
        raise ValueError(f'stages are used only with kind="stages", got kind={kind!r}')
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS + ('stages',))}, got {kind!r}")
    return anneal(step, total_steps, start, end, kind)


def stage_at(step: float, total_steps: int, bounds: Sequence[float]) -> int:
    """How many of the increasing stage boundaries `bounds` step has reached.

    Boundaries are fractions of total_steps if every one is <= 1, otherwise all are absolute step
    numbers: step s has reached boundary b when s / total_steps >= b (or s >= b). A curriculum's
    stages end at their boundaries, so step s is in stage stage_at(s), the last past the last
    boundary; a "stages" temperature schedule's begin at theirs, so s has the temperature of
    boundary stage_at(s) - 1, and `start` before the first.
    """
    where = step / total_steps if all(b <= 1 for b in bounds) else step
    return sum(where >= b for b in bounds)


def _stage_value(step: int, total_steps: int, stages: Sequence[tuple[float, float]], start: float) -> float:
    bounds = [b for b, _ in stages]
    if not all(b >= 0 for b in bounds):  # NaN too: no step would ever reach it
        raise ValueError(f"stage boundaries must be >= 0, got {bounds}")
    if not all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:])):
        raise ValueError(f"stage boundaries must be in increasing order, got {bounds}")
    if all(b <= 1 for b in bounds) and total_steps < 1:
        raise ValueError(f"fractional stage boundaries need total_steps >= 1, got {total_steps}")
    step = min(max(step, 0), max(total_steps, 0))  # past the end: the last stage's value
    return float([start, *(t for _, t in stages)][stage_at(step, total_steps, bounds)])
