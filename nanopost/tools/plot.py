"""Dashboards drawn from runs' metrics.jsonl: one PNG, one panel per kind of curve.

    plot_runs(["runs/a-seed0", "runs/a-seed1", "runs/b-seed0"], "dash.png")

Panels, each drawn only when some run logged its metrics (x axis: optimizer step, shared):

    loss                   train loss, held-out val_loss (markers)
    reward                 reward_mean and each reward function's mean (reward_<name>_mean)
    held-out accuracy      accuracy (with its 95% interval for a single run), avg@k
    KL, entropy            per token
    completion length      mean, and mean of correct vs wrong completions
    truncated, zero-variance groups, grad norm, learning rate, temperature

Several runs are overlaid, one colour per group. Runs whose names differ only in a `-seedN` /
`_seedN` / `seedN` suffix form a group (as scripts/experiment.py names them), or groups are given
explicitly; a group of several runs is drawn as its mean ± one std band (over the steps all its
runs logged), so seed-to-seed spread is visible next to any difference between groups.

matplotlib is imported only when drawing (the `plot` extra); the grouping and averaging are plain
functions that work without it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..plumbing.data_files import is_number
from ..plumbing.metrics import read_metrics

MISSING = "matplotlib is needed for plots: pip install matplotlib, or the plot extra (pip install -e '.[plot]')"

# (title, [(row kind, metric name or prefix*suffix pattern)])
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("loss", [("train", "loss"), ("eval", "val_loss")]),
    ("reward", [("train", "reward_mean"), ("train", "reward_*_mean")]),
    ("held-out accuracy", [("eval", "accuracy"), ("eval", "avg@*")]),
    ("KL to reference", [("train", "kl")]),
    ("entropy", [("train", "entropy")]),
    ("completion length (tokens)", [("train", "len_mean"), ("train", "len_correct"), ("train", "len_wrong")]),
    ("truncated fraction", [("train", "truncated_frac")]),
    ("zero-variance groups", [("train", "zero_std_frac")]),
    ("grad norm", [("train", "grad_norm")]),
    ("learning rate", [("train", "lr")]),
    ("temperature", [("train", "temperature")]),
]
LINE_STYLES = ["-", "--", ":", "-."]
_SEED = re.compile(r"^(.*?)[-_]?seed\d+$")


def require_matplotlib():
    """The matplotlib Figure class, or ModuleNotFoundError saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ModuleNotFoundError(MISSING) from None
    return Figure


# -- grouping and averaging ------------------------------------------------------------------------


def seed_group(name: str) -> str:
    """"lr3e-4-seed2" -> "lr3e-4"; a name without a seed suffix is its own group."""
    m = _SEED.match(name)
    return (m.group(1) or "seeds") if m else name


