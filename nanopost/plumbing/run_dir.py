"""What a run directory may be used for: a new run never replaces an old one by accident, and
--resume continues only the run the directory holds.

Checked at the start of every training run, before anything is written (run_state.start_run,
on rank 0 alone):

  * --out must be a directory this process can write, and so must its checkpoints/ folder: a
    file is created and removed in each, so a permission problem shows before step 1 rather than
    at the first save after hours of training.
  * A new run refuses a directory that holds a run (rows in metrics.jsonl, or anything in
    checkpoints/): --resume continues that run, --overwrite replaces it. --overwrite removes the
    old run's metrics.jsonl, checkpoints/ (the whole folder) and config.json/config.toml; any
    other file there (logs, plots, reports) is left alone.
  * --resume compares the saved config.json with the new options (`config_changes`). Options
    that change only how the run is watched, where it runs or where it writes (RESUME_SAFE) may
    differ, and the total steps may grow; those changes are logged. Every other option changes
    what the run means (data, model, batch, schedule, objective, seed): a difference is refused
    with the list of differences, unless --resume-override names the option.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .config import config_to_dict
from .metrics import METRICS_FILE

CONFIG_FILES = ("config.json", "config.toml")

# Options --resume may change: they decide how the run is watched, on what it runs and where it
# writes, not what it trains on or how it updates.
RESUME_SAFE = {"out", "device", "fsdp", "grad_checkpointing", "micro_batch", "val", "task",
               "eval_every", "eval_samples", "eval_k", "eval_temperature", "eval_accuracy_samples", "log_every",
               "save_every", "stop_on", "max_seconds"}
# The run's length may grow (steps past the old end are new training), not shrink.
RESUME_GROWS = {"steps", "max_steps", "epochs"}
# Per-process counts: a run may continue on another number of processes with the same global
# batch, so these are compared multiplied by the number of processes.
PER_PROCESS = {"grad_accum"}
PATHS = {"model", "train", "val"}
BOOKKEEPING = {"resume", "overwrite", "resume_override"}  # how this start was asked for, not the run


def describe_run(run: Path) -> list[str]:
    """What of an earlier run `run` holds, e.g. ["metrics.jsonl (12 rows)", "checkpoints/last"]; [] if none."""
    found = []
    metrics = run / METRICS_FILE
    if metrics.is_file():
        rows = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
        if rows:
            found.append(f"{METRICS_FILE} ({rows} rows)")
    checkpoints = run / "checkpoints"
    if checkpoints.is_dir():
        found += [f"checkpoints/{p.name}" for p in sorted(checkpoints.iterdir())]
    return found


def check_writable(run: Path) -> None:
    """Create --out and its checkpoints/ folder and write a file in each, or raise a ValueError naming the path."""
    for d in (run, run / "checkpoints"):
        if d.exists() and not d.is_dir():
            raise ValueError(f"--out {run}: {d} is a file, not a directory")
        probe = d / f".write-test-{os.getpid()}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--out {run}: cannot write in {d} ({e.strerror or e})") from None


def refuse_if_held(run: Path) -> None:
    """A new run's check: raise a ValueError when `run` holds an earlier run (nothing is written)."""
    held = describe_run(run)
    if held:
        raise ValueError(f"--out {run} already holds a run ({', '.join(held)}): continue it with --resume, "
                         "replace it with --overwrite, or choose another --out")


def clear_run(run: Path, log: Callable[..., None]) -> None:
    """--overwrite: remove an earlier run's metrics.jsonl, checkpoints/ and config; other files stay."""
    held = describe_run(run)
    if not held:
        return
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    for name in (METRICS_FILE, *CONFIG_FILES):
        (run / name).unlink(missing_ok=True)
    log(f"--overwrite: removed the earlier run in {run} ({', '.join(held)})")


def saved_config(run: Path) -> dict[str, Any] | None:
    """The run's config.json as a dict (None when there is none)."""
    path = run / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read ({e}); --resume compares it with the new options") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of options")
    return data


def _same_path(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_changes(saved: dict[str, Any], new: dict[str, Any], saved_world: int, world: int
                   ) -> list[tuple[str, str, bool]]:
    """Every option whose value differs: (key, "--option: saved → new", whether --resume may change it)."""
    changes = []
    for key, value in new.items():
        if key not in saved or key in BOOKKEEPING:
            continue  # an option newer than the saved run has nothing to compare with
        old = saved[key]
        if key in PER_PROCESS and isinstance(old, int) and isinstance(value, int):
            same = old * saved_world == value * world
        elif key in PATHS:
            same = _same_path(old, value)
        else:
            same = old == value
        if same:
            continue
        text = f"--{key.replace('_', '-')}: {_show(old)} → {_show(value)}"
        if key in PER_PROCESS:
            text += f" (with {saved_world} → {world} processes)"
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, value))
        grows = key in RESUME_GROWS and numbers and 0 < old < value
        changes.append((key, text, key in RESUME_SAFE or grows))
    return changes


def check_resume_config(cfg: Any, run: Path, saved_world: int, world: int, log: Callable[..., None]) -> None:
    """Refuse to resume with options that change what the run means, unless --resume-override names them."""
    new = config_to_dict(cfg)
    overrides = {name.lstrip("-").replace("-", "_") for name in getattr(cfg, "resume_override", [])}
    unknown = sorted(overrides - set(new))
    if unknown:
        raise ValueError(f"--resume-override: no option --{unknown[0].replace('_', '-')}")
    saved = saved_config(run)
    if saved is None:
        log(f"{run}: no saved config.json to compare the options with; resuming as configured")
        return
    changes = config_changes(saved, new, saved_world, world)
    refused = [(key, text) for key, text, safe in changes if not safe and key not in overrides]
    if refused:
        names = ",".join(key.replace("_", "-") for key, _ in refused)
        raise ValueError(f"--resume would change what the run in {run} means:\n  "
                         + "\n  ".join(text for _, text in refused)
                         + f"\nresume with the saved options ({run / 'config.toml'} holds them), name the "
                           f"options you mean to change with --resume-override {names}, or start a new run "
                           "(--overwrite, or another --out)")
    for key, text, safe in changes:
        log(f"resuming with a changed option: {text}" + ("" if safe else " (--resume-override)"))
