"""The Transformer's forward made fast: the same values and gradients as nanopost/model.py's
reference, by other means (Transformer.impl = "fast", the default).

    fused pieces   fp32 training steps record RMSNorm, q/k/v + RoPE, attention and the SwiGLU MLP
                   as single autograd nodes with their backward written out (fused.py)
    short attention on the CPU, attention over a few hundred positions materialises its scores
                   (attention_by_matmul) instead of the flash kernel, and the query heads that
                   share a key/value head read it in place instead of a repeated copy
    documents      a packed batch computes its real positions only, each document in its own row
                   of a grid (Documents), instead of every row under a block-diagonal mask
    chosen rows    a loss at some positions runs the last layer's MLP and the LM head there alone
    shared prompts rows that continue the same prompt (a GRPO group) compute it once
                   (PrefixLogprobs), its keys and values read by every row
    chunked head   log-probabilities from the hidden states a block of positions at a time, never
                   holding [positions x vocabulary] logits (lm_head.py)

Nothing here imports the reference: it reads the modules' weights and calls the model's own
helpers (positions, rope, mask, run_block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import QKVRopeFn, RMSNormFn, RopeFn, ScoresAttentionFn, SwiGLUFn, fused_ok, rotate_pairs, scores_attention
from .lm_head import head_logprobs


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as 0 / -inf: attention turns a boolean mask
    into an additive one on every call, so a forward converts it once for all its layers."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
            return RMSNormFn.apply(x, norm.weight, norm.eps)
        # Same values, bit for bit, without the cost of an autograd Function.
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)  # lower precision: the reference's fp32 normalisation


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return RopeFn.apply(x, cos, sin) if fused_ok(x) else rotate_pairs(x, cos, sin)


class RecordKV:
    """Keeps every layer's keys and values of a forward pass, autograd graph included."""

    def __init__(self):
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A checkpointed block writes again when the backward recomputes it; the first forward's
        # keys and values are the ones in the graph, so they stay.
        if layer == len(self.kv):
            self.kv.append((k, v))
        return k, v


