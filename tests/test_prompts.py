"""Prompt templates: exact rendered messages, exemplar selection, target format, config errors."""

from __future__ import annotations

import random

import pytest

from nanopost.prompts import PromptTemplate
from nanopost.rewards import extract_answer, format_reward

FORMAT = "Think step by step inside <think> </think>, then give only the final answer inside <answer> </answer>."

POOL = [
    {"question": f"Is {n} even?", "answer": "yes" if n % 2 == 0 else "no", "reasoning": f"{n} mod 2 is {n % 2}.",
     "label": "yes" if n % 2 == 0 else "no"}
    for n in (2, 4, 6, 8, 10, 3, 5)
]


def test_instruction_only_renders_one_user_message():
    t = PromptTemplate(instruction="Solve the problem.")
    content = f"Solve the problem.\n\nWhat is 2+3?\n\n{FORMAT}"
    assert t.messages("What is 2+3?") == [{"role": "user", "content": content}]


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
    # With an rng, each call draws afresh; the same rng seed repeats the sequence.
    rng_a, rng_b = random.Random(1), random.Random(1)
    calls = [tuple(shown(t, rng=rng_a)) for _ in range(4)]
    assert calls == [tuple(shown(t, rng=rng_b)) for _ in range(4)]
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


QA = {"question": "q", "answer": "a"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"instruction": " "}, "instruction must be a non-empty string"),
        ({"exemplars": POOL[:2], "n_shot": 3}, "n_shot=3 but the exemplar pool has only 2"),
        ({"exemplars": [QA]}, r"exemplars\[0\] needs a 'reasoning' string"),
        ({"exemplars": [{**QA, "why": "b"}], "reasoning": False}, r"unknown keys \['why'\]"),
        ({"answer_tags": ("<a>",)}, "answer_tags must be two non-empty strings"),
        ({"n_shot": -1}, "n_shot must be a non-negative integer"),
    ],
)
def test_bad_templates_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(**{"instruction": "x", **kwargs})
