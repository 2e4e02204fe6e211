"""The fast path against the reference, through the model's one switch (Transformer.impl).

Each case runs the same model on the same inputs as impl="reference" and impl="fast" and holds
the values and every parameter's gradient to rounding. The reference itself is held to
transformers in test_model.py.
"""

import pytest
import torch

from hf_reference import CONFIGS, padded_batch, random_nano_model
from nanopost.fast.transformer import Documents
from nanopost.generate import generate, shared_prefix
from nanopost.model import IMPLS, Logprobs, PrefixLogprobs, Transformer

NAMES = list(CONFIGS)


def both(model, run):
    """(output, gradients) of run() under each implementation."""
    out = {}
    for impl in IMPLS:
        model.impl = impl
        model.zero_grad(set_to_none=True)
        value = run()
        value.backward() if value.dim() == 0 else None
        out[impl] = value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.impl = "fast"
    return out["reference"], out["fast"]


def assert_same(reference, fast, atol=2e-5):
    torch.testing.assert_close(fast[0], reference[0], rtol=0, atol=atol)
    assert reference[1].keys() == fast[1].keys()
    for name, want in reference[1].items():  # to rounding, relative to the largest entry
        assert (fast[1][name] - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7, name


def probe(shape, seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_impl_is_checked():
    model = random_nano_model("qwen2-bias-tied")
    with pytest.raises(ValueError, match="impl must be one of fast, reference"):
        model.impl = "flash"
    assert Transformer(model.config).impl == "fast" and Transformer(model.config, impl="reference").impl == "reference"


@pytest.mark.parametrize("name", NAMES)
def test_padded_logits_and_gradients(name):
    model = random_nano_model(name).train()
    ids, mask = padded_batch(model.config.vocab_size)
    weights = probe((*ids.shape, model.config.vocab_size)) * mask[..., None]
    reference, fast = both(model, lambda: (model(ids, attention_mask=mask) * weights).sum())
    assert_same(reference, fast, atol=1e-4)


@pytest.mark.parametrize("rows", [[[5, 4, 3], [6]], [[1] * 10, [12]]], ids=["grid", "rows"])
@pytest.mark.parametrize("name", NAMES)
def test_packed_batch_logprobs_and_gradients(name, rows):
    model = random_nano_model(name).train()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    segments = torch.full((2, 12), -1)
    positions = torch.zeros(2, 12, dtype=torch.long)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            segments[r, start : start + n], positions[r, start : start + n] = i, torch.arange(n)
            start += n
    assert (Documents.of(segments) is not None) == (rows[0] == [5, 4, 3])
    ids, targets = torch.randint(0, V, (2, 12), generator=g), torch.randint(0, V, (2, 12), generator=g)
    where = (torch.rand(2, 12, generator=g) < 0.6) & (segments >= 0)
    weights = probe(int(where.sum()))

    def run():
        return (model(Logprobs(ids, targets[where], positions=positions, segment_ids=segments, where=where)) * weights).sum()

    assert_same(*both(model, run))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", NAMES)
def test_logprobs_with_entropy_at_chosen_positions(name, temperature):
    model = random_nano_model(name).train()
    ids, mask = padded_batch(model.config.vocab_size, seed=3)
    where = mask.bool() & (torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.7)
    weights = probe(int(where.sum()))
    entropies = {}

    def run():
        logp, entropy = model(Logprobs(ids, ids[where], attention_mask=mask, where=where, temperature=temperature,
                                       with_entropy=True))
        entropies[model.impl] = entropy
        return (logp * weights).sum()

    assert_same(*both(model, run))
    torch.testing.assert_close(entropies["fast"], entropies["reference"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_rows_continuing_shared_prompts(name):
    model = random_nano_model(name).train()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    distinct = [torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 3, 9)]
    prompts = [distinct[i % 3] for i in range(7)]
    rows = torch.randint(0, V, (7, 5), generator=g)
    where = torch.rand(7, 6, generator=g) < 0.8
    weights = probe(int(where.sum()))
    prefix = shared_prefix(prompts, torch.device("cpu"))

    def run():
        return (model(PrefixLogprobs(prefix, rows, torch.randint(0, V, (7, 6), generator=torch.Generator().manual_seed(0))[where],
                                     where=where, temperature=0.8)) * weights).sum()

    assert_same(*both(model, run))


@pytest.mark.parametrize("name", NAMES)
def test_sampling_draws_the_same_tokens(name):
    # The fast path decodes through packed weights; the reference through the model's forward.
    model = random_nano_model(name).eval()
    prompts = [[3, 4, 5, 6], [7, 8], [3, 4, 5, 6]]
    out = {}
    for impl in IMPLS:
        model.impl = impl
        out[impl] = generate(model, prompts, max_new_tokens=8, temperature=0.0)
    assert torch.equal(out["fast"].tokens, out["reference"].tokens)
    torch.testing.assert_close(out["fast"].logprobs, out["reference"].logprobs, rtol=0, atol=1e-4)