class AfterPrefix:
    """Puts each row's prompt keys/values (recorded by RecordKV) in front of the row's own.

    index_select, not indexing: the backward of x[rows] with repeated rows adds with atomics in
    parallel on the CPU, in no fixed order, and GRPO's exact resume needs bitwise-equal gradients.
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor):
        self.kv, self.rows = kv, rows

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.kv[layer]
        k = torch.cat([pk.index_select(0, self.rows), k], dim=2)
        return k, torch.cat([pv.index_select(0, self.rows), v], dim=2)


class Documents:
    """The real positions of a packed batch, and where each sits in a [docs, L] grid that holds
    one document per row (L: the longest document).

    Packed rows leave padding at their ends, and a row of several documents needs a block-
    diagonal mask whose blocked-out scores are computed anyway. So the layers work on the N
    real positions alone, [1, N, hidden], and attention scatters q, k and v into the grid, where
    plain causal attention within a row is attention within the document, and gathers its
    output back. Grid slots past a document's end are zeros that no real query can see.
    """

    def __init__(self, real: torch.Tensor, doc: torch.Tensor, counts: torch.Tensor, length: int):
        self.real = real  # [N] flat indices of the real positions, row-major
        self.docs, self.length = counts.numel(), length
        # A document's positions come in row order; number them within the document.
        order = torch.argsort(doc, stable=True)
        within = torch.empty_like(doc)
        within[order] = torch.arange(doc.numel(), device=doc.device) - (counts.cumsum(0) - counts)[doc[order]]
        self.slot = doc * self.length + within  # [N] index into the flattened grid

    @classmethod
    def of(cls, segment_ids: torch.Tensor) -> "Documents | None":
        """The grid of a batch, or None where attention over the batch's own rows, under a
        block-diagonal mask, is less work: a few long documents among many short ones would
        leave most of a one-per-row grid empty, and attention over it would be mostly padding."""
        B, T = segment_ids.shape
        flat = segment_ids.reshape(-1)
        real = (flat >= 0).nonzero().squeeze(1)
        if real.numel() == 0:
            raise ValueError("segment_ids: every position is padding (negative); nothing to compute")
        row = torch.div(real, T, rounding_mode="floor")
        _, doc = torch.unique(row * (int(flat.max()) + 1) + flat[real], return_inverse=True)
        counts = torch.bincount(doc)
        length = int(counts.max())
        if counts.numel() * length**2 > B * T * T:
            return None
        return cls(real, doc, counts, length)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the real positions."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.real)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [docs, L, ...], zeros past each document's end."""
        out = x.new_zeros(self.docs * self.length, *x.shape[2:])
        return out.index_copy(0, self.slot, x[0]).view(self.docs, self.length, *x.shape[2:])

    def from_grid(self, y: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[docs, L, ...] -> [1, N, ...], or [1, n, ...] with the real positions `keep` alone."""
        return y.reshape(-1, *y.shape[2:]).index_select(0, self.slot if keep is None else self.slot[keep])[None]

    def unflat(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...], zeros at the padding."""
        out = x.new_zeros(B * T, *x.shape[2:])
        return out.index_copy(0, self.real, x[0]).view(B, T, *x.shape[2:])


def select(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[B, T, ...] -> [1, n, ...]: the flat positions `keep` (all, unchanged, when None)."""
    return x if keep is None else x.reshape(-1, *x.shape[2:]).index_select(0, keep)[None]


# Attention over short sequences on the CPU materialises its scores: the flash kernel's tiling
# and bookkeeping then cost more than they save, since they pay off only over long sequences
# (docs/BENCHMARKS.md), and the scores are small.
SCORES_PER_HEAD = 1 << 15  # query x key positions
SCORES_TOTAL = 1 << 24  # elements of the whole [B, H, T, S] score tensor


def scores_fit(q: torch.Tensor, k: torch.Tensor) -> bool:
    B, H, T, _ = q.shape
    S = k.shape[2]
    return q.device.type == "cpu" and T * S <= SCORES_PER_HEAD and B * H * T * S <= SCORES_TOTAL


def attention_by_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask) v for q [B, H, T, D], k/v [B, KV, S, D] and an additive mask
    [B or 1, 1, T, S] (None: causal, the queries being the last T positions), as [B, T, H·D]:
    the layout the output projection reads.

    The G query heads that share a KV head are stacked into one [G·T, D] block, so keys and
    values are read in place, never repeated per head.
    """
    if fused_ok(q, k, v):
        return ScoresAttentionFn.apply(q, k, v, mask)
    return scores_attention(q, k, v, mask)[0]


# ---------------------------------------------------------------------------------- the layers


def qkv(attn, x, cos, sin, documents: Documents | None):
    """q, k and v in heads-major layout, q and k rotated; on the documents' grid if any."""
    weights = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    if not hasattr(attn, "q_norm") and fused_ok(x, *weights):
        biases = attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias
        slot, grid = (None, x.shape[:2]) if documents is None else (documents.slot, (documents.docs, documents.length))
        return QKVRopeFn.apply(x, *weights, *biases, cos, sin, slot, grid, attn.head_dim)
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim)
    k = attn.k_proj(x).view(B, T, attn.n_kv, attn.head_dim)
    v = attn.v_proj(x).view(B, T, attn.n_kv, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    if documents is not None:
        q, k, v = documents.grid(q), documents.grid(k), documents.grid(v)
    return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def attention(attn, x, cos, sin, mask, kv, keep: torch.Tensor | None = None,
              documents: Documents | None = None) -> torch.Tensor:
    """Attention.forward. kv: where keys and values go and come from (a KVCache, RecordKV or
    AfterPrefix), or None; keep: flat indices of the positions whose output is wanted, see block;
    documents: the batch's grid, one document per row, causal within it."""
    B, T, _ = x.shape
    if documents is not None:
        B, T = documents.docs, documents.length
    q, k, v = qkv(attn, x, cos, sin, documents)  # [B, H, T, D], [B, KV, T, D] x 2
    if kv is not None:
        k, v = kv.write(attn.layer_idx, k, v)
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # autocast: the additive mask follows the query's dtype
    if T == 1 and attn.n_kv != attn.n_heads:
        # Decoding: the query heads sharing a KV head become that head's queries, so K/V are
        # read once per KV head and never copied (expanding them is the main cost on CPU).
        q = q.view(B, attn.n_kv, attn.n_heads // attn.n_kv, attn.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.o_proj(select(y.reshape(B, 1, -1), keep))
    gqa = attn.n_kv != attn.n_heads
    if scores_fit(q, k):
        y = attention_by_matmul(q, k, v, mask)  # [B, T, H·D]
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
    return attn.o_proj(select(y, keep) if documents is None else documents.from_grid(y, keep))


def mlp(m, x: torch.Tensor) -> torch.Tensor:
    weights = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
    if m.down_proj.bias is None and fused_ok(x, *weights):
        return SwiGLUFn.apply(x, *weights)
    h, up = F.silu(m.gate_proj(x)), m.up_proj(x)
    return m.down_proj(h * up if h.requires_grad else h.mul_(up))  # in place where no graph keeps h


def block(layer, x, cos, sin, mask, kv, keep: torch.Tensor | None = None,
          documents: Documents | None = None) -> torch.Tensor:
    """Block.forward. keep: flat indices of the positions whose output is wanted, returned as
    [1, n, hidden]. Attention still reads every position's keys and values; the output projection
    and the MLP run at the kept positions alone (the last layer under a loss on some positions:
    nothing else needs it)."""
    h = attention(layer.self_attn, rms_norm(layer.input_layernorm, x), cos, sin, mask, kv, keep, documents)
    x = x + h if keep is None else select(x, keep) + h
    return x + mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, x))


class BlockPass:
    """What the fast path hands each Block (its `fast` argument): the block runs as `block` here,
    with the positions to keep and the documents' grid. The block is still called as a module,
    so hooks (FSDP2's gathering of its weights, checkpointing) see it as usual."""

    def __init__(self, keep: torch.Tensor | None = None, documents: Documents | None = None):
        self.keep, self.documents = keep, documents

    def __call__(self, layer, x, cos, sin, mask, kv) -> torch.Tensor:
        return block(layer, x, cos, sin, mask, kv, self.keep, self.documents)


# ---------------------------------------------------------------------------------- the model


def blocks(model, x, positions, mask, kv, rope=None, keep=None, documents=None, decoding=False) -> torch.Tensor:
    """The decoder layers over embeddings x; `keep` applies to the last layer alone."""
    if rope is None:
        rope = model.rope(positions, x.dtype)
    if mask is not None:
        mask = additive_mask(mask, x.dtype)
    last = len(model.model.layers) - 1
    for i, layer in enumerate(model.model.layers):
        x = model.run_block(layer, x, *rope, mask, kv, BlockPass(keep if i == last else None, documents),
                            decoding=decoding)
    return x


def hidden(model, input_ids, positions, attention_mask, segment_ids, cache, where=None):
    """Final-norm hidden states: [B, T, hidden]; for a packed batch on the documents' grid
    [1, N, hidden] of its real positions (returned with the grid); with `where` [1, n, hidden] at
    its positions alone (row-major)."""
    B, T = input_ids.shape
    positions = model.positions(input_ids, positions, attention_mask, cache)
    if segment_ids is not None:
        documents = Documents.of(segment_ids)
        if documents is not None:
            keep = None if where is None else documents.flat(where).nonzero().squeeze(1)
            cos, sin = model.rope(documents.grid(documents.flat(positions)[None]), model.dtype)
            x = model.model.embed_tokens(documents.flat(input_ids))[None]
            x = blocks(model, x, None, None, None, (cos, sin), keep, documents)
            return model.model.norm(x), documents
    start = cache.length if cache is not None else 0
    mask = model.mask(B, T, start, attention_mask, segment_ids, cache, input_ids.device)
    rope = None
    if cache is not None:
        # Decoding positions are below the cache size, so a table of them replaces the
        # per-step cos/sin with two lookups.
        if cache.rope is None:
            cos, sin = model.rope(torch.arange(cache.max_len, device=input_ids.device)[None], model.dtype)
            cache.rope = cos[0, 0], sin[0, 0]  # [max_len, D]
        rope = cache.rope[0][positions][:, None], cache.rope[1][positions][:, None]
    keep = None if where is None else where.reshape(-1).nonzero().squeeze(1)
    x = blocks(model, model.model.embed_tokens(input_ids), positions, mask, cache, rope, keep,
               decoding=cache is not None)
    if cache is not None:
        cache.length += T
    return model.model.norm(x), None


def hidden_states(model, input_ids, positions, attention_mask, segment_ids, cache) -> torch.Tensor:
    h, documents = hidden(model, input_ids, positions, attention_mask, segment_ids, cache)
    return h if documents is None else documents.unflat(h, *input_ids.shape)


def head(model, h: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    logp, entropy = head_logprobs(h, model.lm_head.weight, targets, temperature, with_entropy)
    return (logp, entropy) if with_entropy else logp


def logprobs(model, r) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Transformer(Logprobs(...)): the head at the chosen positions alone, a block at a time."""
    h, documents = hidden(model, r.input_ids, r.positions, r.attention_mask, r.segment_ids, None, r.where)
    if r.where is not None:
        h = h[0]
    elif documents is not None:
        h = documents.unflat(h, *r.input_ids.shape)
    return head(model, h, r.targets, r.temperature, r.with_entropy)


def after_prefix(model, prefix, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [N, 1 + T, hidden]: each prompt's last position, then the row's
    tokens. Each distinct prompt runs once; its keys and values are recorded with their graph
    and read by every row that continues it."""
    U, P = prefix.ids.shape
    record = RecordKV()
    prompt_positions = (prefix.mask.long().cumsum(-1) - 1).clamp(min=0)
    prompt_mask = model.mask(U, P, 0, prefix.mask, None, None, prefix.ids.device)
    ends = torch.arange(1, U + 1, device=prefix.ids.device) * P - 1  # left-padded: each row's last position
    N, T = input_ids.shape
    # One lookup for prompts and completions: each lookup's gradient is a dense [vocab, hidden]
    # tensor, and two would be alive together in the backward.
    embeds = model.model.embed_tokens(torch.cat([prefix.ids.reshape(-1), input_ids.reshape(-1)]))
    prompt_x, x = embeds.split([U * P, N * T])
    last = model.model.norm(blocks(model, prompt_x.view(U, P, -1), prompt_positions, prompt_mask, record, keep=ends))
    last = last.view(U, 1, -1).index_select(0, prefix.rows)
    if T == 0:
        return last
    device = input_ids.device
    lengths = prefix.mask.long().sum(-1)[prefix.rows]  # [N]
    positions = lengths[:, None] + torch.arange(T, device=device)
    keys = prefix.mask.bool()[prefix.rows][:, None, :].expand(N, T, P)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None].expand(N, T, T)
    mask = torch.cat([keys, causal], dim=-1)[:, None]  # [N, 1, T, P + T]
    x = blocks(model, x.view(N, T, -1), positions, mask, AfterPrefix(record.kv, prefix.rows))
    return torch.cat([last, model.model.norm(x)], dim=1)


def prefix_logprobs(model, r) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Transformer(PrefixLogprobs(...)): each prompt once, then the head at the chosen positions."""
    h = after_prefix(model, r.prefix, r.input_ids)
    return head(model, h if r.where is None else h[r.where], r.targets, r.temperature, r.with_entropy)
