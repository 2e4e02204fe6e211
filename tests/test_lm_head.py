"""The chunked LM head: the same log-probabilities and gradients as the plain head, without the logits."""

import random

import pytest
import torch

from hf_reference import CONFIGS, random_nano_model
from nanopost.fast import lm_head
from nanopost.data import Example, pack_examples
from nanopost.grpo import policy_loss
from nanopost.fast.lm_head import head_logprobs
from nanopost.grpo_loop import sequence_logprobs
from nanopost.model import Logprobs, token_logprobs
from nanopost.sft_loop import accumulate_gradients

CPU = torch.device("cpu")


def use_small_tiles(monkeypatch):
    """Tiles of a few elements, so a call crosses many row and vocabulary blocks."""
    monkeypatch.setattr(lm_head, "_TILE_ELEMENTS", 40)
    monkeypatch.setattr(lm_head, "_TILE_ROWS", 3)
    monkeypatch.setattr(lm_head, "_BACKWARD_TILE_ELEMENTS", 20)


@pytest.fixture(params=["many tiles", "one tile"])
def small_tiles(request, monkeypatch):
    """Both backward paths: logits recomputed tile by tile, and the single tile's softmax kept."""
    if request.param == "many tiles":
        use_small_tiles(monkeypatch)


def plain(h, w, tokens, temperature):
    """The composite spelled out: logits, log-softmax, gather."""
    log_probs = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    return log_probs.gather(-1, tokens[..., None])[..., 0], -(log_probs.exp() * log_probs).sum(-1)


def head(h, w, tokens, temperature=1.0, with_entropy=False, chunked=True):
    """The chunked head, or (chunked=False) the model's plain head: the logits whole, then
    token_logprobs, as the reference forward computes them."""
    if chunked:
        return head_logprobs(h, w, tokens, temperature, with_entropy=with_entropy)
    out = token_logprobs(torch.nn.functional.linear(h, w), tokens, temperature, with_entropy)
    return out if with_entropy else (out, None)


def inputs(n, vocab, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, dim, generator=g, dtype=dtype).requires_grad_()
    tokens = torch.randint(0, vocab, (n,), generator=g)
    tokens[0], tokens[-1] = 0, vocab - 1  # the first and last rows of the weight
    return h, w, tokens, torch.randn(n, generator=g, dtype=dtype)


@pytest.mark.parametrize("vocab", [2, 13, 41, 160])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_values_entropy_and_gradients_equal_the_plain_composite(small_tiles, vocab, temperature):
    h, w, tokens, upstream = inputs(11, vocab)
    logp, entropy = head_logprobs(h, w, tokens, temperature, with_entropy=True)
    (logp * upstream).sum().backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want, want_entropy = plain(h, w, tokens, temperature)
    (want * upstream).sum().backward()
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0], h.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], w.grad, rtol=0, atol=1e-12)
    assert not entropy.requires_grad


def test_gradcheck_over_row_and_vocabulary_blocks(small_tiles):
    h, w, tokens, _ = inputs(7, 9, dim=4)
    assert torch.autograd.gradcheck(lambda a, b: head_logprobs(a, b, tokens, 0.8)[0], (h.detach().requires_grad_(),
                                                                                      w.detach().requires_grad_()))


def test_any_leading_shape_and_gradient_for_one_input_only(small_tiles):
    h, w, tokens, _ = inputs(12, 17)
    logp, none = head_logprobs(h.detach().view(3, 4, 8), w, tokens.view(3, 4))
    assert none is None and logp.shape == (3, 4)
    logp.sum().backward()  # the weight alone wants a gradient
    want = plain(h.detach(), w.detach().requires_grad_(), tokens, 1.0)[0]
    torch.testing.assert_close(logp.view(-1), want, rtol=0, atol=1e-12)
    assert w.grad is not None and h.grad is None


def test_the_plain_head_is_the_plain_composite():
    h, w, tokens, _ = inputs(5, 7)
    got, entropy = head(h, w, tokens, 0.9, with_entropy=True, chunked=False)
    want, want_entropy = plain(h, w, tokens, 0.9)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy.detach(), rtol=0, atol=1e-12)


