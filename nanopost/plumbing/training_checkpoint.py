"""Training checkpoints: everything needed to stop a run and resume it exactly.

A checkpoint is a directory that is at once a Hugging Face model directory (config.json,
safetensors weights, tokenizer files: `load_model` and transformers read it as is) and a record of
the trainer, in `trainer_state/`:

    trainer_state/state.pt     optimizer state (whole, keyed by parameter name), RNG states (torch CPU and CUDA, python `random`,
                               numpy, any named torch.Generator) and `extra`: the loop's own state,
                               e.g. {"step": 120, "data_position": 3840, "sampler": {...}}
    trainer_state/state.json   a summary for people: step, when it was saved, metrics

state.pt is read with `torch.load(weights_only=True)`, never a general unpickle, so `extra` may
hold only dicts, lists, tuples, strings, numbers, bools, None and tensors; anything else is refused
when saving rather than when resuming. The learning rate and temperature are pure functions of the
step (see schedules.py), so the step in `extra` is all the "scheduler" there is.

Crash safety: a checkpoint is written into a hidden sibling directory, fsynced, then swapped in
(the old one renamed away, the new one renamed into place, the old one deleted). A run killed at
any moment leaves either the previous checkpoint or the new one at `path`, never a mix. The one
instant between the two renames leaves no directory at `path`; the next save or load puts the
previous one back. Leftover temporary directories are removed by the next save. One process
writes a given checkpoint (in multi-process training, rank 0).

Run directory convention:

    run_dir/config.json, config.toml      the resolved config (config.save_config)
    run_dir/metrics.jsonl                 one row per step and per eval (metrics.MetricsLogger)
    run_dir/checkpoints/last              written at every checkpoint interval: resume from here
    run_dir/checkpoints/best              written when the eval metric improves: publish this

`latest_checkpoint(run_dir)` returns the checkpoint with the highest step, preferring `last`.
The run's scaffold (run.py) checks the directory before a loop writes to it (run_dir.py): a new run never replaces
an earlier one without --overwrite, and --resume continues only the same run, from a checkpoint
`resumable_checkpoint` has checked whole.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from ..model import Transformer
from .files import write_atomic
from .hf_io import load_model, save_model

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

TRAINER_DIR = "trainer_state"
STATE_FILE = "state.pt"
SUMMARY_FILE = "state.json"
FORMAT = "nanopost.trainer_state"
VERSION = 1
LAST, BEST = "last", "best"
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointError(ValueError):
    """A path that is not a checkpoint, or a checkpoint that cannot be read back."""


# -- random number generators -----------------------------------------------------------------------


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The state of every global RNG (and of the named generators), as torch.save-able values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy keeps its key as a uint32 array, which weights_only loading refuses: store int64.
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng` returned, so the next random draws repeat exactly."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A resume on fewer GPUs restores those it has; exactness needs the same device count.
        for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"no saved state for generator {name!r} (saved: {sorted(saved) or 'none'})")
        g.set_state(saved[name])


# -- saving -----------------------------------------------------------------------------------------


def _check_loadable(value: Any, where: str) -> Any:
    """`value` with numpy scalars made Python numbers; refuse what weights_only loading would."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_check_loadable(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        return {k: _check_loadable(v, f"{where}[{k!r}]") for k, v in value.items()}
    hint = " (convert it with torch.from_numpy or .tolist())" if isinstance(value, np.ndarray) else ""
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot go in a checkpoint{hint}; "
        "allowed: dict, list, tuple, str, int, float, bool, None, torch.Tensor"
    )


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _json_scalar(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _summary(extra: Mapping[str, Any]) -> dict[str, Any]:
    """state.json: the step, the time, and the scalar entries of `extra` (a metrics dict included)."""
    now = time.time()
    out: dict[str, Any] = {
        "step": extra.get("step"),
        "saved_at": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "time": now,
    }
    for key, value in extra.items():
        if key in out:
            continue
        if _scalar(value):
            out[key] = _json_scalar(value)
        elif isinstance(value, Mapping) and all(_scalar(v) for v in value.values()):
            out[key] = {str(k): _json_scalar(v) for k, v in value.items()}
    return out


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _siblings(path: Path, kind: str) -> list[Path]:
    """Temporary ("tmp") or replaced ("old") directories a save of `path` leaves beside it, oldest first."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.{kind}-"
    found = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _recover(path: Path) -> None:
    """Put the previous checkpoint back if a save stopped between renaming it away and renaming in."""
    if not path.exists():
        old = _siblings(path, "old")
        if old:
            os.rename(old[-1], path)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Write a complete checkpoint to `path`, replacing any checkpoint there only once it is whole.

    `optimizer` is the optimizer of `model`, or its state already gathered from shards
    (distributed.full_state); it is stored keyed by parameter name, whole, so it loads into
    one process, DDP or FSDP2 alike.

    `extra` is the loop's own state (put the step in extra["step"]); `generators` are named
    torch.Generators whose states are saved with the global RNGs. dtype=None keeps the weights'.

    Weights holding NaN or inf are refused (CheckpointError) before anything is touched: a
    diverged run must not replace a good `last` or `best` with a model that cannot be used.
    """
    path = Path(path)
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:
        raise CheckpointError(f"{path}: not written: {len(broken)} weight tensor(s) hold NaN or inf (the first: "
                              f"{broken[0]}), so training has diverged; the checkpoint already there, if any, is kept. "
                              "Lower the learning rate (--lr) and keep --clip-grad on.")
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    if path.exists() and not (path / TRAINER_DIR / STATE_FILE).is_file() and any(path.iterdir()):
        # Replacing means deleting: never do that to a directory that is not a checkpoint.
        raise CheckpointError(f"{path}: exists and is not a checkpoint; refusing to replace it")
    for stale in _siblings(path, "tmp") + (_siblings(path, "old") if path.exists() else []):
        shutil.rmtree(stale, ignore_errors=True)

    extra = _check_loadable(dict(extra or {}), "extra")
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = get_optimizer_state_dict(model, optimizer, options=_WHOLE)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": optimizer,
        "rng": capture_rng(generators),
        "extra": extra,
    }
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # transformers and vLLM stop where this run's sampler stops: on every end token.
        generation = {}
        if tokenizer is not None:
            stops = tokenizer.stop_token_ids
            generation = {**tokenizer.generation_config, "eos_token_id": stops if len(stops) > 1 else stops[0]}
        save_model(model, tmp, dtype=dtype, generation_config=generation)
        if tokenizer is not None:
            tokenizer.save(tmp)
        trainer = tmp / TRAINER_DIR
        trainer.mkdir()
        torch.save(state, trainer / STATE_FILE)
        summary = json.dumps(_summary(extra), indent=2) + "\n"
        write_atomic(trainer / SUMMARY_FILE, lambda f: Path(f).write_text(summary))
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# -- loading ----------------------------------------------------------------------------------------


