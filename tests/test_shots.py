"""n-shot bias: exemplars balanced and shuffled, prompts enumerated, copy rate and calibration
computed right, a model scores labels."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.data import tokenize_prompt
from nanopost.prompts import PromptTemplate
from nanopost.rewards import extract_answer
from nanopost.tools.shots import (ModelScorer, ShotsConfig, calibrate, evaluate_shots, messages_for, run_shots,
                                  select_exemplars, sentiment_task, shot_prompts)
from tiny import make_checkpoint, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = PromptTemplate(instruction="Sentiment?", reasoning=False)
POOL = [{"question": q, "answer": l, "label": l} for q, l in
        [("nice", "pos"), ("great", "pos"), ("awful", "neg"), ("poor", "neg")]]
# three positive questions and one negative: a bias towards one label shows in accuracy
ITEMS = [{"question": q, "answer": l, "label": l} for q, l in
         [("good", "pos"), ("fine", "pos"), ("lovely", "pos"), ("bad", "neg")]]
GOLD = {r["question"]: r["label"] for r in ITEMS}


def stub_scorer(messages_list, labels):
    """Known probabilities: p(label) ∝ prior(label) * likelihood(label | question), where the
    exemplars set the prior, w = 1 + (times the label was shown) + 4 * (label of the last exemplar),
    and the question's own label has likelihood 0.7 (0.5 each for the content-free "N/A")."""
    out = []
    for messages in messages_list:
        shown = [extract_answer(m["content"]) for m in messages if m["role"] == "assistant"]
        question = messages[-1]["content"].split("\n\n")[1]
        prior = np.array([1 + shown.count(l) + 4 * (bool(shown) and shown[-1] == l) for l in labels], float)
        like = np.array([0.5 if question == "N/A" else (0.7 if GOLD[question] == l else 0.3) for l in labels])
        p = prior * like
        out.append(p / p.sum())
    return np.array(out)


def test_prompts_cover_every_label_combination_and_order():
    prompts = shot_prompts(POOL, shots=(0, 1, 2), draws=1)
    assert [p.labels for p in prompts] == [
        (), ("neg",), ("pos",),
        ("neg", "neg"), ("neg", "neg"),  # two different negative exemplars, both orders
        ("neg", "pos"), ("pos", "neg"),  # the same two exemplars, both orders
        ("pos", "pos"), ("pos", "pos")]
    mixed = [p for p in prompts if set(p.labels) == {"neg", "pos"}]
    assert mixed[0].set_id == mixed[1].set_id and mixed[0].exemplars == mixed[1].exemplars[::-1]
    with pytest.raises(ValueError, match="needs more exemplars"):
        shot_prompts(POOL, shots=(3,))


EVEN = [
    {"question": f"Is {n} even?", "answer": "yes" if n % 2 == 0 else "no", "label": "yes" if n % 2 == 0 else "no"}
    for n in (2, 4, 6, 8, 10, 3, 5)
]  # five "yes", two "no": a majority a plain draw would pass on


def questions(exemplars) -> tuple[str, ...]:
    return tuple(e["question"] for e in exemplars)


def test_plain_selection_is_the_template_draw():
    for seed in range(5):
        template = PromptTemplate(instruction="x", reasoning=False, exemplars=EVEN, n_shot=3, seed=seed)
        assert select_exemplars(EVEN, 3, rng=random.Random(seed)) == template.select_exemplars()


def test_balance_labels_gives_equal_counts_interleaved():
    for seed in range(5):
        labels = [e["label"] for e in select_exemplars(EVEN, 4, balance_labels=True, rng=random.Random(seed))]
        assert Counter(labels) == {"yes": 2, "no": 2}
        assert labels == ["yes", "no", "yes", "no"]  # labels in order of first appearance, alternating


def test_shuffle_changes_order_deterministically_with_the_seed():
    def shown(seed=0, shuffle=True, rng=None):
        return questions(select_exemplars(EVEN, 7, shuffle=shuffle, rng=rng or random.Random(seed)))

    assert shown(0, shuffle=False) == questions(EVEN)
    orders = [shown(seed) for seed in range(6)]
    assert orders == [shown(seed) for seed in range(6)]
    assert len(set(orders)) > 1
    assert all(sorted(o) == sorted(questions(EVEN)) for o in orders)
    # With one rng over several calls, each call draws a new order; the same rng seed repeats the sequence.
    rng_a, rng_b = random.Random(1), random.Random(1)
    calls = [shown(rng=rng_a) for _ in range(4)]
    assert calls == [shown(rng=rng_b) for _ in range(4)]
    assert len(set(calls)) > 1


@pytest.mark.parametrize(
    "pool, n_shot, message",
    [
        (EVEN, 3, "n_shot divisible by the number of labels"),
        (EVEN, 6, r"needs 3 exemplars per label; the pool has only \{'no': 2\}"),
        ([{"question": "q", "answer": "a"}], 1, r"exemplars\[0\] has no 'label'"),
        (EVEN[:2], 3, "n_shot=3 but the exemplar pool has only 2"),
    ],
)
def test_impossible_balance_is_rejected_with_the_reason(pool, n_shot, message):
    with pytest.raises(ValueError, match=message):
        select_exemplars(pool, n_shot, balance_labels=True, rng=random.Random(0))