def group_runs(names: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Group -> run names, in first-seen order: explicit `groups` first, the others by seed suffix."""
    out: dict[str, list[str]] = {g: list(members) for g, members in (groups or {}).items()}
    placed = {n for members in out.values() for n in members}
    unknown = placed - set(names)
    if unknown:
        raise ValueError(f"group members not among the runs: {sorted(unknown)}")
    for n in names:
        if n not in placed:
            out.setdefault(seed_group(n), []).append(n)
    return out


def metric_names(rows: Sequence[Mapping[str, Any]], kind: str, pattern: str) -> list[str]:
    """Names in rows of `kind` matching `pattern` (exact, or with one `*` wildcard)."""
    if "*" not in pattern:
        return [pattern] if any(r.get("kind") == kind and is_number(r.get(pattern)) for r in rows) else []
    head, tail = pattern.split("*", 1)
    found = {k for r in rows if r.get("kind") == kind for k, v in r.items()
             if k.startswith(head) and k.endswith(tail) and len(k) > len(head) + len(tail) and is_number(v)}
    return sorted(found - {"reward_mean"})


# What the horizontal axis counts: optimizer steps, minutes since the run's first row, or samples
# trained on so far (SFT examples, GRPO completions sampled, dropped groups included), so that runs
# whose steps cost different times or hold different numbers of samples line up.
X_AXES = {"step": "step", "minutes": "minutes of training", "samples": "samples seen"}


def series(rows: Sequence[Mapping[str, Any]], kind: str, name: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, values) of one metric; a step logged twice (a resumed run) keeps its last value."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    start = min((float(r["time"]) for r in rows if is_number(r.get("time"))), default=0.0)
    by_step: dict[float, float] = {}
    at: dict[float, float] = {}
    for r in rows:
        if r.get("kind") == kind and is_number(r.get(name)):
            step = float(r.get("step", 0))
            by_step[step] = float(r[name])
            at[step] = (float(r["time"]) - start) / 60 if is_number(r.get("time")) else math.nan
    steps = np.array(sorted(by_step))
    if x == "samples":
        return samples_seen(rows, steps), np.array([by_step[s] for s in steps])
    xs = steps if x == "step" else np.array([at[s] for s in steps])
    return xs, np.array([by_step[s] for s in steps])


def samples_seen(rows: Sequence[Mapping[str, Any]], steps: np.ndarray) -> np.ndarray:
    """Samples trained on up to and including each of `steps`, from the train rows' `samples`."""
    per_step = {float(r.get("step", 0)): float(r["samples"]) for r in rows
                if r.get("kind") == "train" and is_number(r.get("samples"))}
    if not per_step:
        raise ValueError("metrics.jsonl has no 'samples' column (a run logged before it was added): "
                         "plot it by step or minutes")
    logged = np.array(sorted(per_step))
    total = np.concatenate([[0.0], np.cumsum([per_step[s] for s in logged])])
    return total[np.searchsorted(logged, steps, side="right")]


def mean_std(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Across runs, at the steps every run logged: (steps, mean, sample std; 0 for one run)."""
    common = set(runs[0][0].tolist())
    for steps, _ in runs[1:]:
        common &= set(steps.tolist())
    steps = np.array(sorted(common))
    if not len(steps):
        return steps, steps.astype(float), steps.astype(float)
    stacked = np.stack([values[np.searchsorted(s, steps)] for s, values in runs])  # [runs, steps]
    std = stacked.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
    return steps, stacked.mean(axis=0), std


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Bias-corrected exponential moving average (weight 0: the values themselves)."""
    values = np.asarray(values, dtype=float)
    if weight <= 0:
        return values
    out, avg = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def run_names(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Each run's name: its directory's name, or parent/name when two runs share a name."""
    paths = [Path(d).resolve() for d in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> dict[str, list[dict]]:
    """Run name (see `run_names`) -> metrics rows."""
    runs = {}
    for d, name in zip(run_dirs, run_names(run_dirs)):
        rows = read_metrics(d)
        if not rows:
            raise ValueError(f"{d}: metrics.jsonl has no rows")
        runs[name] = rows
    return runs


def parse_group(spec: str) -> tuple[str, list[str]]:
    """"name=runs/a,runs/b" -> ("name", ["runs/a", "runs/b"]): an explicit group of run directories."""
    name, eq, members = spec.partition("=")
    dirs = [m for m in members.split(",") if m]
    if not eq or not name or not dirs:
        raise ValueError(f"--group {spec!r}: expected NAME=RUN_DIR[,RUN_DIR...]")
    return name, dirs


# -- drawing -----------------------------------------------------------------------------------------


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
              groups: Mapping[str, Sequence[str]] | None = None, smooth: float = 0.0,
              title: str | None = None, x: str = "step") -> Path:
    """Draw the dashboard of `run_dirs` into the PNG `out`; returns its path.

    groups: name -> run names (directory names) drawn as one mean ± std band; runs not listed
    are grouped by seed suffix. smooth: EMA weight for train curves (0: raw). x: "step",
    "minutes" or "samples" (X_AXES).
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    Figure = require_matplotlib()
    runs = load_runs(run_dirs)
    for d, rows in zip(run_dirs, runs.values()):
        if x == "samples":
            try:
                samples_seen(rows, np.array([]))
            except ValueError as e:
                raise ValueError(f"{d}: {e}") from None
    grouped = group_runs(list(runs), groups)
    all_rows = [r for rows in runs.values() for r in rows]
    panels = []
    for title_, metrics in PANELS:
        names = [(kind, n) for kind, pattern in metrics for n in metric_names(all_rows, kind, pattern)]
        if names:
            panels.append((title_, names))
    if not panels:
        raise ValueError("no known metric in these runs: nothing to plot")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    colors = [f"C{i % 10}" for i in range(len(grouped))]
    for ax, (panel_title, names) in zip(axes, panels):
        for (kind, name), style in zip(names, _styles(len(names))):
            for (group, members), color in zip(grouped.items(), colors):
                _draw(ax, [series(runs[m], kind, name, x) for m in members], kind, name, color, style,
                      smooth if kind == "train" else 0.0, runs[members[0]] if len(members) == 1 else None, x)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        if panel_title in ("learning rate", "KL to reference") and _spans_decades(ax):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # a flat 0.2 reads 0.2, not 1e-13 + 2e-1
        if len(names) > 1:
            handles = [ax.plot([], [], color="0.3", linestyle=s, marker="o" if k == "eval" else None,
                               label=n)[0] for (k, n), s in zip(names, _styles(len(names)))]
            ax.legend(handles=handles, fontsize=7, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(panels) - ncols): len(panels)]:  # the lowest panel of each column
        ax.set_xlabel(X_AXES[x])
        ax.tick_params(labelbottom=True)
    group_handles = [axes[0].plot([], [], color=c, linewidth=3,
                                  label=f"{g} ({len(m)} runs, mean ± std)" if len(m) > 1 else g)[0]
                     for (g, m), c in zip(grouped.items(), colors)]
    fig.legend(handles=group_handles, loc="outside upper center", ncols=min(4, len(group_handles)), fontsize=9)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _styles(n: int) -> list[str]:
    return [LINE_STYLES[i % len(LINE_STYLES)] for i in range(n)]


def _spans_decades(ax) -> bool:
    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float)]
    return bool(ys) and min(ys) > 0 and max(ys) > 10 * min(ys)


