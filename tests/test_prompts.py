"""Prompt templates: exact rendered messages, exemplar selection, target format, config errors."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nanopost.prompts import PromptTemplate
from nanopost.rewards import extract_answer, format_reward

FORMAT = "Think step by step inside <think> </think>, then give only the final answer inside <answer> </answer>."

POOL = [
    {"question": f"Is {n} even?", "answer": "yes" if n % 2 == 0 else "no", "reasoning": f"{n} mod 2 is {n % 2}.",
     "label": "yes" if n % 2 == 0 else "no"}
    for n in (2, 4, 6, 8, 10, 3, 5)
]  # five "yes", two "no": a majority a plain draw would pass on


def test_instruction_only_renders_one_user_message():
    t = PromptTemplate(instruction="Solve the problem.")
    content = f"Solve the problem.\n\nWhat is 2+3?\n\n{FORMAT}"
    assert t.messages("What is 2+3?") == [{"role": "user", "content": content}]


def test_system_message_joins_only_the_given_items_in_order():
    t = PromptTemplate(
        instruction="Solve the problem.",
        role="You are a careful math tutor.",
        context="The student is learning fractions.",
        tone="Be encouraging.",
        output_format="Answer with a number only.",
        reasoning=False,
    )
    assert t.messages("What is 1/2 + 1/4?") == [
        {"role": "system", "content": "You are a careful math tutor.\n\nBe encouraging.\n\n"
                                      "The student is learning fractions.\n\nAnswer with a number only."},
        {"role": "user", "content": "Solve the problem.\n\nWhat is 1/2 + 1/4?\n\n"
                                    "Give only the final answer inside <answer> </answer>."},
    ]
    t = PromptTemplate(instruction="x", system="Be safe.", tone="Be brief.")
    assert t.system_message() == "Be safe.\n\nBe brief."


def test_exemplars_appear_as_earlier_turns_in_the_answer_format():
    t = PromptTemplate(instruction="Answer yes or no.", system="S.", exemplars=POOL[:2], n_shot=2)
    assert t.messages("Is 7 even?") == [
        {"role": "system", "content": "S."},
        {"role": "user", "content": f"Answer yes or no.\n\nIs 2 even?\n\n{FORMAT}"},
        {"role": "assistant", "content": "<think>\n2 mod 2 is 0.\n</think>\n<answer>yes</answer>"},
        {"role": "user", "content": f"Answer yes or no.\n\nIs 4 even?\n\n{FORMAT}"},
        {"role": "assistant", "content": "<think>\n4 mod 2 is 0.\n</think>\n<answer>yes</answer>"},
        {"role": "user", "content": f"Answer yes or no.\n\nIs 7 even?\n\n{FORMAT}"},
    ]


def shown(t: PromptTemplate, rng=None) -> list[str]:
    """Questions of the exemplars a prompt shows, in order."""
    return [m["content"].split("\n\n")[1] for m in t.messages("Is 7 even?", rng=rng)[:-1] if m["role"] == "user"]


def test_plain_draw_keeps_pool_order_and_is_fixed_by_the_seed():
    t = PromptTemplate(instruction="x", exemplars=POOL, n_shot=3, seed=5)
    order = [e["question"] for e in POOL]
    got = shown(t)
    assert sorted(got, key=order.index) == got
    assert shown(t) == got  # no rng: every question gets the same prompt
    draws = {tuple(shown(PromptTemplate(instruction="x", exemplars=POOL, n_shot=3, seed=s))) for s in range(10)}
    assert len(draws) > 1


def test_balance_labels_gives_equal_counts_interleaved():
    for seed in range(5):
        t = PromptTemplate(instruction="x", exemplars=POOL, n_shot=4, balance_labels=True, seed=seed)
        labels = [e["label"] for e in t.select_exemplars()]
        assert Counter(labels) == {"yes": 2, "no": 2}
        assert labels == ["yes", "no", "yes", "no"]  # labels in order of first appearance, alternating


def test_shuffle_changes_order_deterministically_with_the_seed():
    def template(seed, shuffle=True):
        return PromptTemplate(instruction="x", exemplars=POOL, n_shot=7, shuffle_exemplars=shuffle, seed=seed)

    assert shown(template(0, shuffle=False)) == [e["question"] for e in POOL]
    orders = [tuple(shown(template(seed))) for seed in range(6)]
    assert orders == [tuple(shown(template(seed))) for seed in range(6)]
    assert len(set(orders)) > 1
    assert all(sorted(o) == sorted(e["question"] for e in POOL) for o in orders)
    # With an rng, each call draws a new order; the same rng seed repeats the sequence.
    rng_a, rng_b = random.Random(1), random.Random(1)
    calls = [tuple(shown(template(0), rng=rng_a)) for _ in range(4)]
    assert calls == [tuple(shown(template(0), rng=rng_b)) for _ in range(4)]
    assert len(set(calls)) > 1


@pytest.mark.parametrize("reasoning", [True, False])
def test_target_round_trips_through_the_rewards(reasoning):
    t = PromptTemplate(instruction="x", reasoning=reasoning)
    text = t.target("  3 + 4 = 7  ", " 7 ")
    assert extract_answer(text) == "7"
    if reasoning:
        assert text == "<think>\n3 + 4 = 7\n</think>\n<answer>7</answer>"
        assert format_reward(text) == 1.0
    else:
        assert text == "<answer>7</answer>"


def test_custom_tags_are_requested_and_produced():
    t = PromptTemplate(instruction="x", think_tags=["<reason>", "</reason>"], answer_tags=("<final>", "</final>"))
    assert t.format_request() == (
        "Think step by step inside <reason> </reason>, then give only the final answer inside <final> </final>."
    )
    text = t.target("r", "42")
    assert extract_answer(text, answer_tags=t.answer_tags) == "42"
    assert format_reward(text, think_tags=t.think_tags, answer_tags=t.answer_tags) == 1.0


def test_from_dict_builds_and_names_unknown_keys():
    config = {"instruction": "Solve.", "n_shot": 1, "exemplars": POOL[:1], "answer_tags": ["<a>", "</a>"]}
    t = PromptTemplate.from_dict(config)
    assert t.answer_tags == ("<a>", "</a>") and len(t.select_exemplars()) == 1
    with pytest.raises(ValueError, match=r"unknown keys \['nshot', 'temprature'\]"):
        PromptTemplate.from_dict({"instruction": "x", "nshot": 2, "temprature": 1.0})
    with pytest.raises(ValueError, match="missing key 'instruction'"):
        PromptTemplate.from_dict({"role": "You are a tutor."})


QA = {"question": "q", "answer": "a"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"instruction": " "}, "instruction must be a non-empty string"),
        ({"exemplars": POOL[:2], "n_shot": 3}, "n_shot=3 but the exemplar pool has only 2"),
        ({"exemplars": POOL, "n_shot": 3, "balance_labels": True}, "n_shot divisible by the number of labels"),
        ({"exemplars": POOL, "n_shot": 6, "balance_labels": True},
         r"needs 3 exemplars per label; the pool has only \{'no': 2\}"),
        ({"exemplars": [QA], "n_shot": 1, "balance_labels": True, "reasoning": False}, r"exemplars\[0\] has no 'label'"),
        ({"exemplars": [QA]}, r"exemplars\[0\] needs a 'reasoning' string"),
        ({"exemplars": [{**QA, "why": "b"}], "reasoning": False}, r"unknown keys \['why'\]"),
        ({"answer_tags": ("<a>",)}, "answer_tags must be two non-empty strings"),
        ({"n_shot": -1}, "n_shot must be a non-negative integer"),
    ],
)
def test_bad_templates_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(**{"instruction": "x", **kwargs})