def _read_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    file = path / TRAINER_DIR / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint (directory not found)")
    if not file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint ({file} is missing)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle opcodes, refused types: all the same to us
        raise CheckpointError(f"{path}: corrupt checkpoint: {file} cannot be read ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: corrupt checkpoint: {file} is not a nanopost trainer state")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: {file} has format version {state.get('version')}; this code reads {VERSION}"
        )
    return state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: Transformer | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint into `model` and `optimizer` (in place) and the RNGs; return `extra`.

    Weights are read (strictly, as `load_model` does) onto `device`, then copied into `model`,
    which keeps its own device and dtype; parameters keep their identity, so an optimizer built
    on them stays valid. The optimizer's state follows its parameters' devices. Tensors in the
    returned `extra` are on the CPU.
    """
    path = Path(path)
    _recover(path)
    state = _read_state(path)
    if model is not None:
        try:
            loaded = load_model(path, device=device)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt checkpoint: {e}") from None
        try:
            with torch.no_grad():
                model.load_state_dict(loaded.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the model: {e}") from None
    if optimizer is not None:
        _load_optimizer(path, state, model, optimizer)
    restore_rng(state["rng"], generators)
    return state["extra"]


def load_optimizer_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore only the optimizer of a checkpoint into `optimizer` over `model`'s parameters.

    For sharded models (FSDP2), whose optimizer exists only once the model is sharded, after
    `load_checkpoint` restored the weights into the unsharded model. Each rank keeps its shard.
    """
    path = Path(path)
    _recover(path)
    _load_optimizer(path, _read_state(path), model, optimizer)


