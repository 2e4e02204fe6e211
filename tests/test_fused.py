"""The hand-written backward passes against autograd of the composites they replace."""

import pytest
import torch
import torch.nn.functional as F

from hf_reference import CONFIGS, padded_batch, random_nano_model
from nanopost.fast.fused import QKVRopeFn, RMSNormFn, RopeFn, ScoresAttentionFn, SwiGLUFn, rotate_pairs, scores_attention
from nanopost.fast.transformer import rms_norm
from nanopost.model import RMSNorm


def test_rms_norm_backward_is_the_derivative_of_its_forward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-6), (x, w))


def test_rms_norm_without_gradients_gives_the_same_values_and_keeps_them_when_needed():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
    x = torch.randn(4, 7, 16, generator=g)
    with torch.no_grad():
        fast = rms_norm(norm, x)
    assert torch.equal(fast, RMSNormFn.apply(x, norm.weight, 1e-6))
    torch.testing.assert_close(fast, norm(x), rtol=1e-6, atol=1e-6)  # the reference module
    assert rms_norm(norm, x).grad_fn is not None  # the weight trains
    norm.weight.requires_grad_(False)
    assert rms_norm(norm, x).grad_fn is None
    assert rms_norm(norm, x.requires_grad_()).grad_fn is not None  # a frozen norm still passes gradients on


def _swiglu(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def test_swiglu_backward_equals_autograd_of_the_mlp():
    # Its backward overwrites what it saved, so it runs once per graph: gradcheck's repeated
    # backward passes cannot be used, and float64 autograd is the reference instead.
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
            for shape in [(2, 5, 6), (7, 6), (7, 6), (6, 7)]]
    dy = torch.randn(2, 5, 6, dtype=torch.float64, generator=g)
    ours = SwiGLUFn.apply(*args)
    ours_grads = torch.autograd.grad(ours, args, dy)
    ref = _swiglu(*args)
    ref_grads = torch.autograd.grad(ref, args, dy)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_swiglu_with_frozen_weights_gives_the_inputs_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    weights = [torch.randn(*shape, generator=g) for shape in [(7, 6), (7, 6), (6, 7)]]
    (dx,) = torch.autograd.grad(SwiGLUFn.apply(x, *weights).sum(), [x])
    (ref,) = torch.autograd.grad(_swiglu(x, *weights).sum(), [x])
    assert torch.allclose(dx, ref, rtol=1e-5, atol=1e-6)


def test_swiglu_refuses_a_second_backward_instead_of_using_what_it_overwrote():
    args = [torch.randn(*shape, requires_grad=True) for shape in [(3, 4), (5, 4), (5, 4), (4, 5)]]
    y = SwiGLUFn.apply(*args).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("heads,kv,T,S,masked", [(4, 2, 5, 5, False), (2, 2, 3, 6, False), (6, 2, 4, 7, True)])
def test_scores_attention_backward_is_the_derivative_of_its_forward(heads, kv, T, S, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, T, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv, S, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    mask = None
    if masked:
        visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].repeat(2, 1, 1, 1)
        visible[1, :, :, :2] = False
        mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill_(~visible, float("-inf"))
    assert torch.autograd.gradcheck(lambda q, k, v: ScoresAttentionFn.apply(q, k, v, mask), (q, k, v))
    with torch.no_grad():
        assert torch.equal(ScoresAttentionFn.apply(q, k, v, mask), scores_attention(q, k, v, mask)[0])


