"""metrics.jsonl, the run's record, and the progress lines printed while training and evaluating.

Each row of run_dir/metrics.jsonl is one JSON object with at least
    "kind"   what the row measures: "train" (one per step), "eval", or any other label
    "step"   the number of optimizer steps completed when it was measured
    "time"   unix time, added when the row does not carry one
and whatever values the loop measured. Values are made plain JSON: tensors and numpy values
become Python numbers (or lists), paths strings. JSON has no NaN or infinity, so non-finite
numbers are written as the strings "nan", "inf", "-inf" (a diverging loss stays visible as such)
and `read_metrics` turns those strings back into floats.

A resumed run calls `truncate_after(step)` with the checkpoint's step: rows logged after that
checkpoint by the interrupted run are dropped, so each step appears once. A line cut short by a
crash is dropped too.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from .files import write_atomic

METRICS_FILE = "metrics.jsonl"
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"metrics row field {where!r}: cannot write a {type(value).__name__} as JSON")


def _restore(value: Any) -> Any:
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [_restore(v) for v in value]
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    return value


def _complete_lines(path: Path) -> list[str]:
    """The file's newline-terminated lines; a last line without its newline was cut by a crash."""
    text = path.read_text()
    lines = text.split("\n")
    return lines[:-1]  # the piece after the last "\n": "" when the file is whole


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics.jsonl (or of run_dir/metrics.jsonl when given the directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    for i, line in enumerate(_complete_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        rows.append(_restore(row))
    return rows


class MetricsLogger:
    """Appends rows to run_dir/metrics.jsonl, one flushed line each.

    resume_step: a resumed run drops the rows logged after its checkpoint's step. fresh: a new
    run in a directory used before drops every earlier row, which would otherwise mix into its
    curves and diagnostics. write=False (every rank but 0 in multi-process training) only formats
    the rows it is given.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None, fresh: bool = False,
                 write: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.write = write
        if not write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self._rewrite([])
        elif resume_step is not None:
            self.truncate_after(resume_step)
        elif self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # appending after half a line would fuse it with the next row
                self._rewrite(_complete_lines(self.path))

    def log(self, row: Mapping[str, Any]) -> dict:
        """Append one row (it must have "kind" and "step"); returns it as `read_metrics` reads it back.

        That is what the live monitor is handed, so it sees a NaN loss as the number NaN, exactly as a
        diagnosis of the file does, not as the string the file holds it as.
        """
        missing = [k for k in ("kind", "step") if k not in row]
        if missing:
            raise ValueError(f"metrics row needs {' and '.join(repr(k) for k in missing)}: {dict(row)}")
        out = {k: _plain(v, k) for k, v in row.items()}
        out.setdefault("time", round(time.time(), 3))
        line = json.dumps(out, allow_nan=False) + "\n"
        if self.write:
            with open(self.path, "a") as f:  # closing flushes: every row is on disk as it happens
                f.write(line)
        return _restore(out)

    def truncate_after(self, step: int) -> int:
        """Drop rows whose step is greater than `step`; returns how many were dropped."""
        if not self.path.is_file():
            return 0
        keep, dropped = [], 0
        for line in _complete_lines(self.path):
            try:
                row_step = json.loads(line).get("step") if line.strip() else None
            except (json.JSONDecodeError, AttributeError):
                row_step = None
            if isinstance(row_step, (int, float)) and row_step > step:
                dropped += 1
            else:
                keep.append(line)
        self._rewrite(keep)
        return dropped

    def _rewrite(self, lines: list[str]) -> None:
        text = "".join(line + "\n" for line in lines)
        write_atomic(self.path, lambda f: Path(f).write_text(text))


# -- the progress line ------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """45s, 1m02s, 2h05m, 3d04h."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_value(name: str, value: Any) -> str:
    """`loss 1.234`, `lr 3.0e-04`, `5,123 tok/s` (a name ending in "/s" or "_per_s" is a rate)."""
    if isinstance(value, (torch.Tensor, np.generic, np.ndarray)):
        value = value.item()
    rate = name.endswith("/s") or name.endswith("_per_s")
    if rate:
        unit = name[: -len("_per_s")] + "/s" if name.endswith("_per_s") else name
        number = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return f"{number} {unit}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} {value}"
    if isinstance(value, int):
        return f"{name} {value:,}"
    if not math.isfinite(value) or value == 0:
        return f"{name} {value:g}"
    if name == "lr" or abs(value) < 1e-3:
        return f"{name} {value:.1e}"
    if abs(value) >= 1e4:
        return f"{name} {value:,.0f}"
    return f"{name} {value:.4g}"


class Progress:
    """The line printed every few steps:

        step 120/500 | loss 1.234 | lr 3.0e-04 | 5,123 tok/s | 1m02s elapsed | ETA 3m15s

    `step` is the number of steps completed. Elapsed time counts from construction. The ETA uses
    the average step time since the first `line` call, which leaves the first steps' warm-up
    (compilation, allocator growth) out; the first call can only use the time since construction.
    """

    def __init__(
        self, total_steps: int, start_step: int = 0, *, clock: Callable[[], float] = time.monotonic,
        max_seconds: float = 0.0,
    ):
        self.total_steps = total_steps
        self.max_seconds = max_seconds  # a time budget ends the run first when it is the nearer end
        self.start_step = start_step
        self.clock = clock
        self.t0 = clock()
        self._first: tuple[float, int] | None = None  # (time, step) of the first line

    def eta(self, step: int, now: float | None = None) -> float | None:
        """Seconds left until total_steps, or None before any step has been timed."""
        now = self.clock() if now is None else now
        if self._first is not None and step > self._first[1]:
            per_step = (now - self._first[0]) / (step - self._first[1])
        elif step > self.start_step:
            per_step = (now - self.t0) / (step - self.start_step)
        else:
            return None
        left = max(self.total_steps - step, 0) * per_step
        if self.max_seconds:
            left = min(left, max(self.max_seconds - (now - self.t0), 0.0))
        return left

    def line(self, step: int, **values: Any) -> str:
        now = self.clock()
        eta = self.eta(step, now)
        if self._first is None:
            self._first = (now, step)
        width = len(str(self.total_steps))
        budget_first = self.max_seconds and eta is not None and eta < max(self.total_steps - step, 0) * (
            (now - self.t0) / max(step - self.start_step, 1))
        parts = [f"step {step} (time budget {format_duration(self.max_seconds)})" if budget_first
                 else f"step {step:>{width}}/{self.total_steps}"]
        parts += [format_value(k, v) for k, v in values.items() if v is not None]
        parts.append(f"{format_duration(now - self.t0)} elapsed")
        parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        return " | ".join(parts)


def progress_lines(log: Callable[[str], None] | None, what: str, total: int, every_s: float):
    """An `eval.completions` progress callback that logs "eval: 64/200 prompts" at most every `every_s`
    seconds (none when the pass is quicker), or None without a log."""
    if log is None:
        return None
    last = time.monotonic()

    def report(done: int) -> None:
        nonlocal last
        if time.monotonic() - last >= every_s:
            log(f"eval: {done}/{total} {what}")
            last = time.monotonic()

    return report
