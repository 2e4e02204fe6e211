"""The packed decoding step: the model's cached forward in fewer kernels, in every family."""

import dataclasses

import pytest
import torch

import nanopost.fast.decode as decode
from hf_reference import CONFIGS, nano_config, random_nano_model
from nanopost.fast.decode import PackedWeights, decoder
from nanopost.generate import generate, left_pad
from nanopost.model import KVCache, Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24], [99]]


def model_for(name: str) -> Transformer:
    if name != "llama-mlp-bias":
        return random_nano_model(name)
    model = Transformer(dataclasses.replace(nano_config("llama-gqa-untied"), mlp_bias=True))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    return model.eval()


def prefilled(model: Transformer, max_new: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    cache = KVCache(model.config, len(PROMPTS), ids.shape[1] + max_new, "cpu", model.dtype)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache)[:, -1]
    return cache, logits, mask.sum(-1, keepdim=True)


@pytest.mark.parametrize("name", [*CONFIGS, "llama-mlp-bias"])
def test_packed_step_equals_the_models_cached_forward(name):
    model = model_for(name)
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    if name == "llama-mlp-bias":
        assert any("mlp" in n for n in biases) and not any("self_attn" in n for n in biases)
    packed = PackedWeights(model)
    steps = 8
    ours, logits, positions = prefilled(model, steps)
    ref, _, _ = prefilled(model, steps)
    for _ in range(steps):
        tokens = logits.argmax(-1, keepdim=True)  # [B, 1]
        logits = packed.step(tokens, positions, ours)
        with torch.no_grad():
            expected = model(tokens, positions=positions, cache=ref)[:, -1]
        assert (logits - expected).abs().max() < 1e-5
        positions = positions + 1
    assert ours.length == ref.length
    assert torch.allclose(ours.k, ref.k, atol=1e-5) and torch.allclose(ours.v, ref.v, atol=1e-5)
    assert len(set(logits.argmax(-1).tolist())) > 1  # the rows did not all collapse to one token


@pytest.mark.parametrize("name", ["qwen2-bias-tied", "llama-gqa-untied", "qwen3-qknorm-headdim"])
def test_a_bf16_models_packed_step_rounds_as_its_forward_does(name):
    # fp32 folds each norm's gain into the next matrix. In bf16 that doubles the step's distance
    # from the forward (up to 1.25% of the largest logit here, against 0.6% with the norms kept).
    model = random_nano_model(name).to(torch.bfloat16)
    ours, logits, positions = prefilled(model, 6)
    ref, _, _ = prefilled(model, 6)
    packed = PackedWeights(model)
    for _ in range(6):
        tokens = logits.argmax(-1, keepdim=True)
        logits = packed.step(tokens, positions, ours)
        with torch.no_grad():
            expected = model(tokens, positions=positions, cache=ref)[:, -1].float()
        assert (logits.float() - expected).abs().max() <= 0.008 * expected.abs().max()
        positions = positions + 1


def test_generate_gives_the_same_tokens_packed_or_not(monkeypatch):
    model = random_nano_model("qwen2-bias-tied")
    packed = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    monkeypatch.setattr(decode, "PACK_LIMIT_BYTES", 0)
    plain = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    assert torch.equal(packed.tokens, plain.tokens)
    assert torch.allclose(packed.logprobs, plain.logprobs, atol=1e-5)


def test_models_above_the_limit_decode_through_their_forward(monkeypatch):
    model = random_nano_model("llama-gqa-untied")
    assert isinstance(getattr(decoder(model), "__self__", None), PackedWeights)
    monkeypatch.setattr(decode, "PACK_LIMIT_BYTES", PackedWeights.size(model) - 1)
    assert not isinstance(getattr(decoder(model), "__self__", None), PackedWeights)


def test_generate_packs_the_weights_as_they_are_at_each_call():
    model = random_nano_model("llama-gqa-untied")
    before = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(1.5)
    after = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    assert not torch.equal(before.tokens, after.tokens)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt + after.completion(i)])
        with torch.no_grad():
            logits = model(ids)[0, len(prompt) - 1 : -1]
        assert torch.equal(logits.argmax(-1), after.tokens[i])
