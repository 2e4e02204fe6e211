"""A decoder-only transformer that reads Llama, Qwen2 and Qwen3 checkpoints.

The three families are one architecture with a few switches:

    Llama  : RMSNorm, RoPE (optionally "llama3"-scaled), GQA, SwiGLU, optional biases
    Qwen2  : Llama + bias on the q/k/v projections
    Qwen3  : Llama + RMSNorm on each query/key head before RoPE, explicit head_dim

Module and parameter names mirror Hugging Face's, so a checkpoint's state dict loads with
`strict=True` and no renaming table. The model knows nothing of training or sampling: it maps
token ids (plus optional positions, padding mask, packing segments and a KV cache) to logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .fast.fused import QKVRopeFn, RMSNormFn, RopeFn, ScoresAttentionFn, SwiGLUFn, fused_ok, rotate_pairs, scores_attention
from .fast.lm_head import head_logprobs

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o (Llama, Qwen3); Qwen2 always has q/k/v bias
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    # ---- Hugging Face config.json <-> ModelConfig ----

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a transformers config dict, refusing values this model would silently get wrong."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported; supported: 'silu'")
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported; only full attention is")
        layer_types = set(hf.get("layer_types") or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"{source}: layer_types {sorted(layer_types)} not supported; only 'full_attention'")
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported; only 1")
        # transformers >= 5 nests theta and scaling in rope_parameters; older files use two keys.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope if rope else hf.get("rope_scaling")
        if scaling is not None and rope_type_of(scaling) == "default":
            scaling = None
        if scaling is not None and rope_type_of(scaling) not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"{source}: rope type {rope_type_of(scaling)!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
        if model_type == "qwen2" and hf.get("attention_bias") is False:
            raise ValueError(f"{source}: qwen2 without q/k/v bias is not supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: hf[k] for k in known if k in hf and k not in ("rope_theta", "rope_scaling")}
        if model_type == "qwen2":
            kwargs.pop("attention_bias", None)
        kwargs.update(rope_theta=float(theta), rope_scaling=scaling)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers (4.x and 5.x) reads as the same model."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})},
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        else:
            out["use_sliding_window"] = False
        return out


def rope_type_of(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if rope_type_of(cfg.rope_scaling) == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        s = cfg.rope_scaling
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, blended, inv_freq)
    return inv_freq


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as 0 / -inf: attention turns a boolean mask
    into an additive one on every call, so a forward converts it once for all its layers."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return RMSNormFn.apply(x, self.weight, self.eps)
            # Same values, bit for bit, without the cost of an autograd Function (~40 us a call).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Lower precision: normalise in fp32 and cast back before the weight, as the reference does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the angles of cos/sin (see Transformer.rope and fused.rotate_pairs)."""
    return RopeFn.apply(x, cos, sin) if fused_ok(x) else rotate_pairs(x, cos, sin)


class KVCache:
    """Preallocated keys/values for batched decoding, written by index (no reallocation per step).

    Prompts are left-padded so every row writes the same column each step; `valid[b, s]` says
    whether slot s of row b holds a real token, so padding is never attended (slots start valid,
    so a decoding step, which only adds real tokens, writes nothing there). Rows can be dropped
    with `keep` once they finish, so finished rows stop costing compute; rows can also be repeated
    with it, e.g. to prefill each distinct prompt once and then sample several continuations.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch, max_len, device=device, dtype=torch.bool)
        self.length = 0
        self.max_len = max_len
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of every slot's position

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (bool mask) or gather (indices, repeats allowed) rows of the batch."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.valid = self.valid[rows]


@dataclass
class SharedPrefix:
    """Prompts that several rows continue, e.g. the G completions of one GRPO group.

    Their keys and values are computed once per prompt (with gradients) and read by every row
    that continues it, instead of once per row: the prompt's share of the work shrinks G-fold.
    """

    ids: torch.Tensor  # [U, P] the distinct prompts, left-padded
    mask: torch.Tensor  # [U, P] 1 = real token
    rows: torch.Tensor  # [N] which prompt each row continues


class _RecordKV:
    """Keeps every layer's keys and values of a forward pass, autograd graph included."""

    def __init__(self):
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A checkpointed block writes again when the backward recomputes it; the first forward's
        # keys and values are the ones in the graph, so they stay.
        if layer == len(self.kv):
            self.kv.append((k, v))
        return k, v


