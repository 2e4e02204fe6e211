"""A decoder-only transformer that reads Llama, Qwen2 and Qwen3 checkpoints.

The three families are one architecture with a few switches:

    Llama  : RMSNorm, RoPE (optionally "llama3"-scaled), GQA, SwiGLU, optional biases
    Qwen2  : Llama + bias on the q/k/v projections
    Qwen3  : Llama + RMSNorm on each query/key head before RoPE, explicit head_dim

Module and parameter names mirror Hugging Face's, so a checkpoint's state dict loads with
`strict=True` and no renaming table. The model knows nothing of training or sampling: it maps
token ids (plus optional positions, padding mask, packing segments and a KV cache) to logits,
or to the log-probabilities of given tokens.

What is written here is the reference: each layer as the papers and transformers state it. The
same computations made fast (written-out backward passes, a documents' grid for packed batches,
prompts computed once for all their completions, the LM head a block of positions at a time)
are in nanopost/fast/transformer.py. `Transformer.impl` picks one ("fast", the default, or
"reference"); the tests hold the two to the same values and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
IMPLS = ("fast", "reference")


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+D/2}) by the angles whose cos/sin Transformer.rope gives, `sin`
    carrying the sign of the first half: (x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers does in every dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the fast path's cos/sin of every slot

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values [B, KV, T, D]; returns all of them so far [B, KV, S, D]."""
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
    """Prompts that several rows continue, e.g. the G completions of one GRPO group."""

    ids: torch.Tensor  # [U, P] the distinct prompts, left-padded
    mask: torch.Tensor  # [U, P] 1 = real token
    rows: torch.Tensor  # [N] which prompt each row continues


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]. mask: [B, 1, T, S] bool (True = may attend), or None
        for plain causal attention; cache: the keys and values of the positions before these."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head's query and key
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)  # [B, KV, S, D]: the earlier positions too
        # Grouped-query attention: each key/value head serves n_heads / n_kv query heads.
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, fast=None) -> torch.Tensor:
        if fast is not None:  # impl="fast": the same block by other means (fast/transformer.py)
            return fast(self, x, cos, sin, mask, cache)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Logprobs:
    """Passed to the model instead of token ids: it returns log softmax(logits / temperature) at
    `targets`, in float32 (and, with with_entropy, each position's entropy, without gradient),
    instead of logits. For losses and scoring.

    targets : [B, T] the token each position is scored on (e.g. the next input token)
    where   : [B, T] bool: score these positions only; targets and result are then [n], in
              row-major order (a loss on the replies needs nothing at the prompts)
    positions, attention_mask, segment_ids: as for token ids, see Transformer.forward
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    where: torch.Tensor | None = None
    temperature: float = 1.0
    with_entropy: bool = False


@dataclass
class PrefixLogprobs:
    """Logprobs for rows [N, T] that each continue a prompt of `prefix` (row i continues prompt
    prefix.rows[i]), at 1 + T positions a row: the prompt's last, then the row's own tokens but
    the last. targets [N, 1 + T], or [n] with where [N, 1 + T], as in Logprobs."""

    prefix: SharedPrefix
    input_ids: torch.Tensor
    targets: torch.Tensor
    where: torch.Tensor | None = None
    temperature: float = 1.0
    with_entropy: bool = False


@dataclass
class NextTokenLogits:
    """Passed to the model instead of token ids: it returns the logits [B, vocab] after each row's
    last position alone (a sampler's prefill, whose other positions' logits would go unused)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    cache: KVCache | None = None


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False):
    """log softmax(logits / temperature) at `targets`, in float32 (float64 for float64 logits), and
    each position's entropy (monitored: no gradient) when asked. logits [..., V], targets [...].
    The log-prob stays differentiable and in float32 even for bf16 logits: a bf16 log-prob would
    be too coarse for the ratio π_θ/π_old. The temperature is checked by the caller."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logp = log_probs.gather(-1, targets.long()[..., None])[..., 0]
    if not with_entropy:
        return logp
    with torch.no_grad():
        return logp, -(log_probs.exp() * log_probs).sum(-1)


class Transformer(nn.Module):
    """Causal LM. Parameter names equal transformers' `*ForCausalLM` state-dict keys.

    impl: "fast" (the default) or "reference", see the module's docstring; set it at any time.
    Each entry (hidden_states and the log-prob requests) checks its inputs first, then hands them
    to nanopost/fast/transformer.py or computes them here: both paths refuse the same inputs.

    grad_checkpointing: when True, every forward that records gradients (training; never
    sampling, evaluation or no-grad passes) runs each block under torch.utils.checkpoint, so a
    block keeps only its input and the backward recomputes its activations: one more block
    forward each, for not storing them. The model has no dropout, so the recomputation gives the
    same values bit for bit, and non-reentrant checkpointing replays the autocast state.

    What it computes depends on what it is called with; every training pass goes through
    forward, the only entry a DDP or FSDP wrapper sees:
        model(ids, ...)                     logits [B, T, vocab]
        model(Logprobs(ids, targets))       the log-probabilities of given tokens (losses, scoring)
        model(PrefixLogprobs(prefix, ...))  the same for rows continuing shared prompts (GRPO groups)
        model(NextTokenLogits(ids, ...))    logits [B, vocab] after each row's last position
    """

    def __init__(self, cfg: ModelConfig, impl: str = "fast"):
        super().__init__()
        self.config = cfg
        self.impl = impl
        self.grad_checkpointing = False
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a buffer: it must stay fp32 whatever dtype the weights are cast to, and it must be
        # real even when the module is built on the meta device for loading.
        with torch.device("cpu"):
            self._inv_freq = rope_inv_freq(cfg)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {value!r}")
        self._impl = value

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
        """cos and sin [B, 1, T, D] of positions [B, T], sin signed for apply_rope."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [B, T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)[:, None]  # [B, 1, T, D]
        sin = torch.cat((-sin, sin), dim=-1)[:, None]
        return cos.to(dtype), sin.to(dtype)

    def positions(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """The RoPE positions [B, T] (given, or counted), checked against the context and the cache."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache overflow: {start + T} positions > cache size {cache.max_len}")
        if positions is None:
            if attention_mask is not None:
                # Left padding: real tokens are numbered from 0 in each row.
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        # Decode steps skip this check (a host sync per token); generate validates lengths upfront.
        if start == 0 and int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence needs position {int(positions.max())} but the model's context is "
                f"{self.config.max_position_embeddings} (max_position_embeddings)"
            )
        return positions

    @staticmethod
    def mask(B: int, T: int, start: int, padding: torch.Tensor | None, segment_ids: torch.Tensor | None,
             cache: KVCache | None, device) -> torch.Tensor | None:
        """Boolean [B, 1, T, S] mask (True = may attend) for T new positions after `start` earlier
        ones, or None for plain causal attention. padding: [B, T] 1 = real token (left padding)."""
        if cache is not None:
            if padding is not None:
                cache.valid[:, start : start + T] = padding.bool()
            keys = cache.valid[:, : start + T]  # [B, S]
            if T == 1:
                return keys[:, None, None, :]
            causal = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
            mask = causal[None] & keys[:, None, :]
        elif segment_ids is not None:  # padding (negative ids) sees padding: no row is empty
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        elif padding is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = causal[None] & padding.bool()[:, None, :]
        else:
            return None
        # A query with no visible key (a leading pad) would give NaN; let it see itself instead.
        diag = torch.zeros(T, mask.shape[-1], dtype=torch.bool, device=device)
        diag[torch.arange(T), torch.arange(start, start + T)] = True
        return (mask | diag[None])[:, None]

    @staticmethod
    def check_inputs(attention_mask, segment_ids, cache) -> None:
        if segment_ids is not None and (cache is not None or attention_mask is not None):
            raise ValueError("segment_ids take no cache or attention_mask (negative ids mark padding)")

    def run_block(self, block: Block, *args, decoding: bool = False) -> torch.Tensor:
        """block(*args), checkpointed under grad_checkpointing when gradients are recorded. A KV
        cache (decoding) is never checkpointed: the recomputation would write into it again."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not decoding:
            # Non-reentrant: gradients also reach tensors the block reads without taking them as
            # arguments (a shared prompt's keys and values), and it works under DDP and FSDP2.
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, input_ids: torch.Tensor | Logprobs | PrefixLogprobs | NextTokenLogits, *,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits [B, T, vocab] for token ids [B, T] (or what a request type above asks for).

        positions      : [B, T] RoPE positions; default counts real tokens (per row) or 0..T-1.
        attention_mask : [B, T] 1 for real tokens, 0 for padding; padding is never attended.
        segment_ids    : [B, T] packed documents; tokens attend only within their own segment, and
                         negative ids mark padding, whose logits mean nothing.
        cache          : KVCache to read and extend (decoding).
        """
        if isinstance(input_ids, Logprobs):
            return self._logprobs(input_ids)
        if isinstance(input_ids, PrefixLogprobs):
            return self._prefix_logprobs(input_ids)
        if isinstance(input_ids, NextTokenLogits):
            r = input_ids
            return self.lm_head(self.hidden_states(r.input_ids, attention_mask=r.attention_mask, cache=r.cache)[:, -1])
        return self.lm_head(self.hidden_states(input_ids, positions=positions, attention_mask=attention_mask,
                                               segment_ids=segment_ids, cache=cache))

    def hidden_states(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]: what the LM head reads. Arguments as forward's."""
        self.check_inputs(attention_mask, segment_ids, cache)
        if self.impl == "fast":
            return fast.hidden_states(self, input_ids, positions, attention_mask, segment_ids, cache)
        B, T = input_ids.shape
        positions = self.positions(input_ids, positions, attention_mask, cache)
        start = cache.length if cache is not None else 0
        mask = self.mask(B, T, start, attention_mask, segment_ids, cache, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            x = self.run_block(layer, x, cos, sin, mask, cache, decoding=cache is not None)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def _logprobs(self, r: Logprobs):
        self.check_inputs(r.attention_mask, r.segment_ids, None)
        check_temperature(r.temperature)
        if r.segment_ids is not None and r.where is not None and bool((r.where & (r.segment_ids < 0)).any()):
            raise ValueError("where selects padding (a negative segment id)")
        if self.impl == "fast":
            return fast.logprobs(self, r)
        h = self.hidden_states(r.input_ids, positions=r.positions, attention_mask=r.attention_mask,
                               segment_ids=r.segment_ids)
        return token_logprobs(self.lm_head(h if r.where is None else h[r.where]), r.targets, r.temperature,
                              r.with_entropy)

    def _prefix_logprobs(self, r: PrefixLogprobs):
        check_temperature(r.temperature)
        prefix, input_ids = r.prefix, r.input_ids
        if int(prefix.mask.sum(-1).max()) + input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"prompt + {input_ids.shape[1]} tokens exceed the model's context "
                             f"({self.config.max_position_embeddings} positions)")
        if self.impl == "fast":
            return fast.prefix_logprobs(self, r)
        # Each row as its whole sequence, the prompt left-padded: its last position is column P - 1.
        P = prefix.ids.shape[1]
        ids = torch.cat([prefix.ids[prefix.rows], input_ids], dim=1)
        mask = torch.cat([prefix.mask[prefix.rows], torch.ones_like(input_ids)], dim=1)
        h = self.hidden_states(ids, attention_mask=mask)[:, P - 1 :]
        return token_logprobs(self.lm_head(h if r.where is None else h[r.where]), r.targets, r.temperature,
                              r.with_entropy)

    def num_params(self, with_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if with_embeddings else n - self.model.embed_tokens.weight.numel()


from .fast import transformer as fast  # noqa: E402  (the fast path builds on the classes above)
