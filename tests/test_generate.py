"""generate(): exactness against transformers and full recomputation, seeding, stop handling."""

import pytest
import torch

from hf_reference import hf_model, random_nano_model
from nanopost.plumbing.hf_io import load_model
from nanopost.generate import generate, left_pad, sample_token

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24], [99]]


def full_logits(model, prompt, completion):
    """Logits for each completion token, recomputed without a cache."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0]
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias-tied", "qwen3-qknorm-headdim"])
def test_greedy_equals_transformers_generate(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    out = generate(ours, PROMPTS, max_new_tokens=12, temperature=0)
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.tokens, ref[:, ids.shape[1]:])
    assert len(set(out.tokens.flatten().tolist())) > 5  # the comparison is not between constant outputs


def test_cached_decoding_equals_full_recomputation():
    model = random_nano_model("qwen2-mha-untied")
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        logits = full_logits(model, prompt, out.completion(i))
        assert torch.equal(logits.argmax(-1), out.tokens[i])
        assert torch.allclose(torch.log_softmax(logits, -1).gather(-1, out.tokens[i, :, None])[:, 0],
                              out.logprobs[i], atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_recomputed_tempered_logprobs(temperature):
    model = random_nano_model("llama-gqa-untied")
    out = generate(model, PROMPTS, max_new_tokens=16, temperature=temperature, top_k=40,
                   generator=torch.Generator().manual_seed(3))
    for i, prompt in enumerate(PROMPTS):
        logits = full_logits(model, prompt, out.completion(i))
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, out.tokens[i, :, None])[:, 0]
        assert torch.allclose(expected, out.logprobs[i], atol=1e-5)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = random_nano_model("qwen3-qknorm-headdim")
    a = generate(model, PROMPTS, max_new_tokens=20, generator=torch.Generator().manual_seed(7))
    b = generate(model, PROMPTS, max_new_tokens=20, generator=torch.Generator().manual_seed(7))
    c = generate(model, PROMPTS, max_new_tokens=20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_stop_tokens_end_rows_and_dropping_rows_changes_nothing():
    model = random_nano_model("qwen2-bias-tied")
    greedy = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    stop = int(greedy.tokens[1, 3])  # a token some row really produces
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=[stop], pad_token_id=-1)
    for i, prompt in enumerate(PROMPTS):
        # Each row alone (no batch-mates finishing around it) gives the same completion.
        alone = generate(model, [prompt], max_new_tokens=12, temperature=0, stop_token_ids=[stop])
        assert out.completion(i) == alone.completion(0)
        row = greedy.tokens[i].tolist()
        if stop in row:
            n = row.index(stop) + 1
            assert out.finished[i] and out.lengths[i] == n and out.tokens[i, n - 1] == stop
            assert (out.tokens[i, n:] == -1).all() and (out.logprobs[i, n:] == 0).all()
        else:
            assert not out.finished[i] and out.lengths[i] == 12
    assert out.finished[1]


def test_repeated_prompts_are_prefilled_once_and_sampled_independently():
    model = random_nano_model("llama-gqa-untied")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    prefill_rows = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda _m, args, _out: prefill_rows.append(args[0].shape[0]) if args[0].shape[1] > 1 else None)
    greedy = generate(model, prompts, max_new_tokens=8, temperature=0)
    sampled = generate(model, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert prefill_rows == [2, 2]  # one row per distinct prompt
    for i, prompt in enumerate(prompts):
        assert greedy.completion(i) == generate(model, [prompt], max_new_tokens=8, temperature=0).completion(0)
        logits = full_logits(model, prompt, sampled.completion(i))
        expected = torch.log_softmax(logits, -1).gather(-1, sampled.tokens[i, :, None])[:, 0]
        assert torch.allclose(expected, sampled.logprobs[i], atol=1e-5)
    assert len({tuple(sampled.completion(i)) for i in (0, 2, 3)}) > 1  # copies of a prompt draw apart


def test_sampler_draws_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40000, 5)
    tok, lp = sample_token(logits, temperature=0.8, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits[0] / 0.8, -1)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    assert (freq - probs).abs().max() < 0.01  # ~4 standard errors at n = 40000
    assert torch.allclose(lp, probs.log()[tok])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(5000, 5)
    g = torch.Generator().manual_seed(0)
    tok, _ = sample_token(logits, 1.0, top_k=2, generator=g)
    assert set(tok.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.636, 0.234, 0.086, ...: top-p 0.8 keeps the first two
    tok, _ = sample_token(logits, 1.0, top_p=0.8, generator=g)
    assert set(tok.tolist()) == {0, 1} and probs[0] < 0.8 < probs[:2].sum()
    tok, _ = sample_token(logits, 1.0, top_p=1e-6, generator=g)
    assert set(tok.tolist()) == {0}


def test_prompt_longer_than_context_is_a_clear_error():
    model = random_nano_model("llama-gqa-untied")  # context 256
    with pytest.raises(ValueError, match="prompt 1 has 250 tokens; with max_new_tokens=10 it needs 260"):
        generate(model, [[1, 2], [3] * 250], max_new_tokens=10)


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="every prompt at least one token"):
        generate(random_nano_model("llama-gqa-untied"), [[1], []], max_new_tokens=3)
