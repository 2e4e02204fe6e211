"""Learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2015).

A short SFT run whose lr grows exponentially from start_lr to end_lr, one optimizer step per lr,
recording the training loss of each step before its update. Low lrs barely move the loss; as
the lr grows the loss falls faster; past some lr it turns, gets ragged and blows up. The test
stops once the smoothed loss exceeds `diverge` (4) times its minimum, or the loss is NaN/inf.

The suggestion is the lr of the smoothed loss's minimum divided by 10: the minimum sits where
training already starts to go unstable, and a tenth of it is a safe, still fast, lr for a full
run (it agrees with Smith's "largest lr that still converges, over 3 to 4" within a small
factor). Also reported: the lr of steepest descent of the smoothed loss against log lr, which
is often close but noisier on short tests. Both are read from an exponential moving average
of the loss (bias-corrected, weight `smooth`), because single steps of different batches are
too noisy to compare. The model is the same as SFT's: data, packing, loss and optimizer are
nanopost.sft_loop's own, so the lr found is the lr for scripts/sft.py with the same batch options.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from ..data import pack_examples
from ..plumbing.chat_template import CHAT_FORMAT_HELP, ChatFormatName
from ..plumbing.hf_io import load_model, load_tokenizer
from ..plumbing.runtime import make_optimizer, pick_device, seed_everything
from ..schedules import set_lr
from ..sft_loop import SFTConfig, accumulate_gradients, prepare
from .plot import ema


@dataclass
class LRFindConfig:
    model: str = field(default="", metadata={"help": "HF checkpoint directory"})
    train: str = field(default="", metadata={"help": "SFT training JSONL"})
    chat_format: ChatFormatName | None = field(default=None, metadata={"help": CHAT_FORMAT_HELP})
    out: str = field(default="runs/lr_find", metadata={"help": "directory for lr_find.csv/.json/.png"})
    start_lr: float = 1e-7
    end_lr: float = 1.0
    steps: int = field(default=100, metadata={"help": "optimizer steps from start_lr to end_lr"})
    diverge: float = field(default=4.0, metadata={"help": "stop when the smoothed loss exceeds this x its minimum"})
    smooth: float = field(default=0.9, metadata={"help": "EMA weight for the loss (0: raw)"})
    # the same batch and optimizer options as SFTConfig, so the lr found transfers
    max_len: int = 512
    overflow: Literal["truncate", "drop"] = "truncate"
    batch_rows: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def validate(self) -> None:
        if not self.model or not self.train:
            raise ValueError("--model and --train are required")
        if not 0 < self.start_lr < self.end_lr:
            raise ValueError(f"need 0 < start_lr < end_lr, got {self.start_lr} and {self.end_lr}")
        if self.steps < 5:
            raise ValueError(f"steps must be at least 5, got {self.steps}")
        if not 0 <= self.smooth < 1:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth}")


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    diverged: bool  # stopped before end_lr because the loss blew up
    suggested: float  # min_loss_lr / 10
    min_loss_lr: float
    steepest_lr: float | None
    note: str = ""


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """steps lrs growing geometrically from start to end (both included)."""
    ratio = end / start
    return [start * ratio ** (i / (steps - 1)) for i in range(steps)]


def suggest(lrs: Sequence[float], losses: Sequence[float], smooth: float = 0.9) -> dict:
    """{"suggested", "min_loss_lr", "steepest_lr", "smoothed", "note"} from a recorded range test."""
    lrs_a = np.asarray(lrs, dtype=float)
    values = np.asarray(losses, dtype=float)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError("range test: no finite loss recorded; start_lr is already too high")
    lrs_a, values = lrs_a[finite], values[finite]
    smoothed = ema(values, smooth)
    best = int(np.argmin(smoothed))
    note = ""
    if best == 0:
        note = "the loss never fell below its first value: start_lr is already too high, or the data is at fault"
    steepest = None
    skip = max(1, len(values) // 10)  # the first points carry the EMA's start-up
    if best - skip >= 2:
        slope = np.gradient(smoothed[skip : best + 1], np.log(lrs_a[skip : best + 1]))
        steepest = float(lrs_a[skip + int(np.argmin(slope))])
    return {"suggested": float(lrs_a[best]) / 10, "min_loss_lr": float(lrs_a[best]), "steepest_lr": steepest,
            "smoothed": smoothed.tolist(), "note": note}


def range_test(step: Callable[[float], float], lrs: Sequence[float], *, diverge: float = 4.0,
               smooth: float = 0.9, log: Callable[[str], object] = print) -> LRFindResult:
    """Call step(lr) -> loss for each lr until the smoothed loss exceeds diverge x its minimum."""
    done, losses = [], []
    diverged = False
    for i, lr in enumerate(lrs):
        loss = step(lr)
        done.append(lr)
        losses.append(loss)
        if not math.isfinite(loss):
            diverged = True
            break
        smoothed = ema(np.asarray(losses), smooth)
        if smoothed[-1] > diverge * smoothed.min():
            diverged = True
            break
        if i % 10 == 0:
            log(f"lr {lr:.2e}  loss {loss:.4f}  smoothed {smoothed[-1]:.4f}")
    s = suggest(done, losses, smooth)
    note = s["note"]
    if not diverged:
        extra = f"the loss did not diverge by lr {lrs[-1]:.2g}: the suggestion may be low; try a larger --end-lr"
        note = f"{note}; {extra}" if note else extra
    smoothed = s["smoothed"] + [math.nan] * (len(losses) - len(s["smoothed"]))  # a last NaN step has no EMA
    return LRFindResult(lrs=done, losses=losses, smoothed=smoothed, diverged=diverged, suggested=s["suggested"],
                        min_loss_lr=s["min_loss_lr"], steepest_lr=s["steepest_lr"], note=note)


def sft_step_fn(cfg: LRFindConfig, log: Callable[[str], object] = print) -> Callable[[float], float]:
    """One SFT optimizer step at a given lr, over the training data in order (cycling)."""
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, chat_format=cfg.chat_format)
    model = load_model(cfg.model, device=device, dtype=torch.float32)
    model.train()
    sft = SFTConfig(model=cfg.model, train=cfg.train, max_len=cfg.max_len, overflow=cfg.overflow)
    _, examples = prepare(tokenizer, cfg.train, sft, log)
    optimizer = make_optimizer(model, cfg.start_lr, cfg.weight_decay, cfg.betas)
    state = {"epoch": 0, "index": 0, "batches": []}

    def next_batch():
        if state["index"] >= len(state["batches"]):
            state["batches"] = pack_examples(examples, cfg.max_len, cfg.batch_rows, pad_id=tokenizer.pad_token_id,
                                             shuffle_seed=cfg.seed * 1000 + state["epoch"])
            state["epoch"] += 1
            state["index"] = 0
        state["index"] += 1
        return state["batches"][state["index"] - 1]

    def step(lr: float) -> float:
        set_lr(optimizer, lr)
        loss, _ = accumulate_gradients(model, [next_batch() for _ in range(cfg.grad_accum)], device, cfg.precision)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def write_result(result: LRFindResult, cfg: LRFindConfig, log: Callable[[str], object] = print) -> list[Path]:
    """lr_find.csv (one row per step), lr_find.json (config and suggestion), lr_find.png if possible."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lr_find.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "smoothed"])
        for i, (lr, loss, sm) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            w.writerow([i, f"{lr:.6g}", f"{loss:.6g}", f"{sm:.6g}"])
    summary = {k: v for k, v in asdict(result).items() if k not in ("lrs", "losses", "smoothed")}
    (out / "lr_find.json").write_text(json.dumps({**summary, "config": asdict(cfg)}, indent=2) + "\n")
    paths = [out / "lr_find.csv", out / "lr_find.json"]
    try:
        from .plot import plot_lr_curve

        marks = {"suggested (min / 10)": result.suggested, "min loss": result.min_loss_lr}
        if result.steepest_lr is not None:
            marks["steepest"] = result.steepest_lr
        paths.append(plot_lr_curve(result.lrs, result.losses, result.smoothed, marks, out / "lr_find.png"))
    except ModuleNotFoundError as e:
        log(f"no plot: {e}")
    return paths


def lr_range_test(cfg: LRFindConfig, log: Callable[[str], object] = print) -> LRFindResult:
    """Run the range test as configured, write its files under cfg.out, return the result."""
    step = sft_step_fn(cfg, log)
    result = range_test(step, lr_schedule(cfg.start_lr, cfg.end_lr, cfg.steps), diverge=cfg.diverge,
                        smooth=cfg.smooth, log=log)
    for path in write_result(result, cfg, log):
        log(f"wrote {path}")
    steepest = f", steepest descent at {result.steepest_lr:.2g}" if result.steepest_lr else ""
    log(f"suggested lr {result.suggested:.2g} (smoothed loss lowest at {result.min_loss_lr:.2g}{steepest})"
        + (f"; note: {result.note}" if result.note else ""))
    return result