def _draw(ax, runs, kind, name, color, style, smooth, single_rows, x="step") -> None:
    """One group's curve of one metric: a mean ± std band for several runs, else the run's line."""
    runs = [(s, v) for s, v in runs if len(s)]
    if not runs:
        return
    marker = "o" if kind == "eval" else None
    steps, mean, std = mean_std(runs)
    if len(runs) > 1 and len(steps):
        mean = ema(mean, smooth)
        ax.plot(steps, mean, color=color, linestyle=style, marker=marker, markersize=3, linewidth=1.2)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        return
    for s, v in runs:  # one run, or runs without a common step: each line on its own
        ax.plot(s, ema(v, smooth), color=color, linestyle=style, marker=marker, markersize=3, linewidth=1.0)
    if single_rows is not None and name == "accuracy":  # the Wilson interval of a single run
        lo_s, lo = series(single_rows, "eval", "accuracy_lo", x)
        hi_s, hi = series(single_rows, "eval", "accuracy_hi", x)
        if len(lo) and np.array_equal(lo_s, hi_s):
            ax.fill_between(lo_s, lo, hi, color=color, alpha=0.12, linewidth=0)


def plot_lr_curve(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                  suggested: Mapping[str, float], out: str | os.PathLike) -> Path:
    """Loss against learning rate (log x) for the range test, with the suggested lrs marked."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, losses, color="0.7", linewidth=0.8, label="loss")
    ax.plot(lrs, smoothed, color="C0", linewidth=1.5, label="smoothed")
    for (label, lr), style in zip(suggested.items(), LINE_STYLES[1:]):
        ax.axvline(lr, color="C3", linestyle=style, linewidth=1, label=f"{label}: {lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
