"""Log-probabilities of given tokens straight from hidden states, never holding the logits whole.

The reference is three lines:

    logits = hidden @ weight.T                            # [n, V]
    logp = log_softmax(logits / T).gather(-1, tokens)     # [n]
    entropy = -(softmax * log_softmax).sum(-1)            # [n], monitored only

With a real vocabulary (151,936 entries for Qwen, 128,256 for Llama 3) the logits and their
gradient are the largest tensors of a training step: [positions × V] in fp32 each, more than the
rest of a small model's activations together, and growing with every completion token.
`head_logprobs` computes the same values and gradients with only a block of logits alive at a
time:

    forward   rows a block at a time: logits → logsumexp, the token's logit, the entropy; only the
              hidden states, the weight and one logsumexp per row are kept.
    backward  the logits are recomputed tile by tile ([rows × vocab] blocks of about
              _BACKWARD_TILE_ELEMENTS), from the kept logsumexp. With x = logits / T and g the incoming
              gradient of logp,

                  d logp / d x_v = 1[v = token] − softmax(x)_v
                  G = g · (onehot − exp(x − lse)) / T                 # [rows, vocab block]
                  d hidden += G @ W_block          d W_block += Gᵀ @ hidden_rows

              Tiles span many rows, so each block of the weight's gradient is written from a long
              inner dimension instead of being accumulated row block by row block.

It costs one more matmul of the head (the recomputation) in exchange for memory that no longer
grows with the number of positions beyond [n × hidden]. When every row fits in one forward tile
(a small vocabulary, or few positions), that tile's softmax is kept instead and nothing is
recomputed: the memory is the tile's, the work the plain head's. Under bf16 autocast the matmuls run in
bf16, as the plain head would, and the softmax, the logsumexp and the gradient sums in fp32.
Tied embeddings need nothing special: the gradient for `weight` reaches the shared parameter.
The sampler keeps computing one position's logits per row (`generate`); this is for losses and
scoring, where every position's log-probability is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one block of logits in the forward, in fp32: 64 MiB.
_TILE_ELEMENTS = 1 << 24
# A backward tile: rows enough that each weight-gradient block sees a long inner dimension, and
# half the forward's elements, which its three matmuls per tile run faster with on a CPU.
_TILE_ROWS = 4096
_BACKWARD_TILE_ELEMENTS = 1 << 23


def head_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float = 1.0,
                  with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax(hidden @ weight.T / temperature) at `tokens`, and the entropy if asked.

    hidden [..., d], weight [V, d], tokens [...] (ids < V). Returns (logp [...], entropy [...] or
    None) in float32 (float64 for float64 inputs); logp is differentiable with respect to hidden
    and weight, the entropy is monitored and carries no gradient. The plain composite, holding
    the logits whole, is `token_logprobs(linear(hidden, weight), ...)` in nanopost/model.py.
    """
    if temperature <= 0:
        raise ValueError(f"head_logprobs: temperature must be > 0, got {temperature}")
    if tokens.shape != hidden.shape[:-1] or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head_logprobs: need hidden [..., d], weight [V, d] and tokens [...], got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(tokens.shape)}")
    shape = tokens.shape
    h, t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long()
    mm_dtype = _matmul_dtype(hidden, weight)
    logp, entropy = _ChunkedHeadLogprobs.apply(h, weight, t, float(temperature), with_entropy, mm_dtype)
    return logp.view(shape), (entropy.view(shape) if with_entropy else None)


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """What `linear(hidden, weight)` would compute in: autocast's dtype when it is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _out_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """head_logprobs' fast path: see the module docstring for the forward and the backward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, tokens: Tensor, temperature: float, with_entropy: bool,
                mm_dtype: torch.dtype):
        n, vocab = h.shape[0], weight.shape[0]
        out = _out_dtype(h, weight)
        w = weight.to(mm_dtype)
        logp = torch.empty(n, dtype=out, device=h.device)
        lse = torch.empty(n, dtype=out, device=h.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=out, device=h.device)
        step = max(1, min(n, _TILE_ELEMENTS // max(vocab, 1)))
        tiles = _Tiles(step * vocab, mm_dtype, out, h.device, extra=out if with_entropy else None)  # exp for H
        with torch.autocast(h.device.type, enabled=False):
            for r0 in range(0, n, step):
                r1 = min(r0 + step, n)
                x = tiles.logits(h[r0:r1].to(mm_dtype), w, temperature)  # [rows, V]
                token_logit = x.gather(-1, tokens[r0:r1, None])[:, 0]
                m = x.amax(-1, keepdim=True)
                y = x.sub_(m)  # x − max: exp cannot overflow
                if with_entropy:  # H = log s − Σ e·y / s, with e = exp(y), s = Σ e
                    e = torch.exp(y, out=tiles.view(tiles.extra, y.shape))
                    s = e.sum(-1)
                    ey = torch.bmm(e[:, None, :], y[:, :, None])[:, 0, 0]
                    entropy[r0:r1] = s.log() - ey / s
                else:
                    s = y.exp_().sum(-1)
                lse[r0:r1] = m[:, 0] + s.log()
                logp[r0:r1] = token_logit - lse[r0:r1]
        # When one tile held every row, its softmax is kept for the backward instead of being
        # recomputed: its size is bounded by the tile, and a small vocabulary then costs no more
        # matmuls than the plain head.
        probs = h.new_empty(0, dtype=out)
        if n <= step and (h.requires_grad or weight.requires_grad):
            probs = (e if with_entropy else y).div_(s[:, None])
        ctx.save_for_backward(h, weight, tokens, lse, probs)
        ctx.temperature, ctx.mm_dtype = temperature, mm_dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        h, weight, tokens, lse, probs = ctx.saved_tensors
        temperature, mm_dtype = ctx.temperature, ctx.mm_dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = h.shape[0], weight.shape[0]
        acc = lse.dtype  # gradient sums in fp32 (fp64 for fp64 inputs)
        w = weight.to(mm_dtype)
        g = (grad_logp.to(acc) / temperature)[:, None]  # [n, 1]
        if probs.numel():  # the forward's single tile: G = g · (onehot − softmax)
            G = probs.mul(-g).scatter_add_(1, tokens[:, None], g).to(mm_dtype)
            with torch.autocast(h.device.type, enabled=False):
                grad_h = (G @ w).to(h.dtype) if want_h else None
                grad_w = (G.T @ h.to(mm_dtype)).to(weight.dtype) if want_w else None
            return grad_h, grad_w, None, None, None, None
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if want_w else None
        rows = max(1, min(n, _TILE_ROWS))
        cols = max(1, min(vocab, _BACKWARD_TILE_ELEMENTS // rows))
        tiles = _Tiles(rows * cols, mm_dtype, acc, h.device, extra=mm_dtype if mm_dtype != acc else None)
        with torch.autocast(h.device.type, enabled=False):
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                h_rows = h[r0:r1].to(mm_dtype)
                for v0 in range(0, vocab, cols):
                    v1 = min(v0 + cols, vocab)
                    x = tiles.logits(h_rows, w[v0:v1], temperature)  # [rows, block]
                    G = x.sub_(lse[r0:r1, None]).exp_().mul_(-g[r0:r1])  # −g·softmax
                    # + g at the token, for the rows whose token falls in this block (no host sync)
                    local = tokens[r0:r1] - v0
                    inside = (local >= 0) & (local < v1 - v0)
                    G.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], g[r0:r1] * inside[:, None])
                    if mm_dtype != acc:
                        G = tiles.view(tiles.extra, G.shape).copy_(G)
                    if want_h:
                        _add_matmul(grad_h[r0:r1], G, w[v0:v1])
                    if want_w:
                        _add_matmul(grad_w[v0:v1], G.T, h_rows)
        return (None if grad_h is None else grad_h.to(h.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None)


class _Tiles:
    """Buffers reused by every block: a fresh allocation of this size per block would be
    returned to the operating system and faulted in again each time."""

    def __init__(self, elements: int, mm_dtype: torch.dtype, acc: torch.dtype, device,
                 extra: torch.dtype | None = None):
        self.acc = torch.empty(elements, dtype=acc, device=device)
        self.mm = torch.empty(elements, dtype=mm_dtype, device=device) if mm_dtype != acc else None
        self.extra = torch.empty(elements, dtype=extra, device=device) if extra is not None else None

    @staticmethod
    def view(buffer: Tensor, shape) -> Tensor:
        return buffer[: shape[0] * shape[1]].view(shape)

    def logits(self, h_rows: Tensor, w_block: Tensor, temperature: float) -> Tensor:
        """(h_rows @ w_block.T) / temperature in the accumulation dtype, in the reused buffer."""
        shape = (h_rows.shape[0], w_block.shape[0])
        x = self.view(self.acc, shape)
        if self.mm is None:
            torch.mm(h_rows, w_block.T, out=x)
        else:
            x.copy_(torch.mm(h_rows, w_block.T, out=self.view(self.mm, shape)))
        return x if temperature == 1.0 else x.div_(temperature)


def _add_matmul(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, in place when the matmul already produces out's dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += (a @ b).to(out.dtype)
