"""The scaffold of a training run, the same for SFT and GRPO.

    run = Run(cfg, log, monitor)         # processes, seed, the run directory, the checkpoint to resume
    tokenizer = run.load_tokenizer()     # --model's, in --chat-format; logs the tokens sampling stops on
    trained, optimizer, saved = run.prepare(model)   # its weights and optimizer state, DDP / FSDP2
    run.restore_rollouts(saved, sampler, generator, scorer, reference)   # GRPO: what rollouts continue from
    run.begin(step, total, data, model)  # the start-of-run summary, metrics.jsonl, the live monitor
    while step < total:
        ... one step ...
        run.record(row)                  # metrics.jsonl, the monitor; a non-finite loss ends the run
        total = run.end_step(step, total, save)   # Ctrl-C / SIGTERM, --stop-on, --max-seconds, checkpoints

`save(name)` is the loop's own: it gathers what its checkpoint holds besides the weights and the
optimizer (GRPO's includes `run.rollout_state(...)`), and hands it to
`run.save(name, model, optimizer, tokenizer, extra)`.

`monitor` watches the rows as they come (the scripts pass nanopost.tools.monitor.LiveMonitor): it
is called as monitor(stop_on=..., log=..., history=...) and what it returns has observe(row),
should_stop and stop_reason. Without one nothing is watched, and --stop-on is refused.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..model import Transformer
from . import distributed, interrupt
from .config import save_config
from .hf_io import load_model, load_tokenizer, save_model
from .metrics import MetricsLogger, Progress, read_metrics
from .run_dir import check_resume_config, check_writable, clear_run, describe_run, refuse_if_held
from .run_summary import stop_tokens_line, summary_lines
from .runtime import make_optimizer, release_memory_in_backward, seed_everything
from .tokenizer import Tokenizer
from .training_checkpoint import (checkpoint_path, load_checkpoint, load_optimizer_state, read_summary,
                                  resumable_checkpoint, save_checkpoint)

# What a run's monitor can find; --stop-on names some of them (nanopost.tools.monitor says what each means).
FINDINGS = ("overfitting", "reward_hacking", "length_exploding", "length_collapsing", "entropy_collapse",
            "kl_runaway", "lr_too_low", "lr_too_high", "no_learning", "no_signal", "early_stop")


def check_stop_on(codes: Iterable[str]) -> set[str]:
    """The finding codes a run may stop on; an unknown code is an error listing the known ones."""
    unknown = set(codes) - set(FINDINGS)
    if unknown:
        raise ValueError(f"--stop-on: unknown finding codes {sorted(unknown)}; known: {', '.join(FINDINGS)}")
    return set(codes)


class Diverged(ValueError):
    """Training produced a non-finite loss or gradient norm (a ValueError: scripts print one line, exit 2)."""


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def stop_if_diverged(row: Mapping[str, Any], lr: float) -> None:
    """Raise Diverged when a train row's loss or gradient norm is NaN or infinite.

    The optimizer has then stepped on non-finite gradients, so the weights can no longer be
    trusted and every later step would be NaN as well. The run ends there, whatever --stop-on says,
    and writes no checkpoint from those weights; the checkpoints written before it are kept.
    """
    def bad_value(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)

    bad = {k: row[k] for k in ("loss", "grad_norm", "reward_mean") if bad_value(row.get(k))}
    if not bad.keys() & {"loss", "grad_norm"}:
        return
    if "reward_mean" in bad:
        advice = "The rewards are not finite: check the reward functions (and reward models) on a few completions."
    else:
        advice = (f"Lower the learning rate (--lr {_fmt(lr)}: try {_fmt(lr / 10)}), lengthen --warmup-steps and keep "
                  "--clip-grad on; under bf16, --precision fp32 tells an overflow from a learning rate too high.")
    shown = ", ".join(f"{k} {v}" for k, v in bad.items())
    raise Diverged(f"training diverged at step {row.get('step')}: {shown}. Its weights can no longer be trusted, so "
                   f"the run stops without saving them; checkpoints written before this step are kept. {advice}")


def _open_run_dir(cfg: Any, run: Path, world: int, log: Callable[..., None]) -> Path | None:
    """Check --out and write its config (run_dir: a new run never replaces an old one by accident,
    --resume continues only the same run); returns the checkpoint to resume from, or None."""
    overwrite = getattr(cfg, "overwrite", False)
    if cfg.resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    resume_from = None
    if cfg.resume:
        resume_from = resumable_checkpoint(run)
        held = describe_run(run)
        if resume_from is None and held:
            raise ValueError(f"--resume: {run} holds no checkpoint to resume from, only {', '.join(held)}; "
                             "start it afresh with --overwrite, or choose another --out")
    elif not overwrite:
        refuse_if_held(run)  # before anything is written
    check_writable(run)
    if resume_from is not None:
        # The options are compared before the new ones are saved over the old.
        check_resume_config(cfg, run, read_summary(resume_from).get("world", world), world, log)
    elif cfg.resume:
        log(f"{run}: no checkpoint to resume from; starting fresh")
    elif overwrite:
        clear_run(run, log)
    save_config(cfg, run)
    return resume_from


def start_run(cfg: Any, log: Callable[..., None]) -> tuple[distributed.Dist, Path, Path | None, Callable[..., None]]:
    """Join the process group (under torchrun), seed, check the run directory and write its config,
    find the checkpoint to resume from; returns (dist, run_dir, checkpoint or None, log for this rank).

    Rank 0 alone checks and writes the directory and looks for the checkpoint (finding one may
    repair an interrupted save); the others are told which, or what was wrong, and stop with it.
    """
    dist = distributed.setup(cfg.device)
    log = dist.main_only(log)
    seed_everything(cfg.seed)
    run = Path(cfg.out)
    resume_from, problem = None, None
    if dist.main:
        try:
            resume_from = _open_run_dir(cfg, run, dist.world, log)
        except ValueError as e:
            problem = e
    resume_from, message = dist.broadcast((resume_from, None if problem is None else str(problem)))
    if problem is not None:
        raise problem
    if message is not None:
        raise ValueError(message)
    if cfg.fsdp and not dist.active:
        log("--fsdp shards over the processes of a torchrun job; a single process trains the whole model")
    return dist, run, resume_from, log


def prepare_training(model: Transformer, cfg: Any, dist: distributed.Dist, resume_from: Path | None
                     ) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Weights from the checkpoint, the data-parallel wrapper, AdamW and its saved state.

    The order matters under FSDP2: weights go into the whole model before it is sharded, and
    the optimizer exists (and can take its state) only once the parameters are the shards.
    Returns (the module to train through, the optimizer, the checkpoint's `extra`, {} if none).
    """
    extra = {} if resume_from is None else load_checkpoint(resume_from, model=model, device=dist.device)
    wrapped = distributed.wrap(model, dist, fsdp=cfg.fsdp)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    if resume_from is not None:
        load_optimizer_state(resume_from, model, optimizer)
    return wrapped, optimizer, extra


