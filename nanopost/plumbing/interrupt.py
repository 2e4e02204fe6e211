"""Ctrl-C and SIGTERM stop a training run at a step boundary, with the run saved and the way back shown.

    @stop_on_signals()
    def train(cfg, log):
        ...
        while step < total:
            ...one step...
            signum = max(dist.gather(interrupt.requested()))   # every rank stops at the same step
            if signum:
                save("last")
                interrupt.stop_run(signum, step, checkpoint_path(run, "last"), cfg, log)

While a decorated function runs, the first SIGINT or SIGTERM only records the signal: the step in
progress finishes (a KeyboardInterrupt raised inside autograd or a checkpoint write would lose it
and print a traceback), the loop saves `last` and `stop_run` ends the process with 128 + the
signal number, 130 for SIGINT and 143 for SIGTERM, the statuses a shell gives a process the
signal killed. A second signal ends the process at once, saving nothing more: checkpoints are
written atomically, so the one on disk is the previous one, whole. The handlers that were there
before are put back when the function returns.

Under torchrun the agent passes a signal it gets on to every worker (and kills them 30 s later if
they are still running, so a longer step is lost there and the previous checkpoint is what stays).
Signal handlers belong to the main thread; a loop run in another thread leaves signals alone.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received = 0  # the first signal caught while a decorated function runs; 0: none


def requested() -> int:
    """The number of the signal that asked the run to stop, or 0."""
    return _received


def _handle(signum: int, frame: Any) -> None:
    global _received
    name = signal.Signals(signum).name
    say = os.environ.get("RANK", "0") == "0"  # under torchrun every rank gets the signal: one message
    # os.write, not print: a handler may interrupt a print, and the buffered writer is not reentrant.
    if _received:
        if say:
            os.write(2, f"\n{name} again: stopping now; the last checkpoint written is kept\n".encode())
        os._exit(128 + signum)
    _received = signum
    if say:
        os.write(2, f"\n{name}: finishing this step, then saving checkpoints/last (Ctrl-C again stops at once)\n".encode())


@contextlib.contextmanager
def stop_on_signals():
    """Record SIGINT/SIGTERM instead of dying of them (see the module docstring); usable as a decorator."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = 0
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _received = 0


def stop_run(signum: int, step: int, saved: Path, cfg: Any, log: Callable[..., None]) -> NoReturn:
    """Say where the run is saved and how to continue it, then exit with 128 + signum."""
    log(f"stopped by {signal.Signals(signum).name} after step {step}; saved {saved}")
    command = resume_command(cfg)
    log(f"continue with: {command}" if command else
        f"continue with the same options and --resume (--out {cfg.out})")
    raise SystemExit(128 + signum)


def resume_command(cfg: Any) -> str | None:
    """This process's command line with --resume, when it is the command line of `cfg`'s run.

    The loops also run inside other programs (the demo, experiments), whose command lines take
    no --resume; there the answer is None.
    """
    from .config import parse_config  # lazily: only on the way out

    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    try:
        again = parse_config(type(cfg), argv + ["--resume"])
    except (ValueError, SystemExit):
        return None
    if Path(again.out) != Path(cfg.out):
        return None
    if getattr(again, "overwrite", False):  # --overwrite=true and the like: one more word says no
        argv.append("--no-overwrite")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"] if world > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *argv, "--resume"])