def test_bf16_autocast_matches_the_plain_head_and_returns_float32(small_tiles):
    h, w, tokens, upstream = inputs(10, 37, dim=16, dtype=torch.float32)

    def run(chunked, autocast=True):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp, entropy = head(h, w, tokens, 0.7, with_entropy=True, chunked=chunked)
        (logp * upstream).sum().backward()
        return logp, entropy, h.grad.clone(), w.grad.clone()

    got, ref, exact = run(True), run(False), run(False, autocast=False)
    assert all(t.dtype == torch.float32 for t in got)
    # Both multiply in bf16 and take the softmax of the same float32 logits.
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-5)
    # The gradients' bf16 matmuls are summed in other orders: as close to fp32 as the plain head's.
    for i in (2, 3):
        assert (got[i] - exact[i]).norm() <= 2 * (ref[i] - exact[i]).norm() + 1e-6


def test_logits_are_never_saved_for_the_backward(monkeypatch):
    n, vocab = 64, 500
    h, w, tokens, _ = inputs(n, vocab, dtype=torch.float32)
    saved = {}
    for chunked in (True, False):
        use_small_tiles(monkeypatch)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            head(h, w, tokens, 0.7, chunked=chunked)[0].sum().backward()
        saved[chunked] = max(sizes)
    assert saved[False] >= n * vocab  # the reference keeps its logits
    assert saved[True] == w.numel()  # the chunked head keeps the weight, hidden states and one float per row


def test_one_tile_keeps_its_softmax_and_no_more(monkeypatch):
    h, w, tokens, _ = inputs(12, 50, dtype=torch.float32)  # the softmax (600) is larger than the weight (400)
    for tile, kept in ((600, 12 * 50), (599, w.numel())):  # every row in one tile, or two tiles
        monkeypatch.setattr(lm_head, "_TILE_ELEMENTS", tile)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            head_logprobs(h, w, tokens)[0].sum().backward()
        assert max(sizes) == kept
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        sizes.clear()
        head_logprobs(h.detach(), w.detach(), tokens)  # nothing wants a gradient: nothing kept
    assert max(sizes, default=0) <= w.numel()


def test_rejects_bad_arguments():
    h, w, tokens, _ = inputs(4, 6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        head_logprobs(h, w, tokens, 0.0)
    with pytest.raises(ValueError, match=r"need hidden \[..., d\]"):
        head_logprobs(h, w, tokens[:3])


# ------------------------------------------------------------------- through the model's switch


def grads(model, run, chunked: bool):
    model.zero_grad(set_to_none=True)
    model.impl = "fast" if chunked else "reference"
    out = run()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close_runs(model, run, precision):
    """The fast path (the chunked head) against the reference through the model's switch. In fp32 the two
    agree to rounding; under bf16 autocast the two round differently all the way through (the
    fast path runs each prompt once, the reference each row whole, and the head's bf16 matmuls
    sum in other orders), so each run is measured against the fp32 reference instead: the fast
    path must come as close to it as the reference does."""
    chunked = grads(model, lambda: run(precision), True)
    reference = grads(model, lambda: run(precision), False)
    if precision == "fp32":
        torch.testing.assert_close(chunked[0], reference[0], rtol=0, atol=1e-5)
        for name in chunked[1]:
            torch.testing.assert_close(chunked[1][name], reference[1][name], rtol=1e-4, atol=1e-5, msg=name)
        return
    exact = grads(model, lambda: run("fp32"), False)
    error, reference_error = ((r[0] - exact[0]).norm() for r in (chunked, reference))
    # bf16 keeps 8 bits: a thousandth of the values' size is a few of its roundings, far below
    # what a wrong computation gives.
    assert error <= 2 * reference_error + 1e-3 * exact[0].norm(), ("values", error, reference_error)
    for name in chunked[1]:
        error, reference_error = ((r[1][name] - exact[1][name]).norm() for r in (chunked, reference))
        assert error <= 2 * reference_error + 1e-6, (name, error, reference_error)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))  # tied and untied embeddings
