"""Held-out evaluation: accuracy, intervals, per-level grouping and extra measures over the
same greedy completions that `completions` returns."""

import pytest
import torch

from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.eval import EvalItem, completions, evaluate, wilson_interval
from tiny import larger_records, make_checkpoint, split_pairs


@pytest.fixture(scope="module")
def model_and_items(tmp_path_factory):
    train, val = split_pairs()
    texts = [r["prompt"] + " " + r["completion"] for r in larger_records(train + val)]
    path = make_checkpoint(tmp_path_factory.mktemp("eval") / "m", texts)
    tokenizer, model = load_tokenizer(path), load_model(path)
    # Large random weights, so the greedy completions depend on the prompt.
    model.init_weights(std=0.5, generator=torch.Generator().manual_seed(0))
    items = [EvalItem(tokenizer.encode(r["prompt"]), r["completion"], difficulty=i % 3)
             for i, r in enumerate(larger_records(val[:9]))]
    return model, tokenizer, items


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_measures_average_over_the_greedy_completions(model_and_items):
    model, tokenizer, items = model_and_items
    greedy = completions(model, tokenizer, [it.prompt_ids for it in items], max_new_tokens=8)
    # Functions of the text that differ from completion to completion (the lengths do not: a
    # random model never stops early), so a mean over the wrong completions would show.
    distinct = lambda c, it: float(len(set(c)))  # noqa: E731
    odd = lambda c, it: float(len(set(c)) % 2)  # noqa: E731  (stands in for an answer check)
    assert len({distinct(c, None) for c in greedy}) > 1 and 0 < sum(odd(c, None) for c in greedy) < len(items)
    result = evaluate(model, tokenizer, items, max_new_tokens=8, k=2, check=odd, measures={"distinct": distinct})
    assert result["distinct"] == pytest.approx(sum(distinct(c, None) for c in greedy) / len(items))
    assert result["accuracy"] == pytest.approx(sum(odd(c, None) for c in greedy) / len(items))
    for level in range(3):
        expected = [odd(c, None) for c, it in zip(greedy, items) if it.difficulty == level]
        assert result["per_difficulty"][level] == pytest.approx(sum(expected) / len(expected))
    assert result["n"] == len(items)
