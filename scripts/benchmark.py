"""Shared pieces of the benchmarks: the machine's matmul peak, timing, the benchmark models,
synthetic chats, how tokens and training FLOPs are counted, and peak memory measured one
process per measurement."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from typing import Callable, Iterable

import torch

from nanopost.data import PAD_SEGMENT
from nanopost.fast.decode import PackedWeights
from nanopost.model import ModelConfig, Transformer

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


def alternate_rounds(sides: dict[str, Callable[[], object]], rounds: int) -> dict[str, list]:
    """Each side's results over `rounds` rounds, every side running once per round and the
    order turning each round (A B, B A, ...). A slow spell of a shared machine then lands on
    both sides alike instead of on whichever ran during it."""
    names = list(sides)
    results: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(sides[name]())
    return results


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


def decode_kernel_floor(model: Transformer, batch: int, context: int, repeats: int = 30) -> float:
    """Seconds per decoding step spent in the step's matmuls and attention kernels alone.

    The packed step's matmuls (nanopost.fast.decode: q/k/v, o, gate/up and down of every layer, then
    the LM head) on `batch` rows, plus attention of one query per row over `context` cached keys
    in each layer, timed kernel by kernel with nothing between them: no norms, RoPE, cache
    writes, sampling or Python. Each layer reads keys and values of its own, as a real cache has
    them: shared ones would stay in the CPU's cache and time memory traffic a sampler cannot
    avoid as if it were free. No implementation built on these kernels can decode faster, so
    this is the ceiling to hold a sampler's tokens/s against.
    """
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    matrices = [m for layer in PackedWeights(model).layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    matrices.append(model.lm_head.weight.t())
    inputs = {w.shape[0]: torch.randn(batch, w.shape[0], dtype=model.dtype, device=model.device) for w in matrices}
    q = torch.randn(batch, kv, heads // kv, d, dtype=model.dtype, device=model.device)
    shape = (cfg.num_hidden_layers, 2, batch, kv, context, d)
    cache = torch.randn(shape, dtype=model.dtype, device=model.device)  # keys and values of every layer
    mask = torch.zeros(batch, 1, 1, context, dtype=model.dtype, device=model.device)  # additive, as the model's

    def step():
        with torch.no_grad():
            for w in matrices:
                inputs[w.shape[0]] @ w
            for k, v in cache:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return best_time(step, repeats=repeats, warmup=3)


Shape = tuple[int, int]


def training_matmuls(model: Transformer, positions: int, loss_tokens: int) -> list[tuple[Shape, Shape]]:
    """Operand shapes of the linear layers' matmuls in one forward and backward pass over
    `positions` positions, with the LM head at `loss_tokens` of them (logits are computed where
    the loss is), and so the last layer's output projection and MLP, whose output only the LM
    head reads. Each layer takes three: the forward x·Wᵀ, the input's gradient dy·W and the
    weight's dyᵀ·x. Attention's matmuls are left out, so the list is the least work training
    can do."""
    shapes = []
    tail = set(_after_last_attention(model))
    linears = [(m, loss_tokens if m in tail else positions)
               for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    for linear, n in linears + [(model.lm_head, loss_tokens)]:
        out, inp = linear.weight.shape
        shapes += [((n, inp), (inp, out)), ((n, out), (out, inp)), ((out, n), (n, inp))]
    return shapes


def training_matmul_floor(model: Transformer, positions: int, loss_tokens: int, repeats: int = 3) -> float:
    """Seconds the matmuls of `training_matmuls` take run back to back, with nothing between
    them: a ceiling no training step built on these kernels can pass, whatever it fuses."""
    operands = [(torch.randn(a, dtype=model.dtype, device=model.device),
                 torch.randn(b, dtype=model.dtype, device=model.device))
                for a, b in training_matmuls(model, positions, loss_tokens)]

    def run():
        for a, b in operands:
            a @ b

    return best_time(run, repeats=repeats, warmup=1)


# Pseudo-words from two-letter syllables: a 1024-token BPE learns most of them whole, so a
# sentence of k words is about k + 1 tokens, and the lengths of the chats are predictable.
_SYLLABLES = "ka lo mi ne ru sa to vi be da fo gu hi ja ke li mo nu pa qe ri so tu we xo yi za".split()


def random_chats(n: int, seed: int = 0, prompt_sentences: tuple[int, int] = (3, 4),
                 reply_sentences: tuple[int, int] = (5, 6)) -> list[list[dict]]:
    """n single-turn conversations [user, assistant] of random sentences, the same for the same seed.

    With the defaults and a 1024-token BPE trained on them, a ChatML-rendered chat is 80-115
    tokens (mean ~96), about half of them in the reply.
    """
    words_rng = random.Random(0)  # one vocabulary for every seed, so one tokenizer fits all
    words = sorted({"".join(words_rng.choice(_SYLLABLES) for _ in range(words_rng.randint(1, 3)))
                    for _ in range(400)})
    rng = random.Random(seed)

    def text(sentences: tuple[int, int]) -> str:
        return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))).capitalize() + "."
                        for _ in range(rng.randint(*sentences)))

    return [[{"role": "user", "content": text(prompt_sentences)},
             {"role": "assistant", "content": text(reply_sentences)}] for _ in range(n)]


def document_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Positions of every document in a packed [B, T] batch, padding left out.

    Segments are numbered 0, 1, ... within each row, so a row's counts by segment are its documents.
    """
    lengths = []
    for row in segment_ids:
        row = row[row != PAD_SEGMENT]
        lengths += torch.bincount(row).tolist() if row.numel() else []
    return lengths


