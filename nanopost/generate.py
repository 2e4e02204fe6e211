"""Batched sampling with a KV cache.

Prompts of different lengths are left-padded into one batch and prefilled in a single forward
pass (each distinct prompt once: GRPO asks for G continuations of every prompt); then one token
per row per step is decoded against a preallocated cache. Rows that hit a stop token are dropped
from the batch (in chunks, since each drop copies the cache), so finished rows stop costing
compute.

The returned log-probabilities are those of the *tempered, untruncated* distribution,
log_softmax(logits / T), at the sampled tokens: exactly what an fp32 GRPO loss recomputes, so the
importance ratio is 1 at the first inner step (a bf16 learner uses its own, see nanopost.grpo_loop).
top-k / top-p only restrict which tokens can be drawn, exactly as transformers and vLLM restrict
them: temperature, then top-k, then top-p on the distribution renormalised after top-k. At
temperature 0 decoding is greedy and the logprobs are those of log_softmax(logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .fast.decode import decoder
from .model import KVCache, NextTokenLogits, SharedPrefix, Transformer


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, T] sampled tokens, the stop token included, pad_token_id after
    logprobs: torch.Tensor  # [N, T] logprob of each sampled token at the sampling temperature, 0 after
    lengths: torch.Tensor  # [N] number of generated tokens (stop token included)
    finished: torch.Tensor  # [N] True = ended on a stop token, False = truncated at max_new_tokens

    @property
    def mask(self) -> torch.Tensor:
        """[N, T] 1.0 where a token was generated."""
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (steps[None, :] < self.lengths[:, None]).float()

    def completion(self, i: int) -> list[int]:
        return self.tokens[i, : int(self.lengths[i])].tolist()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] token ids and [B, P] mask (1 = real token), prompts aligned to the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def shared_prefix(prompts: Sequence[Sequence[int]], device) -> SharedPrefix:
    """The distinct prompts, left-padded in order of first appearance, and which one each row has."""
    distinct: dict[tuple[int, ...], int] = {}
    rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    ids, mask = left_pad(list(distinct), 0, device)  # prompt padding is masked, any valid id will do
    return SharedPrefix(ids, mask, torch.tensor(rows, device=device))


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits [B, V]; returns (tokens [B], logprobs [B])."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    scaled = logits if temperature == 1 else logits / temperature
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]
    allowed = logp
    if (top_k and top_k < logp.shape[-1]) or top_p < 1.0:
        # transformers' TopK then TopP warpers (and vLLM), op for op, so that ties and the top-p
        # boundary fall the same way: top-k keeps every token tied with the k-th value; top-p
        # works on the distribution renormalised after top-k, sorted ascending, and drops each
        # token whose mass together with all below it is <= 1 - top_p (the top token always stays).
        kept = scaled
        if top_k and top_k < logp.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[:, -1:]
            removed = scaled < kth
            kept = scaled.masked_fill(removed, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = kept.sort(dim=-1)
            drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
            drop_sorted[:, -1] = False
            # Tokens top-k removed have zero mass and sort first, so this drops them again.
            removed = drop_sorted.scatter(-1, order, drop_sorted)
        allowed = logp.masked_fill(removed, float("-inf"))
    # Inverse-CDF draw: one uniform per row, where multinomial and Gumbel tricks draw one random
    # number per vocabulary entry, and no host sync.
    cdf = allowed.exp().cumsum(-1)  # [B, V], unnormalised when top-k/top-p removed tokens
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> Rollout:
    """Sample up to max_new_tokens after each prompt (lists of token ids). See module docstring."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    context = model.config.max_position_embeddings
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) + max_new_tokens > context:
        raise ValueError(
            f"prompt {longest} has {len(prompts[longest])} tokens; with max_new_tokens={max_new_tokens} "
            f"it needs {len(prompts[longest]) + max_new_tokens} positions, but the model's context is {context}"
        )
    device = model.device
    step = decoder(model)
    prefix = shared_prefix(prompts, device)
    (U, P), B = prefix.ids.shape, len(prompts)
    cache = KVCache(model.config, U, P + max_new_tokens, device, model.dtype)
    # Through forward (the entry FSDP2 gathers the weights at), the LM head at the last position alone.
    logits = model(NextTokenLogits(prefix.ids, attention_mask=prefix.mask, cache=cache))  # [U, V]
    positions = prefix.mask.sum(-1, keepdim=True)  # [U, 1] next position of each row
    if U < B:
        cache.keep(prefix.rows)
        logits, positions = logits[prefix.rows], positions[prefix.rows]
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)

    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # Tokens of the rows still in the batch, written one column per step and copied out to their
    # original rows only when the batch shrinks; what a row drew after its stop is blanked at the end.
    batch_tokens, batch_logprobs = tokens.clone(), logprobs.clone()
    rows = torch.arange(B, device=device)  # original index of each row still in the batch
    alive = torch.ones(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        tok, lp = sample_token(logits, temperature, top_p, top_k, generator)
        batch_tokens[:, t] = tok
        batch_logprobs[:, t] = lp
        if len(stops):
            hit = alive & torch.isin(tok, stops)
            if hit.any():
                lengths[rows[hit]] = t + 1
                finished[rows[hit]] = True
                alive &= ~hit
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                # Dropping rows copies the cache, so wait until a quarter of the batch is done.
                if len(rows) - n_alive >= max(1, len(rows) // 4):
                    tokens[rows], logprobs[rows] = batch_tokens, batch_logprobs
                    cache.keep(alive)
                    rows, tok, positions = rows[alive], tok[alive], positions[alive]
                    batch_tokens, batch_logprobs = batch_tokens[alive], batch_logprobs[alive]
                    alive = alive[alive]
        if t + 1 == max_new_tokens:
            break
        logits = step(tok[:, None], positions, cache)
        positions = positions + 1
    tokens[rows], logprobs[rows] = batch_tokens, batch_logprobs
    generated = torch.arange(max_new_tokens, device=device)[None, :] < lengths[:, None]
    return Rollout(tokens=tokens.masked_fill_(~generated, pad_token_id),
                   logprobs=logprobs.masked_fill_(~generated, 0.0), lengths=lengths, finished=finished)
