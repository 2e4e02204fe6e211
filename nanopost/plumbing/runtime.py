"""Device, precision, seeding and the optimizer: the setup both training loops share."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random

import numpy as np
import torch

from ..model import Transformer


def pick_device(name: str = "auto") -> torch.device:
    """The device `--device` names ("auto": a GPU if there is one, else the CPU).

    A device this machine does not have is a ValueError naming --device, raised before anything
    is loaded, instead of a failure when the first tensor moves there.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            missing = "this PyTorch build has no CUDA support (a CPU-only build)"
        elif not torch.cuda.is_available():
            missing = "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        elif device.index is not None and device.index >= torch.cuda.device_count():
            missing = f"this machine has {torch.cuda.device_count()} GPU(s), numbered from 0"
        else:
            return device
    elif device.type == "mps":
        if torch.backends.mps.is_available():
            return device
        missing = "MPS (Apple GPU) is not available on this machine"
    elif device.type == "cpu":
        return device
    else:  # xpu and the like: usable when their backend says so
        backend = getattr(torch, device.type, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return device
        missing = f"{device.type} is not available on this machine"
    raise ValueError(f"--device {name}: {missing}; use --device cpu, or auto to take a GPU when there is one")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (where supported), plain fp32 elsewhere.

    CPU bf16 matmuls are slower than fp32 on most CPUs and change results, so "auto" keeps fp32.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision in ("auto", "bf16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return contextlib.nullcontext()  # fp16 would need loss scaling; fp32 is the safe fallback
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory(device: torch.device) -> bool:
    """Hand the C heap's free pages back to the system. Returns whether anything was called
    (only on the CPU, with glibc).

    On the CPU, tensors smaller than glibc's mmap threshold (32 MiB once it has adapted) live on
    its heap, and glibc keeps their pages resident after they are freed unless they sit at its
    top. The next allocations fault them back in as they reuse them.
    """
    if device.type != "cpu" or _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


# The embedding gradient size from which releasing pays. A gradient above glibc's largest mmap
# threshold (32 MiB on 64-bit systems) is mapped fresh, so it lands on top of the heap's freed
# pages instead of reusing them; a smaller one fits among them. Returning pages also costs: the
# next forward faults them back in, which a small model's step would notice.
RELEASE_MIN_BYTES = 32 << 20


def release_memory_in_backward(model: Transformer, device: torch.device) -> list:
    """Release freed memory where a backward starts and ends its pass through the layers; returns
    the hooks' handles (none where the input embedding is smaller than RELEASE_MIN_BYTES).

    Where it reaches the final norm, the LM head's backward is done and its tiles are freed, along
    with what the forward and the passes before it (the sampler's, the reference model's) left;
    where it reaches the input embedding, every layer's activations are freed, and the
    embedding's gradient, a dense [vocabulary × hidden] tensor, is about to be allocated. Without
    this, a step's resident peak holds those freed pages and every gradient at once, and both grow
    with the vocabulary (the head's tiles, the embedding's gradient).
    """
    def release(grad):
        release_freed_memory(device)

    def on_output(module, args, output):  # when the backward reaches this output, before the module's own
        if output.requires_grad:
            output.register_hook(release)

    embedding = model.model.embed_tokens.weight
    if embedding.numel() * embedding.element_size() < RELEASE_MIN_BYTES:
        return []
    return [m.register_forward_hook(on_output) for m in (model.model.norm, model.model.embed_tokens)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(
    model: Transformer, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only: decaying norm gains and biases pulls
    them towards 0, which is not a prior anyone wants for them."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates all parameters in one pass instead of a loop over tensors, which
    # on a CPU is a visible share of a small model's step.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