def test_copy_rate_order_std_and_calibration_by_hand():
    res = evaluate_shots(ITEMS, POOL, stub_scorer, TEMPLATE, shots=(0, 1, 2), calibrated=True)
    zero, one, two = res["by_shots"][0], res["by_shots"][1], res["by_shots"][2]
    # 0-shot: prior 1:1, the likelihood decides: all correct
    assert zero["accuracy"] == 1.0 and "copy_rate" not in zero
    # 1-shot "pos": prior 6:1; "bad" scores pos 6*0.3 = 1.8 > neg 1*0.7, so every answer is pos:
    # accuracy 3/4, copy rate 1. 1-shot "neg": every answer neg, accuracy 1/4. Unbiased copy rate: (3/4 + 1/4) / 2
    by_labels = {tuple(r["labels"]): r for r in res["prompts"]}
    assert (by_labels[("pos",)]["accuracy"], by_labels[("pos",)]["copy_rate"]) == (0.75, 1.0)
    assert (by_labels[("neg",)]["accuracy"], by_labels[("neg",)]["copy_rate"]) == (0.25, 1.0)
    assert (one["accuracy"], one["copy_rate"], one["gold_is_last"]) == (0.5, 1.0, 0.5)
    # 2-shot (pos, neg): prior 2:6 = 1:3 > 0.7/0.3, so all answers neg -> 1/4; (neg, pos): all pos -> 3/4.
    # The order alone moves accuracy by 0.5: population std over the two orders 0.25.
    assert (by_labels[("pos", "neg")]["accuracy"], by_labels[("neg", "pos")]["accuracy"]) == (0.25, 0.75)
    assert two["copy_rate"] == 1.0 and two["order_std_max"] == pytest.approx(0.25)
    # calibration: p_cf is the prior, so p / p_cf is the likelihood: every prompt gets all four right,
    # and answers copy the last label only as often as the gold labels do
    for k in (0, 1, 2):
        cal = res["by_shots"][k]["calibrated"]
        assert cal["accuracy"] == 1.0 and cal["accuracy_std"] == 0.0
    assert res["by_shots"][1]["calibrated"]["copy_rate"] == 0.5
    assert by_labels[("pos",)]["content_free"] == pytest.approx([1 / 7, 6 / 7])  # labels sorted: neg, pos


def test_calibrate_divides_by_the_prior_and_renormalises():
    q = calibrate(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0.75, 0.25]))
    # [0.9/0.75, 0.1/0.25] = [1.2, 0.4] -> [0.75, 0.25]; [0.8, 1.6] -> [1/3, 2/3]
    np.testing.assert_allclose(q, [[0.75, 0.25], [1 / 3, 2 / 3]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("shots")
    texts = [TEMPLATE.user_message(r["question"]) + TEMPLATE.target("", r["label"]) for r in POOL + ITEMS] * 3
    ckpt = make_checkpoint(d / "ckpt", texts)
    return ckpt, write_jsonl(ITEMS, d / "test.jsonl"), write_jsonl(POOL, d / "pool.jsonl"), d


def test_model_scorer_matches_a_plain_forward(tiny):
    ckpt = tiny[0]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    messages = [messages_for(TEMPLATE, POOL[:2], r["question"]) for r in ITEMS[:3]]
    probs = ModelScorer(model, tok, TEMPLATE, batch_size=4)(messages, ["neg", "pos"])
    assert probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    # one (prompt, answer) pair without any padding
    prompt = tokenize_prompt(tok, messages[1])
    scores = []
    for label in ("neg", "pos"):
        answer = tok.encode(TEMPLATE.target("", label))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer]))[0]
        logp = torch.log_softmax(logits.double(), -1)
        scores.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer)))
    expected = torch.softmax(torch.tensor(scores), 0).numpy()
    np.testing.assert_allclose(probs[1], expected, atol=1e-5)


def test_runs_on_a_checkpoint_and_writes_json(tiny):
    ckpt, test, pool, d = tiny
    cfg = ShotsConfig(model=str(ckpt), data=str(test), exemplars=str(pool), instruction="Sentiment?",
                      shots=[0, 1, 2], draws=1, calibrate=True, out=str(d / "shots.json"), device="cpu")
    lines = []
    res = run_shots(cfg, log=lines.append)
    assert set(res["by_shots"]) == {0, 1, 2} and len(res["prompts"]) == 9
    assert json.loads((d / "shots.json").read_text())["n_items"] == 4
    assert any("copy" in line for line in lines)


def test_shipped_task_is_balanced_disjoint_and_reproducible():
    read = lambda name: [json.loads(l) for l in (ROOT / "data" / "shots" / name).read_text().splitlines()]  # noqa: E731
    test, exemplars = read("test.jsonl"), read("exemplars.jsonl")
    assert (len(test), len(exemplars)) == (200, 20)
    assert sum(r["label"] == "positive" for r in test) == 100 and sum(r["label"] == "positive" for r in exemplars) == 10
    assert not {r["question"] for r in test} & {r["question"] for r in exemplars}
    assert all(r["answer"] == r["label"] for r in test + exemplars)
    assert (test, exemplars) == sentiment_task()
