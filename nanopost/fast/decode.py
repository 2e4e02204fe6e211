"""One decoding step of a Transformer, with its weights packed for it.

A decoding step multiplies a few dozen rows, one token each, by every weight matrix. For the
small models post-training experiments start from, that is a long chain of small kernels whose
launch costs as much as their arithmetic. `PackedWeights` therefore copies each layer's weights
into the layout a step wants: q/k/v as one matrix and gate/up as another, so a layer runs four
matmuls instead of seven; every matrix stored [in, out], so each is a plain `x @ W`; residual
additions folded into the matmuls (addmm); RoPE turns queries and keys in one go (unless
they have norms of their own, as in Qwen3). In fp32 the gain of each RMSNorm is folded into the
matrix after it, so a norm is only its per-row scale, applied to the matmul's output
(RMSNorm(x) @ W = (x @ diag(g) W) / rms(x)): three small kernels where F.rms_norm runs about
eight on a CPU, which shortens a decoding step of the small models.

The math is Block.forward's with a KVCache and one token per row; only the order of some
multiplications and additions differs, by rounding (~1e-6 on logits). The weights are a snapshot:
pack again after they change (`generate` packs at every call). The copy costs memory, so
`decoder` packs only when it is small (PACK_LIMIT_BYTES); larger models, whose matmuls dominate
a step anyway, decode through the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..model import KVCache, Transformer
from .fused import rotate_pairs
from .transformer import additive_mask, rms_norm

PACK_LIMIT_BYTES = 1 << 30


@dataclass
class _Layer:
    qkv: torch.Tensor  # [hidden, (H + 2 KV) D]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [H D, hidden]
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # [hidden, 2 I]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [I, hidden]
    down_bias: torch.Tensor | None


def _pack(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights side by side as one [in, sum of out] matrix, and their biases.

    One transposing copy: concatenating the weights first and transposing the result would copy
    twice."""
    weight = torch.cat([lin.weight.t() for lin in linears], dim=1)
    bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    return weight, bias


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None):
    """residual + x @ weight + bias, the parts that are there, in as few kernels as may be."""
    if residual is None:
        return x @ weight if bias is None else torch.addmm(bias, x, weight)
    out = torch.addmm(residual, x, weight)
    return out if bias is None else out + bias


def _rms_scale(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """[B, 1]: 1 / sqrt(mean(x^2) + eps) of each row of x [B, hidden]."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(eps, n, n, value=1.0 / x.shape[-1]).rsqrt_()


class PackedWeights:
    def __init__(self, model: Transformer):
        self.model = model
        self.layers = []
        # bf16 and fp16 keep the norms as modules: a gain folded into their weights rounds twice as
        # far from the model's forward (which rounds the normalised input, then applies the gain).
        self.folded = model.dtype == torch.float32
        self.eps = torch.tensor(model.config.rms_norm_eps, device=model.device)
        with torch.no_grad():
            for block in model.model.layers:
                a, m = block.self_attn, block.mlp
                layer = _Layer(*_pack(a.q_proj, a.k_proj, a.v_proj), *_pack(a.o_proj),
                               *_pack(m.gate_proj, m.up_proj), *_pack(m.down_proj))
                if self.folded:
                    layer.qkv.mul_(block.input_layernorm.weight[:, None])
                    layer.gate_up.mul_(block.post_attention_layernorm.weight[:, None])
                self.layers.append(layer)

    def _norm_matmul(self, x: torch.Tensor, norm: torch.nn.Module, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """norm(x) @ weight + bias, for a weight packed after `norm`."""
        if not self.folded:
            return _matmul(norm(x), weight, bias)
        out, scale = x @ weight, _rms_scale(x, self.eps)
        return out.mul_(scale) if bias is None else torch.addcmul(bias, out, scale)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.model.model.norm
        if not self.folded:
            return norm(x)
        # The LM head is not packed (a large vocabulary's copy would not pay): its gain is applied here.
        return (x * _rms_scale(x, self.eps)).mul_(norm.weight)

    @staticmethod
    def size(model: Transformer) -> int | None:
        """Bytes a packed copy of model takes (its blocks' weights), or None when they are not
        plain tensors: sharded weights are packed by no one."""
        params = list(model.model.layers.parameters())
        if any(type(p.data) is not torch.Tensor for p in params):
            return None
        return sum(p.numel() * p.element_size() for p in params)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, vocab] after tokens [B, 1] at positions [B, 1], appended to a cache that a
        forward pass of the model has prefilled (which also made its RoPE table)."""
        model, cfg = self.model, self.model.config
        B = tokens.shape[0]
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        s = cache.length
        if s + 1 > cache.max_len:
            raise ValueError(f"KV cache overflow: {s + 1} positions > cache size {cache.max_len}")
        x = model.model.embed_tokens(tokens)[:, 0]  # [B, hidden]
        cos, sin = cache.rope[0][positions], cache.rope[1][positions]  # [B, 1, D]
        mask = additive_mask(cache.valid[:, None, None, : s + 1], x.dtype)  # [B, 1, 1, S]
        for i, (block, w) in enumerate(zip(model.model.layers, self.layers)):
            attn = block.self_attn
            qkv = self._norm_matmul(x, block.input_layernorm, w.qkv, w.qkv_bias)  # [B, (H + 2 KV) D]
            if cfg.qk_norm:
                q = rotate_pairs(rms_norm(attn.q_norm, qkv[:, : H * D].view(B, H, D)), cos, sin)
                k = rotate_pairs(rms_norm(attn.k_norm, qkv[:, H * D : (H + KV) * D].view(B, KV, D)), cos, sin)
            else:  # queries and keys side by side: one rotation for both
                qk = rotate_pairs(qkv[:, : (H + KV) * D].view(B, H + KV, D), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            cache.k[i, :, :, s] = k
            cache.v[i, :, :, s] = qkv[:, (H + KV) * D :].view(B, KV, D)
            # The query heads sharing a KV head act as that head's queries: K/V are read once.
            y = F.scaled_dot_product_attention(q.reshape(B, KV, H // KV, D), cache.k[i, :, :, : s + 1],
                                               cache.v[i, :, :, : s + 1], attn_mask=mask)
            x = _matmul(y.reshape(B, H * D), w.o, w.o_bias, residual=x)
            gate_up = self._norm_matmul(x, block.post_attention_layernorm, w.gate_up, w.gate_up_bias)
            gate, up = gate_up.chunk(2, dim=-1)
            x = _matmul(F.silu(gate).mul_(up), w.down, w.down_bias, residual=x)
        cache.length += 1
        return model.lm_head(self._final_norm(x))


def decoder(model: Transformer) -> Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]:
    """A function (tokens [B, 1], positions [B, 1], cache) -> logits [B, vocab] for decoding:
    through packed weights when their copy is at most PACK_LIMIT_BYTES, else (or with
    impl="reference") the model's forward."""
    size = PackedWeights.size(model)
    if model.impl == "fast" and size is not None and size <= PACK_LIMIT_BYTES:
        return PackedWeights(model).step
    return lambda tokens, positions, cache: model(tokens, positions=positions, cache=cache)[:, -1]
