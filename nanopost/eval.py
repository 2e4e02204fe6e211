"""Held-out task accuracy: greedy accuracy and sampled avg@k, overall and per difficulty level.

Both training loops and the demo report call `evaluate`; it only needs a model, prompts as token
ids and a checker for the completions, so SFT, GRPO and any task share one definition.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .generate import generate
from .plumbing.distributed import Dist, shard
from .plumbing.metrics import progress_lines
from .plumbing.tokenizer import Tokenizer
from .rewards import accuracy_reward


@dataclass
class EvalItem:
    prompt_ids: list[int]
    answer: str
    difficulty: float | None = None
    record: dict | None = None  # the source record, for task-specific checkers


Checker = Callable[[str, EvalItem], float]


def default_check(completion: str, item: EvalItem) -> float:
    return accuracy_reward(completion, item.answer)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval for a proportion that stays inside [0, 1] even at 0% or 100%."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def completions(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Decoded completions (special tokens dropped), generated in batches; progress(done) after each."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                       stop_token_ids=tokenizer.stop_token_ids, generator=generator,
                       pad_token_id=tokenizer.pad_token_id)
        texts += [tokenizer.decode(out.completion(i), skip_special_tokens=True) for i in range(len(chunk))]
        if progress is not None:
            progress(len(texts))
    return texts


def evaluate(
    model,
    tokenizer: Tokenizer,
    items: Sequence[EvalItem],
    *,
    max_new_tokens: int,
    k: int = 0,
    temperature: float = 1.0,
    check: Checker = default_check,
    batch_size: int = 64,
    seed: int = 0,
    measures: dict[str, Checker] | None = None,
    dist: Dist = Dist(),
    log: Callable[[str], None] | None = None,
    log_every_s: float = 5.0,
) -> dict:
    """Greedy accuracy (with a 95% Wilson interval) and, if k > 0, avg@k at `temperature`.

    Returns a flat dict of floats (for metrics rows) plus "per_difficulty": {level: accuracy}.
    `measures` are further per-completion scores (name -> fn(completion, item)), averaged over the
    greedy completions: how often the format holds or the reasoning is written out, say.
    Under torchrun each rank generates for its share of the items and all ranks get the result.
    With a `log`, a long evaluation says how far it is ("eval: 64/200 prompts", then "eval: 96/800
    samples" for avg@k) at most every `log_every_s` seconds; under torchrun the counts are this rank's.
    """
    measures = measures or {}
    was_training = model.training
    model.eval()
    all_items = items
    items = [items[i] for i in shard(len(items), dist)]
    prompts = [it.prompt_ids for it in items]
    greedy = completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         progress=progress_lines(log, "prompts", len(prompts), log_every_s))
    scores = [check(c, it) for c, it in zip(greedy, items)]
    measured = {name: sum(fn(c, it) for c, it in zip(greedy, items)) for name, fn in measures.items()}
    sampled_scores: list[float] = []
    if k > 0:
        # Each rank its own stream; rank 0's is the single-process one.
        g = torch.Generator(device=model.device).manual_seed(seed + 1_000_003 * dist.rank)
        sampled = completions(model, tokenizer, [p for p in prompts for _ in range(k)],
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              batch_size=batch_size, generator=g,
                              progress=progress_lines(log, "samples", k * len(prompts), log_every_s))
        sampled_scores = [check(c, items[i // k]) for i, c in enumerate(sampled)]
    if dist.active:
        parts = dist.gather((scores, sampled_scores, greedy[:1], measured))
        scores = [s for p in parts for s in p[0]]
        sampled_scores = [s for p in parts for s in p[1]]
        greedy = [c for p in parts for c in p[2]]
        measured = {name: sum(p[3][name] for p in parts) for name in measured}
    items = all_items
    n = len(items)
    lo, hi = wilson_interval(sum(scores), n)
    result: dict = {"accuracy": sum(scores) / max(n, 1), "accuracy_lo": lo, "accuracy_hi": hi, "n": n}
    result.update({name: total / max(n, 1) for name, total in measured.items()})
    by_level: dict = defaultdict(list)
    for s, it in zip(scores, items):
        by_level[it.difficulty].append(s)
    result["per_difficulty"] = {lvl: sum(v) / len(v) for lvl, v in sorted(by_level.items(), key=lambda kv: str(kv[0]))}
    if k > 0:
        s = sampled_scores
        result[f"avg@{k}"] = sum(s) / max(len(s), 1)
        per_prompt = [sum(s[i * k : (i + 1) * k]) / k for i in range(n)]
        result[f"pass@{k}"] = sum(p > 0 for p in per_prompt) / max(n, 1)
    result["sample_completion"] = greedy[0] if greedy else ""
    if was_training:
        model.train()
    return result