def test_sft_loss_and_gradients_equal_the_reference_head(small_tiles, name, precision):
    model = random_nano_model(name).train()
    rng = random.Random(0)
    vocab = model.config.vocab_size
    batches = pack_examples([Example([rng.randrange(vocab) for _ in range(n)], [0] * 3 + [1] * (n - 3))
                             for n in (9, 14, 5, 20, 11)], 32, 2)

    def run(precision):
        return torch.tensor(accumulate_gradients(model, batches, CPU, precision)[0])

    assert_close_runs(model, run, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grpo_logprobs_entropy_and_gradients_equal_the_reference_head(small_tiles, name, precision):
    model = random_nano_model(name).train()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    distinct = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9)]
    prompts = [distinct[i // 3] for i in range(6)]
    tokens = torch.randint(0, vocab, (6, 7), generator=g)
    mask = torch.ones(6, 7)
    mask[1, 4:] = 0
    old = -torch.rand(6, 7, generator=g)
    advantages = torch.randn(6, generator=g)

    def run(precision):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logp, entropy = sequence_logprobs(model, prompts, tokens, temperature=0.7, want_entropy=True)
        loss, _ = policy_loss(logp.float(), old, advantages, mask, ref_logp=old + 0.1, beta=0.04)
        loss.backward()
        return torch.stack([logp.detach().float(), entropy.float()])

    assert_close_runs(model, run, precision)


def test_logprobs_follow_the_chosen_positions():
    model = random_nano_model("qwen2-bias-tied")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    targets = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    keep = torch.rand(2, 9, generator=g) > 0.4
    with torch.no_grad():
        logits = model(ids).float()
        want = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close(model(Logprobs(ids, targets)), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(Logprobs(ids, targets[keep], where=keep)), want[keep], rtol=0, atol=1e-5)


def largest_saved(run) -> int:
    """The largest tensor autograd keeps for the backward while `run` records a graph."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        run()
    return max(sizes)


@pytest.mark.parametrize("chunked", [True, False])
def test_training_forwards_keep_no_positions_by_vocabulary_tensor(chunked, monkeypatch):
    use_small_tiles(monkeypatch)  # tiles smaller than the positions × vocabulary of the batch
    from nanopost.model import ModelConfig, Transformer
    from nanopost.sft_loop import loss_sum

    vocab = 3000
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    model.impl = "fast" if chunked else "reference"
    rng = random.Random(0)
    batch = pack_examples([Example([rng.randrange(vocab) for _ in range(40)], [0] * 4 + [1] * 36)
                           for _ in range(4)], 40, 4)[0]
    tokens = torch.randint(0, vocab, (8, 24))
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4
    positions = {"sft": int(batch.loss_mask.sum()), "grpo": tokens.numel()}
    runs = {"sft": lambda: loss_sum(model, batch),
            "grpo": lambda: sequence_logprobs(model, prompts, tokens, 0.8, want_entropy=True)[0].sum()}
    for name, run in runs.items():
        kept = largest_saved(run)
        if chunked:  # the head's weight is the largest: nothing grows with positions × vocabulary
            assert kept == model.lm_head.weight.numel(), name
        else:
            assert kept >= positions[name] * vocab, name


@pytest.mark.parametrize("name", ["qwen2-bias-tied", "llama-gqa-untied"])
def test_grpo_head_only_at_masked_positions_gives_the_same_loss_and_gradients(name):
    model = random_nano_model(name).train()
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompts = [[5, 6, 7]] * 3 + [[8, 9]] * 3
    tokens = torch.randint(0, vocab, (6, 8), generator=g)
    mask = torch.ones(6, 8)
    mask[0, 3:] = mask[4, 6:] = 0  # completions that stopped early
    old = -torch.rand(6, 8, generator=g)
    advantages = torch.randn(6, generator=g)
    heads = []
    for keep in (None, mask):
        model.zero_grad(set_to_none=True)
        logp, entropy = sequence_logprobs(model, prompts, tokens, 0.9, want_entropy=True, mask=keep)
        policy_loss(logp, old, advantages, mask, ref_logp=old + 0.1, beta=0.04)[0].backward()
        heads.append((logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_entropy, full_grads), (masked, masked_entropy, masked_grads) = heads
    on = mask.bool()
    torch.testing.assert_close(masked[on], full[on], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked_entropy[on], full_entropy[on], rtol=0, atol=1e-6)
    assert masked[~on].eq(0).all() and masked_entropy[~on].eq(0).all()
    for n in full_grads:
        torch.testing.assert_close(masked_grads[n], full_grads[n], rtol=1e-4, atol=1e-6, msg=n)
