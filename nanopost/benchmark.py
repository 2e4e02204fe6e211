"""Shared pieces of the benchmarks: the machine's matmul peak, timing, and the benchmark models."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .model import ModelConfig

# The two model sizes every benchmark uses (Qwen2-style, random init).
SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408, vocab_size=1024),
}


def bench_config(size: str) -> ModelConfig:
    return ModelConfig(model_type="qwen2", max_position_embeddings=2048, tie_word_embeddings=False, **SIZES[size])


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of fn over repeats: the least noisy estimate on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_flops(n: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """FLOP/s of a large square matmul: the practical ceiling for a model's FLOP/s here."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def run():
        for _ in range(8):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()

    return 8 * 2 * n**3 / best_time(run, repeats=5)
