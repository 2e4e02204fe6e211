"""Train a reward model from a causal LM checkpoint on preference pairs (or scalar labels).

    python scripts/train_rm.py --model ckpt/base --train data/prefs.jsonl --val data/prefs_val.jsonl \\
        --out runs/rm [--steps 200 --lr 1e-5 --batch-size 16]

The backbone starts from --model (its LM head is dropped), a fresh scalar head is added, and the
whole model is trained with the Bradley-Terry loss (MSE for scalar labels). The reward model and
its tokenizer are written to --out, which `load_reward_model` and transformers'
AutoModelForSequenceClassification both read; beside them go train_config.json and metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from nanopost.plumbing.chat_template import CHAT_FORMAT_HELP, ChatFormatName
from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.plumbing.config import main_guard, parse_config, save_config
from nanopost.plumbing.metrics import MetricsLogger, Progress
from nanopost.tools.reward_model import (
    RewardModel,
    evaluate_reward_model,
    load_reward_data,
    save_reward_model,
    train_reward_model,
)
from nanopost.plumbing.runtime import pick_device, seed_everything


@dataclass
class RMConfig:
    model: str = field(default="", metadata={"help": "HF causal-LM directory to start the backbone from"})
    chat_format: ChatFormatName | None = field(default=None, metadata={"help": CHAT_FORMAT_HELP})
    train: str = field(default="", metadata={"help": "JSONL: {prompt, chosen, rejected} or {prompt, completion, label}"})
    val: str | None = field(default=None, metadata={"help": "held-out JSONL of the same kind"})
    out: str = field(default="runs/rm", metadata={"help": "directory for the reward model, config and metrics"})
    steps: int = 200
    lr: float = 1e-5
    batch_size: int = field(default=16, metadata={"help": "pairs (or labelled completions) per step"})
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    center_coef: float = field(default=0.0, metadata={"help": "weight of mean((r_c + r_r)^2); 0.01 keeps scores centred"})
    max_len: int = field(default=1024, metadata={"help": "tokens per conversation (longer: the last max_len kept)"})
    eval_batch_size: int = 32
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def validate(self) -> None:
        if not self.model or not self.train:
            raise ValueError("--model and --train are required")
        if self.steps < 1 or self.batch_size < 1 or self.max_len < 2:
            raise ValueError("steps and batch_size must be >= 1, max_len >= 2")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(RMConfig, argv, description=__doc__)
    out = Path(cfg.out)
    save_config(cfg, out / "train_config.json")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)

    tokenizer = load_tokenizer(cfg.model, chat_format=cfg.chat_format)
    # fp32 master weights; autocast gives bf16 compute on GPUs.
    rm = RewardModel(load_model(cfg.model, device=device, dtype=torch.float32),
                     generator=torch.Generator().manual_seed(cfg.seed))
    train = load_reward_data(cfg.train)
    val = load_reward_data(cfg.val) if cfg.val else None

    metrics = MetricsLogger(out)
    progress = Progress(cfg.steps)

    def on_step(row: dict) -> None:
        metrics.log({"kind": "train", **row})
        if row["step"] % cfg.log_every == 0 or row["step"] == cfg.steps:
            shown = {k: row[k] for k in ("loss", "accuracy", "lr", "grad_norm") if k in row}
            print(progress.line(row["step"], **shown), flush=True)

    train_reward_model(
        rm, tokenizer, train, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay,
        clip_grad=cfg.clip_grad, center_coef=cfg.center_coef, max_len=cfg.max_len, seed=cfg.seed,
        precision=cfg.precision, on_step=on_step,
    )
    result: dict = {}
    if val is not None:
        result = evaluate_reward_model(rm, tokenizer, val, batch_size=cfg.eval_batch_size, max_len=cfg.max_len,
                                       precision=cfg.precision)
        metrics.log({"kind": "eval", "step": cfg.steps, **result})
        print("held-out: " + " | ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    save_reward_model(rm, out, tokenizer=tokenizer)
    print(f"saved reward model to {out}", flush=True)
    return result


if __name__ == "__main__":
    main_guard(main)
