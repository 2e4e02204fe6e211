"""sample_token restricts the support exactly as transformers' logits warpers do (and vLLM)."""

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from nanopost.generate import sample_token


def transformers_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] sampling distribution of transformers' generate(do_sample=True): its warpers in its order."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return torch.softmax(warpers(torch.zeros(len(logits), 1, dtype=torch.long), logits.clone()), -1)


LOGITS8 = [3.0, 2.0, 1.0, 0.0, -1.0, 0.5, 2.5, -2.0]
CASES = {  # name: (logits, temperature, top_k, top_p)
    # after top-k the probabilities are [.706, .294]: top-p .7 keeps token 0 alone
    "top-p on the renormalised top-k": (torch.tensor([0.6, 0.25, 0.15]).log(), 1.0, 2, 0.7),
    "top-p renormalised, tempered": (torch.tensor(LOGITS8), 1.5, 5, 0.6),
    "top-k and top-p, cold": (torch.tensor(LOGITS8), 0.7, 4, 0.8),
    "top-p alone": (torch.tensor(LOGITS8), 1.0, 0, 0.9),
    "top-k ties at the k-th value all stay": (torch.tensor([2.0, 1.0, 1.0, 0.0, -1.0]), 1.0, 2, 1.0),
    "top-p mass exactly top_p is enough": (torch.tensor([0.5, 0.3, 0.2]).log(), 1.0, 0, 0.5),
    "top-p tie at the boundary": (torch.tensor([0.5, 0.25, 0.25]).log(), 1.0, 0, 0.75),
    "top-p tie, top token": (torch.tensor([1.0, 1.0, 0.0]), 1.0, 0, 0.3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_support_and_frequencies_equal_transformers(name):
    logits, temperature, top_k, top_p = CASES[name]
    want = transformers_probs(logits[None], temperature, top_k, top_p)[0]
    n = 100_000
    tok, lp = sample_token(logits.expand(n, -1), temperature, top_p=top_p, top_k=top_k,
                           generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=len(logits)).double() / n
    # every allowed token here has probability >= 0.2, so 100k draws show each of them
    assert set(tok.unique().tolist()) == set(want.nonzero()[:, 0].tolist())
    assert (freq - want).abs().max() < 0.01  # a standard error is <= 0.0016 at n = 100k
    # the logprobs stay those of the tempered, untruncated distribution
    assert torch.allclose(lp, torch.log_softmax(logits / temperature, -1)[tok])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 0.9), (0.6, 0, 0.5), (1.3, 10, 0.95), (0.9, 3, 1.0)])
def test_random_rows_draw_only_what_transformers_allows(temperature, top_k, top_p):
    rows, repeats, vocab = 32, 4000, 24
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 2
    want = transformers_probs(logits, temperature, top_k, top_p)  # [rows, V]
    tok, _ = sample_token(logits.repeat_interleave(repeats, 0), temperature, top_p=top_p, top_k=top_k,
                          generator=torch.Generator().manual_seed(0))
    freq = torch.zeros(rows, vocab, dtype=torch.float64)
    freq.index_put_((torch.arange(rows).repeat_interleave(repeats), tok), torch.ones(len(tok), dtype=torch.float64),
                    accumulate=True)
    freq /= repeats
    assert (want[freq > 0] > 0).all()  # nothing outside transformers' support is ever drawn
    assert (freq - want).abs().max() < 0.04  # a standard error is <= 0.008 at 4000 draws a row
