"""Our Transformer against transformers' Llama / Qwen2 / Qwen3 on small random models."""

import pytest
import torch

from hf_reference import CONFIGS, hf_model, nano_config, padded_batch
from nanopost.plumbing.hf_io import config_from_hf, load_model
import nanopost.fast.transformer as fast_module
from nanopost.fast.transformer import attention_by_matmul
from nanopost.model import (IMPLS, KVCache, Logprobs, ModelConfig, PrefixLogprobs, SharedPrefix, Transformer,
                            rope_inv_freq)

TOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path)


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_match_transformers_with_padding(pair, impl):
    hf, ours = pair
    ours.impl = impl
    ids, mask = padded_batch(ours.config.vocab_size)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (ref - out)[real].abs().max().item() < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_transformers_with_padding(pair, impl):
    hf, ours = pair
    ours.impl = impl
    ids, mask = padded_batch(ours.config.vocab_size, seed=2)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    probe = torch.randn(*ids.shape, ours.config.vocab_size, generator=torch.Generator().manual_seed(0))
    probe = probe * mask[..., None]  # padding positions carry no gradient
    (hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits * probe).sum().backward()
    (ours(ids, attention_mask=mask) * probe).sum().backward()
    theirs = dict(hf.named_parameters())
    try:
        for name, p in ours.named_parameters():
            ref = theirs[name].grad
            assert (p.grad - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6, name
    finally:
        hf.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_does_not_change_real_tokens(pair, impl):
    _, ours = pair
    ours.impl = impl
    ids, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask)
        alone = ours(ids[2:3, 11:])  # row 2 without its padding
    assert (batched[2, 11:] - alone[0]).abs().max().item() < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_cached_decoding_equals_full_recomputation(pair, impl):
    _, ours = pair
    ours.impl = impl
    ids, mask = padded_batch(ours.config.vocab_size, seed=1)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache(ours.config, 3, 20, ours.device, ours.dtype)
        steps = [ours(ids[:, :12], attention_mask=mask[:, :12], cache=cache)]
        positions = mask[:, :12].sum(-1, keepdim=True)
        for t in range(12, 20):
            steps.append(ours(ids[:, t : t + 1], positions=positions, cache=cache))
            positions = positions + 1
    cached = torch.cat(steps, dim=1)
    assert (full - cached)[mask.bool()].abs().max().item() < TOL


@pytest.mark.parametrize("heads,kv,T,S,masked", [(4, 2, 7, 7, False), (4, 4, 5, 9, False), (6, 2, 4, 10, True)])
def test_attention_by_matmul_equals_sdpa(heads, kv, T, S, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, T, 8, generator=g)
    k, v = torch.randn(2, 3, kv, S, 8, generator=g)
    visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].repeat(3, 1, 1, 1)  # causal, queries last
    if masked:
        visible[1, :, :, :3] = False  # as left padding would
    additive = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=heads != kv)
    ours = attention_by_matmul(q, k, v, additive if masked else None)  # None: causal
    assert (ours - expected.transpose(1, 2).reshape(3, T, heads * 8)).abs().max() < 1e-6


def test_short_and_long_attention_paths_agree(monkeypatch):
    model = Transformer(nano_config("qwen3-qknorm-headdim"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    ids, mask = padded_batch(model.config.vocab_size)

    def run():
        out = model(ids, attention_mask=mask)
        (out * mask[..., None]).square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    calls = []
    by_matmul = fast_module.attention_by_matmul
    monkeypatch.setattr(fast_module, "attention_by_matmul", lambda *args: calls.append(1) or by_matmul(*args))
    short = run()
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(fast_module, "SCORES_PER_HEAD", 0)  # every attention through SDPA
    flash = run()
    assert len(calls) == model.config.num_hidden_layers
    real = mask.bool()
    assert (short[0] - flash[0])[real].abs().max() < 1e-5
    for a, b in zip(short[1], flash[1]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-7


def test_packed_segments_do_not_attend_to_each_other():
    model = Transformer(nano_config("qwen3-qknorm-headdim")).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    a, b = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 9))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        out = model(packed, positions=positions, segment_ids=segments)
        sep_a, sep_b = model(a), model(b)
    assert (out[0, :7] - sep_a[0]).abs().max().item() < TOL
    assert (out[0, 7:] - sep_b[0]).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["qwen3-qknorm-headdim", "qwen2-bias-tied"])  # q/k apart, and fused