class Run:
    """One training run's scaffold; see the module docstring. Every process of a torchrun job
    builds one; rank 0 alone logs and writes."""

    def __init__(self, cfg: Any, log: Callable[..., None], monitor: Callable[..., Any] | None = None):
        if cfg.stop_on and monitor is None:
            raise ValueError("--stop-on needs a monitor to watch the run: pass monitor= "
                             "(the scripts pass nanopost.tools.monitor.LiveMonitor)")
        self.cfg = cfg
        self.dist, self.dir, self.resume_from, self.log = start_run(cfg, log)
        self.device = self.dist.device
        self.make_monitor = monitor
        self.monitor = None
        self.metrics: MetricsLogger | None = None

    def load_tokenizer(self) -> Tokenizer:
        """--model's tokenizer, rendering chats as --chat-format says. The tokens sampling stops on
        (and the saved checkpoints declare) are logged at once: finding them recognises the chat
        template, so one that cannot be used fails before anything else."""
        tokenizer = load_tokenizer(self.cfg.model, chat_format=self.cfg.chat_format)
        self.log(stop_tokens_line(tokenizer))
        return tokenizer

    def prepare(self, model: Transformer) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
        """(the module to train through, AdamW, what the checkpoint saved besides, {} if none).
        The model recomputes activations in its backward under --grad-checkpointing (only forwards
        that record gradients do), and frees memory as the backward passes through it."""
        model.grad_checkpointing = self.cfg.grad_checkpointing
        release_memory_in_backward(model, self.device)
        return prepare_training(model, self.cfg, self.dist, self.resume_from)

    def save(self, name: str, model: Transformer, optimizer: torch.optim.Optimizer, tokenizer: Tokenizer,
             extra: dict[str, Any], reference: Transformer | None = None) -> Path | None:
        """Write checkpoint `name` (checkpoints/NAME: whole weights, optimizer, tokenizer, `extra`, and
        a `reference` model given in NAME/reference). Every process calls it, since gathering FSDP2
        shards is a collective; rank 0 alone writes, and gets the checkpoint's path back (the others None)."""
        whole = distributed.full_state(model, optimizer, self.dist)
        if not self.dist.main:
            return None
        path = checkpoint_path(self.dir, name)
        save_checkpoint(path, model=whole[0], tokenizer=tokenizer, optimizer=whole[1], extra=extra)
        if reference is not None:
            save_model(reference, path / "reference")
        return path

    # -- what GRPO's rollouts continue from: the sampler's state, each process's sampling stream and
    # reward statistics (a model reward's running mean and std), the KL reference once it has moved

    def rollout_state(self, sampler: Any, generator: torch.Generator, scorer: Any) -> dict[str, Any]:
        """The entries of a GRPO checkpoint's `extra` that `restore_rollouts` reads. Every process calls
        it (each holds its own stream and, scoring its own groups, its own reward statistics)."""
        streams = self.dist.gather(generator.get_state())
        reward_states = self.dist.gather(scorer.state_dict())
        return {"sampler": sampler.state_dict(), "sample_rng": streams, "reward_state": reward_states}

    def restore_rollouts(self, saved: dict[str, Any], sampler: Any, generator: torch.Generator, scorer: Any,
                         reference: Transformer | None) -> None:
        """Put back what `rollout_state` and `save(reference=)` saved, when the run resumes. A process
        the saved run did not have starts its stream afresh and its reward statistics from rank 0's."""
        if self.resume_from is None:
            return
        rank, world = self.dist.rank, self.dist.world
        sampler.load_state_dict(saved["sampler"])
        streams = saved.get("sample_rng", [])
        if rank < len(streams):
            generator.set_state(streams[rank])
        if len(streams) != world:
            self.log(f"{self.resume_from} was saved by {len(streams)} process(es), this run has {world}: sampling "
                     "streams without a saved state start afresh, so the run continues but not bit for bit")
        if reference is not None and (self.resume_from / "reference").is_dir():
            reference.load_state_dict(load_model(self.resume_from / "reference", device=self.device).state_dict())
        reward_states = saved.get("reward_state", [])
        if reward_states:
            scorer.load_state_dict(reward_states[rank if rank < len(reward_states) else 0])

    def begin(self, step: int, total: int, data: str, model: Transformer) -> None:
        """Say what the run is about to do, open metrics.jsonl and start watching."""
        if self.resume_from is not None:
            self.log(f"resumed from {self.resume_from} at step {step}")
        for line in summary_lines(run=self.dir, resume_from=self.resume_from, step=step, data=data, model=model,
                                  device=self.device, precision=self.cfg.precision):
            self.log(line)
        self.metrics = MetricsLogger(self.dir, resume_step=step, fresh=self.resume_from is None, write=self.dist.main)
        if self.make_monitor is not None:
            # A resumed run's monitor sees the rows logged so far; warnings are printed live.
            history = read_metrics(self.dir) if step and self.dist.main else ()
            self.monitor = self.make_monitor(stop_on=self.cfg.stop_on, log=self.log, history=history)
        self.progress = Progress(total, start_step=step, max_seconds=getattr(self.cfg, "max_seconds", 0.0))
        self.started = time.perf_counter()

    def record(self, row: dict) -> dict:
        """Log a metrics row and show it to the monitor; a train row with a non-finite loss or
        gradient norm ends the run here, before anything evaluates or saves those weights."""
        row = self.metrics.log(row)
        if self.monitor is not None:
            self.monitor.observe(row)
        if row.get("kind") == "train":
            stop_if_diverged(row, self.cfg.lr)
        return row

    def eval_due(self, step: int, total: int) -> bool:
        return bool(self.cfg.eval_every and step % self.cfg.eval_every == 0) or step == total

    def end_step(self, step: int, total: int, save: Callable[[str], None],
                 on_time_out: Callable[[], None] | None = None) -> int:
        """After a step's row and evaluation: returns the run's length, cut to this step when the
        monitor found what --stop-on names or --max-seconds has passed (on_time_out runs then);
        saves `last` and exits on Ctrl-C or SIGTERM to any process; saves `last` every
        --save-every steps (0: at every evaluation) and at the end. Every process calls it, and
        they stop together: rank 0 watches the monitor and the clock."""
        cfg = self.cfg
        out_of_time = bool(getattr(cfg, "max_seconds", 0.0) and time.perf_counter() - self.started >= cfg.max_seconds)
        should_stop = self.monitor is not None and self.monitor.should_stop
        should_stop, out_of_time = self.dist.broadcast((should_stop, out_of_time))
        if should_stop and step < total:
            if self.dist.main:
                self.log(f"stopping at step {step}: {self.monitor.stop_reason.code} is in --stop-on")
            total = step
        if out_of_time and step < total:
            self.log(f"time budget of {cfg.max_seconds:.0f}s reached at step {step}")
            if on_time_out is not None:
                on_time_out()
            total = step
        signum = max(self.dist.gather(interrupt.requested()))  # a signal to any process stops them all here
        if signum and step < total:
            save("last")
            interrupt.stop_run(signum, step, checkpoint_path(self.dir, "last"), cfg, self.log)
        eval_due = cfg.eval_every and step % cfg.eval_every == 0
        if (cfg.save_every and step % cfg.save_every == 0) or (not cfg.save_every and eval_due) or step == total:
            save("last")
        return total