def _loss_and_grads(model, ids, mask):
    out = model(ids, attention_mask=mask)
    loss = (out * mask[..., None]).square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_gradients_through_the_fused_pieces_equal_the_reference(name, monkeypatch):
    model = random_nano_model(name).train()
    ids, mask = padded_batch(model.config.vocab_size)
    calls = []
    for fn in (ScoresAttentionFn, SwiGLUFn, RopeFn, QKVRopeFn):
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: calls.append(1) or _apply(*a))
    fused = _loss_and_grads(model, ids, mask)
    # q/k norms sit between the projections and RoPE, so those models rotate q and k apart.
    per_layer = 4 if model.config.qk_norm else 3
    assert len(calls) == per_layer * model.config.num_hidden_layers
    model.impl = "reference"
    composite = _loss_and_grads(model, ids, mask)
    assert len(calls) == per_layer * model.config.num_hidden_layers
    real = mask.bool()
    torch.testing.assert_close(fused[0][real], composite[0][real], rtol=0, atol=1e-5)
    for n, ref in composite[1].items():
        assert (fused[1][n] - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-8, n


def test_autocast_takes_the_composites():  # their per-op casts would not reach a written-out backward
    model = random_nano_model("qwen2-bias-tied").train()
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask)
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    names = {type(fn).__name__ for fn in seen}
    assert not names & {"ScoresAttentionFnBackward", "SwiGLUFnBackward", "RopeFnBackward", "QKVRopeFnBackward"}, names
    assert "BmmBackward0" in names and "SiluBackward0" in names


def test_rope_backward_is_the_derivative_of_its_forward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()  # as q is
    angles = torch.rand(2, 1, 5, 3, dtype=torch.float64, generator=g) * 6
    cos = torch.cat([angles.cos()] * 2, -1)
    sin = torch.cat([-angles.sin(), angles.sin()], -1)
    assert torch.autograd.gradcheck(lambda x: RopeFn.apply(x, cos, sin), (x,))
    x, cos, sin, angles = x.detach().float(), cos.float(), sin.float(), angles.float()
    y = rotate_pairs(x, cos, sin)
    assert y.is_contiguous()  # heads stack into attention's blocks without a copy
    x1, x2 = x.chunk(2, -1)
    c, s = angles.cos(), angles.sin()
    assert torch.allclose(y, torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), rtol=0, atol=1e-6)


def _qkv_rope_composite(x, wq, wk, wv, bq, bk, bv, cos, sin, slot, grid, d):
    """Three linears, the placement into the grid and RoPE, each through autograd."""
    B, T = grid
    out = []
    for w, b in ((wq, bq), (wk, bk), (wv, bv)):
        y = F.linear(x, w, b).reshape(-1, w.shape[0] // d, d)
        if slot is not None:
            y = y.new_zeros(B * T, *y.shape[1:]).index_copy(0, slot, y)
        out.append(y.view(B, T, -1, d).transpose(1, 2))
    q, k, v = out
    return q * cos + q.roll(d // 2, -1) * sin, k * cos + k.roll(d // 2, -1) * sin, v


@pytest.mark.parametrize("bias,placed", [(True, False), (False, True), (True, True)])
def test_qkv_rope_backward_is_the_derivative_of_the_projections_and_rotation(bias, placed):
    g = torch.Generator().manual_seed(0)
    heads, kv, d, hidden, grid = 4, 2, 6, 8, (2, 5)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)

    slot = torch.tensor([0, 1, 2, 5, 6, 7, 8]) if placed else None  # 3 + 4 positions in 2 rows of 5
    x = rand(1, 7, hidden) if placed else rand(*grid, hidden)
    weights = [rand(n * d, hidden) for n in (heads, kv, kv)]
    biases = [rand(n * d) if bias else None for n in (heads, kv, kv)]
    angles = torch.rand(grid[0], 1, grid[1], d // 2, dtype=torch.float64, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)
    trained = [x, *weights, *(b for b in biases if b is not None)]

    def fused(*tensors):
        x, *weights = tensors[:4]
        biases = list(tensors[4:]) or [None] * 3
        return QKVRopeFn.apply(x, *weights, *biases, cos, sin, slot, grid, d)

    assert torch.autograd.gradcheck(fused, trained)
    ours = fused(*trained)
    ref = _qkv_rope_composite(x, *weights, *biases, cos, sin, slot, grid, d)
    for a, b, n in zip(ours, ref, (heads, kv, kv)):
        assert a.shape == (grid[0], n, grid[1], d)
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    cos, sin = cos.float(), sin.float()
    # fp32, as trained on CPU: heads stack into attention's blocks without a copy.
    assert all(t.is_contiguous() for t in fused(*(t.detach().float() for t in trained)))
    if placed:  # grid slots past a document's end stay zero, so no real query sees them
        assert torch.equal(ours[1][1, :, 4], torch.zeros(kv, d))
