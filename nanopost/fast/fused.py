"""Pieces of the training forward with their backward written out.

Autograd of a composite records every step, saves what each needs and replays them backwards,
one node, one allocation and one pass over memory per step. For the small tensors of CPU
training that bookkeeping is a large share of the time, whatever the tensors' sizes. Each
function here is one autograd node whose backward is the closed form, reusing buffers it no
longer needs; QKVRopeFn also makes q, k and v one matmul and one scatter into the documents'
grid (docs/BENCHMARKS.md has what each saved when it was measured). Each is checked
against autograd of its composite (tests/test_fused.py); the model uses them for fp32 gradients
outside autocast and the composite otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

once_differentiable = torch.autograd.function.once_differentiable


def fused_ok(*tensors: torch.Tensor) -> bool:
    """Whether a fused function should record this call: gradients are wanted and autocast is
    off (its per-op casts would not reach a hand-written backward)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.is_autocast_enabled(tensors[0].device.type))


class RMSNormFn(torch.autograd.Function):
    """y = x / rms(x) * w in float32.

    With x̂ = x·r, r = 1/sqrt(mean(x²) + eps) and g = dy·w:
        dx = r · (g − x̂ · mean(g · x̂)),    dw = Σ_rows dy · x̂.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [..., 1]
        x_hat = x * r
        ctx.save_for_backward(x_hat, r, weight)
        return x_hat * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x_hat, r, weight = ctx.saved_tensors
        dw = (dy * x_hat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        g = dy * weight
        dx = torch.addcmul(g, x_hat, (g * x_hat).mean(-1, keepdim=True), value=-1).mul_(r)
        return dx, dw, None


class SwiGLUFn(torch.autograd.Function):
    """The MLP without biases: y = (silu(x Wgᵀ) ⊙ x Wuᵀ) Wdᵀ.

    With g = x Wgᵀ, u = x Wuᵀ, s = silu(g), h = s ⊙ u:
        dh = dy Wd,   du = dh ⊙ s,   dg = silu'(g) ⊙ (dh ⊙ u),
        dWd = dyᵀ h,  dWg = dgᵀ x,   dWu = duᵀ x,   dx = dg Wg + du Wu.
    Only g and u are kept: s and h are recomputed in the backward, two elementwise passes that
    spare two [positions × intermediate] tensors per layer for the whole of the backward. The
    backward writes du, ds and dg over s, dh and g, and adds du Wu into dg Wg in one addmm.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        g = torch.mm(x2, w_gate.t())
        u = torch.mm(x2, w_up.t())
        ctx.save_for_backward(x2, w_gate, w_up, w_down, g, u)
        ctx.x_shape = x.shape
        h = F.silu(g).mul_(u)
        return torch.mm(h, w_down.t()).view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x2, w_gate, w_up, w_down, g, u = ctx.saved_tensors
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad
        s = F.silu(g)
        h = s * u
        dy = dy.reshape(-1, dy.shape[-1])
        dw_down = torch.mm(dy.t(), h) if need_down else None
        dh = torch.mm(dy, w_down)
        du = s.mul_(dh)
        dg = torch.ops.aten.silu_backward.grad_input(dh.mul_(u), g, grad_input=g)
        dx = torch.addmm(torch.mm(dg, w_gate), du, w_up).view(ctx.x_shape) if need_x else None
        return (dx, torch.mm(dg.t(), x2) if need_gate else None, torch.mm(du.t(), x2) if need_up else None,
                dw_down)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + roll(x, D/2)·sin: rotates the pairs (x_i, x_{i+D/2}), `sin` carrying the sign of
    the first half. The rolled copy is the output buffer: three kernels and one allocation, and
    the result is contiguous whatever the layout of x, so heads can be stacked without a copy."""
    if x.dtype != torch.float32 or cos.dtype != torch.float32:
        # bf16 would round the rolled product before the sum; keep the rounding checked on GPUs.
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
    return x.roll(x.shape[-1] // 2, dims=-1).mul_(sin).addcmul_(x, cos)


class RopeFn(torch.autograd.Function):
    """`rotate_pairs`, a rotation: its backward rotates back, dx = dy·cos + roll(dy·sin, D/2)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate_pairs(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return (dy * sin).roll(dy.shape[-1] // 2, dims=-1).addcmul_(dy, cos), None, None


class QKVRopeFn(torch.autograd.Function):
    """The attention's inputs from its layer input: q, k and v projected by one matmul over
    [Wq; Wk; Wv], laid out as [B, heads, T, D] (each contiguous in fp32), q and k rotated by RoPE.

    x [..., hidden] holds the rows of a [B, T] grid, or with `slot` ([N]) N positions that
    `slot` places in it (zeros elsewhere: packed documents, one per grid row). The backward is
    the chain in reverse: rotate back (RopeFn) into one [B, T, heads, D] buffer, gather the
    placed rows, then dx = dqkv [Wq; Wk; Wv] and d[Wq; Wk; Wv] = dqkvᵀ x, one matmul each.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                bq: torch.Tensor | None, bk: torch.Tensor | None, bv: torch.Tensor | None,
                cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor | None, grid: tuple[int, int],
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2 = x.reshape(-1, x.shape[-1])
        w = torch.cat([wq, wk, wv])
        qkv = torch.mm(x2, w.t()) if bq is None else torch.addmm(torch.cat([bq, bk, bv]), x2, w.t())
        B, T = grid
        if slot is not None:
            qkv = qkv.new_zeros(B * T, w.shape[0]).index_copy_(0, slot, qkv)
        heads = qkv.view(B, T, -1, head_dim).transpose(1, 2)  # [B, H + 2 KV, T, D]
        H, KV = wq.shape[0] // head_dim, wk.shape[0] // head_dim
        q = rotate_pairs(heads[:, :H], cos, sin)
        k = rotate_pairs(heads[:, H:H + KV], cos, sin)
        v = heads[:, H + KV:].contiguous()
        ctx.save_for_backward(x2, w, cos, sin, slot)
        ctx.x_shape, ctx.sizes, ctx.has_bias = x.shape, (wq.shape[0], wk.shape[0], wv.shape[0]), bq is not None
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        x2, w, cos, sin, slot = ctx.saved_tensors
        B, H, T, D = dq.shape
        KV = dk.shape[1]
        dheads = dq.new_empty(B, T, H + 2 * KV, D)
        for d, part in ((dq, dheads[:, :, :H]), (dk, dheads[:, :, H:H + KV])):
            # The inverse rotation (RopeFn's backward), written straight into its place.
            torch.addcmul((d * sin).roll(D // 2, dims=-1), d, cos, out=part.transpose(1, 2))
        dheads[:, :, H + KV:] = dv.transpose(1, 2)
        dqkv = dheads.view(B * T, -1)
        if slot is not None:
            dqkv = dqkv.index_select(0, slot)
        need_x, need_q, need_k, need_v, need_bq, need_bk, need_bv = ctx.needs_input_grad[:7]
        dx = torch.mm(dqkv, w).view(ctx.x_shape) if need_x else None
        dw = torch.mm(dqkv.t(), x2).split(ctx.sizes) if need_q or need_k or need_v else (None,) * 3
        db = dqkv.sum(0).split(ctx.sizes) if ctx.has_bias and (need_bq or need_bk or need_bv) else (None,) * 3
        return (dx, *dw, *db, None, None, None, None, None)


def scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(output [B, T, H·D], stacked q, k, v and probs for the backward). See attention_by_matmul."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    if mask is None:
        mask = torch.full((T, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(S - T + 1)[None, None]
    qs = q.reshape(B * KV, G * T, D)
    ks = k.reshape(B * KV, S, D)
    vs = v.reshape(B * KV, S, D)
    # beta=0: the empty input is never read; alpha scales inside the matmul, a pass fewer.
    scores = torch.baddbmm(qs.new_empty(()), qs, ks.transpose(1, 2), beta=0, alpha=D**-0.5)
    probs = torch.softmax(scores.view(B, KV, G, T, S).add_(mask[:, :, None]), dim=-1).view(B * KV, G * T, S)
    y = torch.bmm(probs, vs).view(B, KV, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)
    return y, (qs, ks, vs, probs)


class ScoresAttentionFn(torch.autograd.Function):
    """softmax(q kᵀ/√D + mask) v with its scores materialised, as attention_by_matmul.

    With P the probabilities and dP = dy vᵀ:  dv = Pᵀ dy,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),
    dq = dS k / √D,  dk = dSᵀ q / √D. The G query heads of a KV head are stacked, so dk and dv
    come out summed over them.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y, saved = scores_attention(q, k, v, mask)
        ctx.save_for_backward(*saved)
        ctx.shapes = q.shape, k.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        qs, ks, vs, probs = ctx.saved_tensors
        (B, H, T, D), k_shape = ctx.shapes
        KV = k_shape[1]
        dy = dy.view(B, T, KV, H // KV, D).permute(0, 2, 3, 1, 4).reshape(qs.shape)
        dprobs = torch.bmm(dy, vs.transpose(1, 2))
        dv = torch.bmm(probs.transpose(1, 2), dy)
        dscores = torch._softmax_backward_data(dprobs, probs, -1, probs.dtype)
        unused = qs.new_empty(())
        dq = torch.baddbmm(unused, dscores, ks, beta=0, alpha=D**-0.5)
        dk = torch.baddbmm(unused, dscores.transpose(1, 2), qs, beta=0, alpha=D**-0.5)
        return dq.view(B, H, T, D), dk.view(k_shape), dv.view(k_shape), None