class _AfterPrefix:
    """Puts each row's prompt keys/values (recorded by _RecordKV) in front of the row's own.

    index_select, not indexing: the backward of x[rows] with repeated rows adds with atomics in
    parallel on the CPU, in no fixed order, and GRPO's exact resume needs bitwise-equal gradients.
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor):
        self.kv, self.rows = kv, rows

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.kv[layer]
        k = torch.cat([pk.index_select(0, self.rows), k], dim=2)
        return k, torch.cat([pv.index_select(0, self.rows), v], dim=2)


class _Documents:
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
    def of(cls, segment_ids: torch.Tensor) -> "_Documents | None":
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


def _select(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[B, T, ...] -> [1, n, ...]: the flat positions `keep` (all, unchanged, when None)."""
    return x if keep is None else x.reshape(-1, *x.shape[2:]).index_select(0, keep)[None]


# Attention over short sequences on the CPU materialises its scores: the flash kernel's tiling
# and bookkeeping then cost more than they save (slower at a few hundred positions, faster
# beyond; docs/BENCHMARKS.md), and the scores are small.
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: flat indices of the positions whose output is wanted (default all), see Block."""
        B, T, _ = x.shape
        documents = cache if isinstance(cache, _Documents) else None
        if documents is not None:  # one document per row, causal within it
            B, T, cache = documents.docs, documents.length, None
        q, k, v = self._qkv(x, cos, sin, documents)  # [B, H, T, D], [B, KV, T, D] x 2
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # autocast: the additive mask follows the query's dtype
        if T == 1 and self.n_kv != self.n_heads:
            # Decoding: the query heads sharing a KV head become that head's queries, so K/V are
            # read once per KV head and never copied (expanding them is the main cost on CPU).
            q = q.view(B, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o_proj(_select(y.reshape(B, 1, -1), keep))
        gqa = self.n_kv != self.n_heads
        if scores_fit(q, k):
            y = attention_by_matmul(q, k, v, mask)  # [B, T, H·D]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
            y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(_select(y, keep) if documents is None else documents.from_grid(y, keep))

    def _qkv(self, x, cos, sin, documents: _Documents | None):
        """q, k and v in heads-major layout, q and k rotated; on the documents' grid if any."""
        weights = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        if not hasattr(self, "q_norm") and fused_ok(x, *weights):
            biases = self.q_proj.bias, self.k_proj.bias, self.v_proj.bias
            slot, grid = (None, x.shape[:2]) if documents is None else (documents.slot, (documents.docs, documents.length))
            return QKVRopeFn.apply(x, *weights, *biases, cos, sin, slot, grid, self.head_dim)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if documents is not None:
            q, k, v = documents.grid(q), documents.grid(k), documents.grid(v)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if self.down_proj.bias is None and fused_ok(x, *weights):
            return SwiGLUFn.apply(x, *weights)
        h, up = F.silu(self.gate_proj(x)), self.up_proj(x)
        return self.down_proj(h * up if h.requires_grad else h.mul_(up))  # in place where no graph keeps h


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, keep: torch.Tensor | None = None):
        """keep: flat indices of the positions whose output is wanted, returned as [1, n, hidden].
        Attention still reads every position's keys and values; the output projection and the
        MLP run at the kept positions alone (the last layer under a logits mask: a loss on the
        replies needs nothing else from it)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, keep)
        x = x + h if keep is None else _select(x, keep) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Causal LM. Parameter names equal transformers' `*ForCausalLM` state-dict keys.

    grad_checkpointing: when True, every forward that records gradients (training; never
    sampling, evaluation or no-grad passes) runs each block under torch.utils.checkpoint, so a
    block keeps only its input and the backward recomputes its activations: one more block
    forward each, for not storing them. The model has no dropout, so the recomputation gives the
    same values bit for bit, and non-reentrant checkpointing replays the autocast state.

    chunked_head: with `targets=`, forward returns their log-probabilities computed by
    lm_head.head_logprobs a block of positions at a time, never holding [positions × vocab]
    logits (True, the default), or through the plain head and log-softmax (False, the reference).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.grad_checkpointing = False
        self.chunked_head = True
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a buffer: it must stay fp32 whatever dtype the weights are cast to, and it must be
        # real even when the module is built on the meta device for loading.
        with torch.device("cpu"):
            self._inv_freq = rope_inv_freq(cfg)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) for matrices, ones for norms, zeros for biases)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [B, T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)[:, None]  # [B, 1, T, D]
        sin = torch.cat((-sin, sin), dim=-1)[:, None]
        return cos.to(dtype), sin.to(dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]. See `forward` for the arguments."""
        h, documents = self._hidden(input_ids, positions, attention_mask, segment_ids, cache)
        return h if documents is None else documents.unflat(h, *input_ids.shape)

    def _hidden(self, input_ids, positions, attention_mask, segment_ids, cache,
                logits_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, _Documents | None]:
        """hidden_states, but for packed documents [1, N, hidden] over their real positions alone,
        and with a logits_mask [1, n, hidden] at its positions alone (row-major)."""
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache overflow: {start + T} positions > cache size {cache.max_len}")
        if positions is None:
            if attention_mask is not None:
                # Left padding: real tokens are numbered from 0 in each row.
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(start, start + T, device=device).expand(B, T)
        # Decode steps skip this check (a host sync per token); generate validates lengths upfront.
        if start == 0 and int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence needs position {int(positions.max())} but the model's context is "
                f"{self.config.max_position_embeddings} (max_position_embeddings)"
            )
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids take no cache or attention_mask (negative ids mark padding)")
            documents = _Documents.of(segment_ids)
            if documents is not None:
                keep = None if logits_mask is None else documents.flat(logits_mask).nonzero().squeeze(1)
                return self._documents(input_ids, positions, documents, keep)
        mask = self._attention_mask(B, T, start, attention_mask, segment_ids, cache, device)
        rope = None
        if cache is not None:
            # Decoding positions are below the cache size, so a table of them replaces the
            # per-step cos/sin with two lookups.
            if cache.rope is None:
                cos, sin = self.rope(torch.arange(cache.max_len, device=device)[None], self.dtype)
                cache.rope = cos[0, 0], sin[0, 0]  # [max_len, D]
            rope = cache.rope[0][positions][:, None], cache.rope[1][positions][:, None]
        keep = None if logits_mask is None else logits_mask.reshape(-1).nonzero().squeeze(1)
        x = self._blocks(self.model.embed_tokens(input_ids), positions, mask, cache, rope, keep)
        if cache is not None:
            cache.length += T
        return self.model.norm(x), None

    def _documents(self, input_ids, positions, documents: _Documents, keep=None) -> tuple[torch.Tensor, _Documents]:
        """Final-norm hidden states [1, N, hidden] of the N real positions of a packed batch
        ([1, n, hidden] of the n real positions `keep` where given)."""
        cos, sin = self.rope(documents.grid(documents.flat(positions)[None]), self.model.embed_tokens.weight.dtype)
        x = self.model.embed_tokens(documents.flat(input_ids))[None]
        for i, layer in enumerate(self.model.layers):
            x = self._block(layer, x, cos, sin, None, documents, keep if i == len(self.model.layers) - 1 else None)
        return self.model.norm(x), documents

    def _blocks(self, x, positions, mask, cache, rope=None, keep=None) -> torch.Tensor:
        """The decoder layers over embeddings x [B, T, hidden]."""
        cos, sin = rope if rope is not None else self.rope(positions, x.dtype)
        if mask is not None:
            mask = additive_mask(mask, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = self._block(layer, x, cos, sin, mask, cache, keep if i == len(self.model.layers) - 1 else None)
        return x

    def _block(self, layer: Block, x, cos, sin, mask, cache, keep) -> torch.Tensor:
        """One block, checkpointed under grad_checkpointing when gradients are recorded. A KV
        cache (decoding) is never checkpointed: the recomputation would write into it again."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not isinstance(cache, KVCache):
            # Non-reentrant: gradients also reach tensors the block reads without taking them as
            # arguments (a shared prompt's keys and values), and it works under DDP and FSDP2.
            return checkpoint(layer, x, cos, sin, mask, cache, keep, use_reentrant=False)
        return layer(x, cos, sin, mask, cache, keep)

    def _after_prefix(self, input_ids: torch.Tensor, prefix: SharedPrefix) -> torch.Tensor:
        """Final-norm hidden states [N, 1 + T, hidden]: each prompt's last position, then the row's tokens."""
        U, P = prefix.ids.shape
        if int(prefix.mask.sum(-1).max()) + input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"prompt + {input_ids.shape[1]} tokens exceed the model's context "
                             f"({self.config.max_position_embeddings} positions)")
        record = _RecordKV()
        prompt_positions = (prefix.mask.long().cumsum(-1) - 1).clamp(min=0)
        prompt_mask = self._attention_mask(U, P, 0, prefix.mask, None, None, prefix.ids.device)
        ends = torch.arange(1, U + 1, device=prefix.ids.device) * P - 1  # left-padded: each row's last position
        N, T = input_ids.shape
        # One lookup for prompts and completions: each lookup's gradient is a dense [vocab, hidden]
        # tensor, and two would be alive together in the backward.
        embeds = self.model.embed_tokens(torch.cat([prefix.ids.reshape(-1), input_ids.reshape(-1)]))
        prompt_x, x = embeds.split([U * P, N * T])
        last = self.model.norm(self._blocks(prompt_x.view(U, P, -1), prompt_positions, prompt_mask, record, keep=ends))
        last = last.view(U, 1, -1).index_select(0, prefix.rows)
        if T == 0:
            return last
        device = input_ids.device
        lengths = prefix.mask.long().sum(-1)[prefix.rows]  # [N]
        positions = lengths[:, None] + torch.arange(T, device=device)
        keys = prefix.mask.bool()[prefix.rows][:, None, :].expand(N, T, P)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None].expand(N, T, T)
        mask = torch.cat([keys, causal], dim=-1)[:, None]  # [N, 1, T, P + T]
        x = self._blocks(x.view(N, T, -1), positions, mask, _AfterPrefix(record.kv, prefix.rows))
        return torch.cat([last, self.model.norm(x)], dim=1)

    @staticmethod
    def _attention_mask(B, T, start, attention_mask, segment_ids, cache, device) -> torch.Tensor | None:
        """Boolean [B, 1, T, S] mask (True = may attend), or None for plain causal attention."""
        if cache is not None:
            if attention_mask is not None:
                cache.valid[:, start : start + T] = attention_mask.bool()
            keys = cache.valid[:, : start + T]  # [B, S]
            if T == 1:
                return keys[:, None, None, :]
            causal = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
            mask = causal[None] & keys[:, None, :]
        elif segment_ids is not None:  # padding (negative ids) sees padding: no row is empty
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        elif attention_mask is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = causal[None] & attention_mask.bool()[:, None, :]
        else:
            return None
        # A query with no visible key (a leading pad) would give NaN; let it see itself instead.
        diag = torch.zeros(T, mask.shape[-1], dtype=torch.bool, device=device)
        diag[torch.arange(T), torch.arange(start, start + T)] = True
        return (mask | diag[None])[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_slice: slice | None = None,
        logits_mask: torch.Tensor | None = None,
        prefix: SharedPrefix | None = None,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, vocab] for token ids [B, T]; with `targets`, their log-probabilities.

        positions      : [B, T] RoPE positions; default counts real tokens (per row) or 0..T-1.
        attention_mask : [B, T] 1 for real tokens, 0 for padding; padding is never attended.
        segment_ids    : [B, T] packed documents; tokens attend only within their own segment, and
                         negative ids mark padding, whose logits mean nothing (see _Documents).
        cache          : KVCache to read and extend (decoding).
        logits_slice   : positions to compute logits for (default all); the LM head is a large
                         share of a small model's FLOPs, so scoring a completion skips the prompt.
        logits_mask    : [B, T] bool: logits only where True, as [n, vocab] in row-major order
                         (a loss on the replies alone needs no logits for the prompts).
        prefix         : rows continue these shared prompts (nothing else may be given with it);
                         the logits are then [N, 1 + T, vocab], the first being those after the prompt.
        targets        : token ids shaped like the logits without their vocab dimension; forward then
                         returns log softmax(logits / temperature) at them in float32, [same shape],
                         and with with_entropy=True also each position's entropy (no gradient). For
                         losses and scoring: see chunked_head.
        """
        if prefix is not None:
            if positions is not None or attention_mask is not None or segment_ids is not None or cache is not None:
                raise ValueError("prefix= takes no positions, attention_mask, segment_ids or cache")
            h = self._after_prefix(input_ids, prefix)
        else:
            if segment_ids is not None and logits_mask is not None and bool((logits_mask & (segment_ids < 0)).any()):
                raise ValueError("logits_mask selects padding (a negative segment id)")
            h, documents = self._hidden(input_ids, positions, attention_mask, segment_ids, cache, logits_mask)
            if logits_mask is not None:
                return self._head(h[0], targets, temperature, with_entropy)
            if documents is not None:
                h = documents.unflat(h, *input_ids.shape)
        if logits_mask is not None:
            return self._head(h[logits_mask], targets, temperature, with_entropy)
        return self._head(h if logits_slice is None else h[:, logits_slice], targets, temperature, with_entropy)

    def _head(self, h: torch.Tensor, targets: torch.Tensor | None, temperature: float, with_entropy: bool):
        if targets is None:
            return self.lm_head(h)
        logp, entropy = head_logprobs(h, self.lm_head.weight, targets, temperature, with_entropy,
                                      chunked=self.chunked_head)
        return (logp, entropy) if with_entropy else logp

    def num_params(self, with_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if with_embeddings else n - self.model.embed_tokens.weight.numel()

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs per token: 2 per matmul weight, plus attention over `context` keys."""
        cfg = self.config
        matmul = self.num_params() - self.model.embed_tokens.weight.numel()
        if cfg.tie_word_embeddings:
            matmul += self.lm_head.weight.numel()
        attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context
        return 2.0 * matmul + attn