def _load_optimizer(path: Path, state: dict[str, Any], model, optimizer: torch.optim.Optimizer) -> None:
    saved = state["optimizer"]
    if saved is None:
        raise CheckpointError(f"{path}: the checkpoint holds no optimizer state")
    try:
        params = [p for g in saved["param_groups"] for p in g["params"]]
        if all(isinstance(p, int) for p in params):  # index-keyed: the plain torch format
            optimizer.load_state_dict(saved)
        elif model is None:
            raise CheckpointError(f"{path}: the optimizer state is keyed by parameter name: pass the model")
        else:
            set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    except (ValueError, KeyError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: optimizer state does not fit the optimizer: {e}") from None


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's state.json ({} when it is missing or unreadable: it is only a summary)."""
    try:
        return json.loads((Path(path) / TRAINER_DIR / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless `path` holds a whole checkpoint: trainer state, summary, model.

    The trainer state is opened memory-mapped, so its tensors are not read: this is the quick
    look `resumable_checkpoint` takes at every checkpoint of a run before resuming.
    """
    path = Path(path)
    _recover(path)
    _read_state(path, mmap=True)
    summary = path / TRAINER_DIR / SUMMARY_FILE
    try:
        step = json.loads(summary.read_text())["step"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint: {summary} cannot be read ({e!r})") from None
    if not isinstance(step, int):
        raise CheckpointError(f"{path}: corrupt checkpoint: {summary} has no step")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: corrupt checkpoint: its model (config.json, *.safetensors) is missing")


def checkpoint_path(run_dir: str | os.PathLike, name: str = LAST) -> Path:
    """run_dir/checkpoints/<name>; name is "last", "best" or any label such as "step-000500"."""
    return Path(run_dir) / "checkpoints" / name


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint under run_dir/checkpoints with the highest step (ties: `last`), or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for child in list(root.iterdir()):  # a save interrupted between its two renames
        name, sep, _ = child.name[1:].rpartition(".old-")
        if child.name.startswith(".") and sep:
            _recover(root / name)
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not (child / TRAINER_DIR / STATE_FILE).is_file():
            continue
        step = read_summary(child).get("step")
        found.append((step if isinstance(step, int) else -1, child.name == LAST, child))
    return max(found, key=lambda t: t[:2])[2] if found else None


def resumable_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint --resume continues (`latest_checkpoint`), once every checkpoint of the run
    has been checked whole; None when there is none.

    A broken checkpoint is reported, never skipped: skipping it would silently resume from an
    older one, or start afresh.
    """
    root = Path(run_dir) / "checkpoints"
    latest = latest_checkpoint(run_dir)  # first puts back a checkpoint an interrupted save renamed away
    children = sorted(root.iterdir()) if root.is_dir() else []
    for child in children:
        if child.name.startswith(".") or not child.is_dir():  # a save's temporary directory, a stray file
            continue
        try:
            check_checkpoint(child)
        except CheckpointError as e:
            others = [c.name for c in children if c != child and (c / TRAINER_DIR / STATE_FILE).is_file()]
            here = f" (here: {', '.join(others)})" if others else ""
            raise CheckpointError(f"{e}. --resume does not train over a broken checkpoint: delete it or resume "
                                  f"from another checkpoint{here}, or start afresh with --overwrite") from None
    return latest