@pytest.mark.parametrize("scores", [True, False])
@pytest.mark.parametrize("rows,grid", [([[5, 4, 3], [6]], True), ([[1] * 10, [12]], False)])
def test_a_packed_batch_trains_as_its_documents_apart(rows, grid, scores, name, monkeypatch):
    # Documents packed in two rows of 12. Each document's logits and its share of the gradient
    # are those it gets alone. The first layout runs one document per row, padding not computed
    # (logits 0); the second has one long document among short ones, so it keeps the batch's rows.
    if not scores:
        monkeypatch.setattr(fast_module, "SCORES_PER_HEAD", 0)  # attention through SDPA
    model = Transformer(nano_config(name))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(2, 12, dtype=torch.long)
    segments = torch.full((2, 12), -1)
    positions = torch.zeros(2, 12, dtype=torch.long)
    docs = []  # (row, start, ids)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            docs.append((r, start, torch.randint(0, 128, (n,), generator=g)))
            ids[r, start : start + n], segments[r, start : start + n] = docs[-1][2], i
            positions[r, start : start + n] = torch.arange(n)
            start += n
    assert (fast_module.Documents.of(segments) is not None) == grid
    probe = torch.randn(2, 12, 128, generator=g) * (segments >= 0)[..., None]  # no loss on padding

    packed = model(ids, positions=positions, segment_ids=segments)
    (packed * probe).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for row, start, doc in docs:
        out = model(doc[None])
        assert (packed[row, start : start + len(doc)].detach() - out[0].detach()).abs().max() < TOL
        (out[0] * probe[row, start : start + len(doc)]).sum().backward()
    if grid:
        assert torch.equal(packed[1, sum(rows[1]):], torch.zeros(12 - sum(rows[1]), 128))
    for p, ref in zip(model.parameters(), packed_grads):
        assert (p.grad - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-6


def test_packed_logprobs_at_chosen_positions_skip_padding():
    model = Transformer(nano_config("llama-gqa-untied"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    keep = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    positions = torch.zeros_like(ids)
    with torch.no_grad():
        full = model(Logprobs(ids, ids, positions=positions, segment_ids=segments))
        chosen = model(Logprobs(ids, ids[keep], positions=positions, segment_ids=segments, where=keep))
        assert torch.allclose(chosen, full[keep], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="padding"):
            model(Logprobs(ids, ids[segments < 0], positions=positions, segment_ids=segments, where=segments < 0))
        with pytest.raises(ValueError, match="every position is padding"):
            model(ids, segment_ids=torch.full_like(ids, -1))


@pytest.mark.parametrize("layout", ["grid", "packed rows", "padded"])
def test_logprobs_at_chosen_positions_train_as_the_full_forward_with_a_smaller_last_layer(layout, monkeypatch):
    model = Transformer(nano_config("qwen2-bias-tied"))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    targets = torch.randint(0, 128, (2, 12), generator=g)
    if layout == "padded":
        real = torch.ones(2, 12, dtype=torch.bool)
        real[1, :4] = False
        kwargs = dict(attention_mask=real.long())
    else:
        rows = [[5, 4, 3], [6]] if layout == "grid" else [[1] * 10, [12]]
        segments = torch.full((2, 12), -1)
        for r, lengths in enumerate(rows):
            segments[r, : sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        assert (fast_module.Documents.of(segments) is not None) == (layout == "grid")
        real, kwargs = segments >= 0, dict(segment_ids=segments)
    keep = (torch.rand(2, 12, generator=g) < 0.5) & real
    seen = []
    mlp = fast_module.mlp
    monkeypatch.setattr(fast_module, "mlp", lambda m, x: seen.append(x.shape[:-1].numel()) or mlp(m, x))
    chosen = model(Logprobs(ids, targets[keep], where=keep, **kwargs))
    assert seen[-1] == int(keep.sum())  # the last layer's MLP ran at the chosen positions alone
    weights = torch.randn(chosen.shape, generator=g)
    grads = torch.autograd.grad((chosen * weights).sum(), list(model.parameters()))
    full = model(Logprobs(ids, targets, **kwargs))[keep]
    assert (chosen - full).abs().max().item() < TOL
    want = torch.autograd.grad((full * weights).sum(), list(model.parameters()))
    for a, b in zip(grads, want):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item() + 1e-7


def shared_prompt_batch(vocab: int):
    """Two prompts (5 and 3 tokens) continued by 5 rows in mixed order, each with 6 tokens."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, vocab, (5,), generator=g).tolist(), torch.randint(0, vocab, (3,), generator=g).tolist()]
    which = [1, 0, 0, 1, 0]
    rows = torch.randint(0, vocab, (5, 6), generator=g)
    ids = torch.tensor([[0, 0] + prompts[1], prompts[0]])[[1, 0]]  # left-padded, in `prompts` order
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    return prompts, which, rows, SharedPrefix(ids, mask, torch.tensor(which))


def alone(model, prompt, row, target):
    """Logprobs of `target` after the prompt's last position and each of the row's tokens, the
    prompt and row run as one sequence."""
    ids = torch.cat([torch.tensor(prompt), row])[None]
    return model(Logprobs(ids, torch.cat([torch.zeros(len(prompt) - 1, dtype=torch.long), target])[None]))[
        0, len(prompt) - 1 :]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias-tied", "qwen3-qknorm-headdim"])
def test_shared_prefix_equals_each_row_with_its_prompt(name, impl):
    model = Transformer(nano_config(name), impl=impl)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    prompts, which, rows, prefix = shared_prompt_batch(model.config.vocab_size)
    targets = torch.randint(0, model.config.vocab_size, (5, 7), generator=torch.Generator().manual_seed(4))
    shared = model(PrefixLogprobs(prefix, rows, targets))  # [5, 1 + 6]
    assert shared.shape == (5, 7)
    for i, p in enumerate(which):
        assert (shared[i] - alone(model, prompts[p], rows[i], targets[i])).abs().max().item() < TOL
    # Gradients too: the prompt computed once must collect the gradient of every row continuing it.
    weights = torch.randn(shared.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((shared * weights).sum(), list(model.parameters()))
    full = torch.stack([alone(model, prompts[p], rows[i], targets[i]) for i, p in enumerate(which)])
    want = torch.autograd.grad((full * weights).sum(), list(model.parameters()))
    for g, w in zip(grads, want):
        assert (g - w).abs().max().item() < 1e-4 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_prefix_with_no_row_tokens_gives_the_logprobs_after_each_prompt(impl):
    model = Transformer(nano_config("qwen2-mha-untied"), impl=impl).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    prompts, which, rows, prefix = shared_prompt_batch(model.config.vocab_size)
    targets = torch.arange(5)[:, None]
    with torch.no_grad():
        out = model(PrefixLogprobs(prefix, rows[:, :0], targets))
        after = [torch.log_softmax(model(torch.tensor([p]))[0, -1], -1) for p in prompts]
    assert out.shape == (5, 1)
    for i, p in enumerate(which):
        assert (out[i, 0] - after[p][i]).abs().max().item() < TOL


def test_logprobs_where_gives_the_selected_positions_only():
    model = Transformer(nano_config("llama-gqa-untied")).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    ids, mask = padded_batch(model.config.vocab_size)
    keep = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    with torch.no_grad():
        out = model(Logprobs(ids, ids[keep], attention_mask=mask, where=keep))
        full = model(Logprobs(ids, ids, attention_mask=mask))
    assert out.shape == (int(keep.sum()),)
    torch.testing.assert_close(out, full[keep], rtol=0, atol=1e-6)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    cfg = nano_config("llama-tied-bias-llama3rope")
    plain = ModelConfig(**{**cfg.__dict__, "rope_scaling": None})
    scaled, base = rope_inv_freq(cfg), rope_inv_freq(plain)
    assert torch.equal(scaled[0], base[0])  # highest frequency kept
    assert torch.allclose(scaled[-1], base[-1] / cfg.rope_scaling["factor"])  # lowest divided by factor


def test_unsupported_config_values_are_named():
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported; supported: llama, qwen2, qwen3"):
        config_from_hf({"model_type": "mistral"})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        config_from_hf({"model_type": "qwen2", "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf({"model_type": "qwen2", "use_sliding_window": True})


def test_sequence_longer_than_context_is_a_clear_error():
    model = Transformer(ModelConfig(max_position_embeddings=16, vocab_size=32, hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=1))
    with pytest.raises(ValueError, match="model's context is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
