"""What a training run is about to do, printed once before its first step:

    stop tokens: <|im_end|>, <|endoftext|>
    run: runs/grpo (new)
    data: 70 prompts (1,512 prompt tokens), 30 held-out; 100 steps to run, 8 prompts x 8 samples each
    model: 1,234,560 parameters (1,234,560 trainable), cuda:0, bf16 autocast (fp32 weights)

Each line starts with its subject, so `grep '^model:'` finds it in a log; none starts with
"step " (scripts/bench_grpo.py times steps by the lines that do).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .runtime import autocast


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those that require a gradient); tied weights count once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def precision_name(device: torch.device, precision: str) -> str:
    """What `--precision` resolves to on `device` (runtime.autocast decides)."""
    return "bf16 autocast (fp32 weights)" if isinstance(autocast(device, precision), torch.autocast) else "fp32"


def stop_tokens_line(tokenizer) -> str:
    """The tokens sampling stops on. Printed first, as soon as the tokenizer is loaded: finding
    them recognises the chat template, so a template that cannot be used fails before anything else."""
    return f"stop tokens: {', '.join(tokenizer.id_to_token(i) for i in tokenizer.stop_token_ids)}"


def summary_lines(*, run: str | Path, resume_from: Path | None, step: int, data: str,
                  model: torch.nn.Module, device: torch.device, precision: str) -> list[str]:
    """The run, data and model lines; `data` is the loop's own description of its data and steps."""
    total, trainable = count_parameters(model)
    where = "new" if resume_from is None else f"resuming from {resume_from} at step {step}"
    return [f"run: {run} ({where})", f"data: {data}",
            f"model: {total:,} parameters ({trainable:,} trainable), {device}, {precision_name(device, precision)}"]