def training_flops(model: Transformer, lengths: Iterable[int], loss_tokens: int | None = None) -> float:
    """Model FLOPs of one forward and backward pass over documents of these lengths (in positions).

    The backward pass costs two matmuls for every one of the forward (gradients of the input and
    of the weight), so training is 3x the forward. Each document attends causally to itself only,
    which is what packing or padding masks leave (see forward_flops). With `loss_tokens`, the
    FLOPs a loss at that many positions needs: the LM head, and the last layer's output
    projection and MLP that only it reads, count there alone (a full forward computes them
    everywhere; nanopost does not).
    """
    lengths = list(lengths)
    flops = 3.0 * forward_flops(model, lengths)
    if loss_tokens is not None:
        tail = [*_after_last_attention(model), model.lm_head]
        flops -= 3.0 * 2 * sum(m.weight.numel() for m in tail) * (sum(lengths) - loss_tokens)
    return flops


def _after_last_attention(model: Transformer) -> list[torch.nn.Linear]:
    """The last layer's output projection and MLP: only the LM head reads what they compute, so
    a forward asked for logits at some positions runs them there alone (Block's `keep`)."""
    last = model.model.layers[-1]
    return [last.self_attn.o_proj, last.mlp.gate_proj, last.mlp.up_proj, last.mlp.down_proj]


def flops_per_token(model: Transformer, context: float = 0) -> float:
    """Forward FLOPs per token: 2 per matmul weight, plus attention over `context` keys."""
    cfg = model.config
    matmul = model.num_params() - model.model.embed_tokens.weight.numel()
    if cfg.tie_word_embeddings:
        matmul += model.lm_head.weight.numel()
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context
    return 2.0 * matmul + attn


def forward_flops(model: Transformer, lengths: Iterable[int]) -> float:
    """Model FLOPs of one forward pass over sequences of these lengths (in positions), each
    attending causally to itself: a position sees (n + 1) / 2 keys on average. Sampling with a KV
    cache costs the same, one position at a time."""
    return sum(n * flops_per_token(model, context=(n + 1) / 2) for n in lengths)


def grpo_step_flops(model: Transformer, lengths: Iterable[int], *, reference: bool, passes: int = 1) -> float:
    """Model FLOPs of one GRPO step over rollouts of these lengths (prompt + completion positions).

    Sampling is one forward pass, the reference (when beta > 0) another, and each pass over the
    rollouts (mu) a forward and backward, 3x the forward. The old logprobs are those kept while
    sampling, so they cost no pass of their own.
    """
    return forward_flops(model, lengths) * (1 + int(reference) + 3 * passes)


# ---------------------------------------------------------------------------------------------
# Peak memory, one process per measurement

RESULT_MARK = "nanopost-bench-result: "


def peak_rss() -> int:
    """High-water mark of this process's resident memory, in bytes.

    Linux's VmHWM covers only the process's own address space. ru_maxrss, the fallback elsewhere,
    also keeps the peak of whatever the process was before exec: a child spawned by a parent
    holding 1 GiB reports at least 1 GiB.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # Unix only

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def report_result(result: dict) -> None:
    """Child side of run_isolated: hand `result` and this process's peak RSS to the parent."""
    print(RESULT_MARK + json.dumps({**result, "peak_rss": peak_rss()}), flush=True)


def run_isolated(argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `python *argv` in a fresh process and return what it passed to report_result.

    Memory a process has touched stays in its high-water mark (and allocators seldom give it
    back), so two frameworks measured in one process would each inherit the other's peak. The
    child's other output is passed through as it comes.
    """
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(argv)}: exited with status {proc.returncode}")
    if result is None:
        raise RuntimeError(f"{' '.join(argv)}: finished without reporting a result")
    return result
