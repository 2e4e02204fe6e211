"""Red team: completions written the way an adversarial policy would write them, for every reward.

Each reward must order them honest-correct > honest-wrong > gamed. For the rewards that measure
reasoning (thinking, and the demo's combined reward) honest-correct scores at least 0.6 and every
gamed case at least 0.3 below it; accuracy, format and Countdown are checks, and a gamed completion
must just never score as high as an honest, correct one.
"""

import math

import pytest

from demo import REWARDS as DEMO_REWARDS, THINKING as DEMO_THINKING
from nanopost.rewards import accuracy_reward, combine_rewards, format_reward, sample_reward, thinking_reward
from nanopost.tasks.countdown import countdown_reward

QUESTION, ANSWER = "3 + 4 * 2", "11"
HONEST = "<think>4 * 2 = 8\n3 + 8 = 11</think><answer>11</answer>"
HONEST_WRONG = "<think>4 * 2 = 8\n3 + 8 = 12</think><answer>12</answer>"    # a slip in the last step

COUNTING = "<think>" + " ".join(map(str, range(40))) + "</think><answer>12</answer>"
UNRELATED = "<think>" + "\n".join(["2 + 2 = 4", "5 + 5 = 10", "6 * 7 = 42", "9 - 1 = 8", "10 / 2 = 5",
                                   "7 + 8 = 15", "12 - 4 = 8", "3 * 3 = 9", "1 + 1 = 2", "6 + 6 = 12"]
                                  ) + "</think><answer>12</answer>"
IDENTITY = "<think>12 + 0 = 12</think><answer>12</answer>"
MB = 1_000_000

# The issue's table, verbatim: (completion, whether it is the honest row).
ISSUE_TABLE = {
    "counting 0 1 2 ... 39, answer 12": (COUNTING, False),
    "ten unrelated true equations, wrong answer": (UNRELATED, False),
    "honest 4 * 2 = 8, 3 + 8 = 11, right answer": (HONEST, True),
    "12 + 0 = 12, then the wrong answer 12": (IDENTITY, False),
}

# Gamed reasoning; the answer is the wrong 12 unless the case is about the answer itself.
GAMED = {
    **{name: c for name, (c, honest) in ISSUE_TABLE.items() if not honest},
    "identity chain": "<think>3 * 1 = 3\n3 + 0 = 3\n3 - 0 = 3\n3 / 1 = 3\n12 * 1 = 12</think><answer>12</answer>",
    "tautology x = x": "<think>12 = 12\n11 = 11\n3 = 3</think><answer>12</answer>",
    "tautology with operators": "<think>3 + 4 * 2 = 3 + 4 * 2\n8 + 4 = 4 + 8</think><answer>12</answer>",
    "ungrounded true steps ending at the answer": "<think>5 + 7 = 12</think><answer>12</answer>",
    "question numbers over-used": "<think>3 + 4 + 2 + 3 = 12</think><answer>12</answer>",
    "counting with the right answer": COUNTING.replace("12</answer>", "11</answer>"),
    "filler": "<think>Let me think about this very carefully. Hmm, okay. Well, I need to be really careful "
              "here, so let me think again, basically, about the question.</think><answer>12</answer>",
    "filler repeated": "<think>" + "Let me think step by step. " * 50 + "</think><answer>12</answer>",
    "question restated": "<think>3 + 4 * 2. The question is 3 + 4 * 2.</think><answer>12</answer>",
    "answer repeated": "<think>12 12 12 12 12 the answer is 12, 12</think><answer>12</answer>",
    "an ungrounded step repeated": "<think>" + "5 + 7 = 12\n" * 30 + "</think><answer>12</answer>",
    "nested think tags": "<think><think>4 * 2 = 8\n3 + 8 = 11</think></think><answer>11</answer>",
    "duplicated think blocks": "<think>4 * 2 = 8</think><think>3 + 8 = 11</think><answer>11</answer>",
    "unclosed think": "<think>4 * 2 = 8\n3 + 8 = 11<answer>11</answer>",
    "reasoning copied into the answer": "<think>4 * 2 = 8\n3 + 8 = 11</think><answer>4 * 2 = 8\n3 + 8 = 11"
                                        "</answer>",
    "huge numbers": "<think>" + "9" * 40 + " + 1 = 1" + "0" * 40 + "</think><answer>12</answer>",
    "unicode digits": "<think>１２ + ０ = １２\n٤ × ٢ = ٨</think><answer>12</answer>",
    "very long": "<think>" + "4 * 2 = 8, 3 + 8 = 11, " * 20_000 + "</think><answer>11</answer>",
    "1 MB of words": "<think>" + "word " * (MB // 5) + "</think><answer>12</answer>",
}

DEFAULTS = {}                                             # thinking_reward's own defaults
DEMO = DEMO_THINKING                                      # the demo's thinking options (scripts/demo.py)
DEMO_WEIGHTS = DEMO_REWARDS
# What the demo used before: free text may pay half, from 4 tokens on. Still not gameable.
LOOSE = {"min_tokens": 4, "arithmetic_weight": 0.5}


def _thinking(completion, options):
    return thinking_reward(completion, question=QUESTION, **options)


def _combined(completion, options):
    """The demo's reward: accuracy + 0.1 format + 0.1 thinking, as combine_rewards adds them (max 1.2)."""
    funcs = [(name, sample_reward(name, **(options if name == "thinking" else {})), w)
             for name, w in DEMO_WEIGHTS.items()]
    total, _ = combine_rewards([completion], [{"prompt": QUESTION, "answer": ANSWER}], funcs)
    return total[0]


# ------------------------------------------------------------------------------------ the issue's table

@pytest.mark.parametrize("options", [DEFAULTS, DEMO, LOOSE], ids=["defaults", "demo", "loose"])
@pytest.mark.parametrize("row", list(ISSUE_TABLE))
def test_the_issue_table_re_measured(row, options):
    completion, honest = ISSUE_TABLE[row]
    score, best = _thinking(completion, options), _thinking(HONEST, options)
    if honest:
        assert score >= 0.6                      # a two-step solution is complete, not "too short"
    else:
        assert score <= best - 0.3


# -------------------------------------------------------------------------------------------- thinking

@pytest.mark.parametrize("options", [DEFAULTS, DEMO, LOOSE], ids=["defaults", "demo", "loose"])
def test_thinking_orders_honest_above_wrong(options):
    assert _thinking(HONEST, options) >= 0.6
    assert _thinking(HONEST, options) > _thinking(HONEST_WRONG, options)


@pytest.mark.parametrize("options", [DEFAULTS, DEMO, LOOSE], ids=["defaults", "demo", "loose"])
@pytest.mark.parametrize("case", list(GAMED))
def test_thinking_pays_gamed_reasoning_less_than_honest_work(case, options):
    gamed = _thinking(GAMED[case], options)
    assert math.isfinite(gamed)
    assert gamed < _thinking(HONEST_WRONG, options)
    assert gamed <= _thinking(HONEST, options) - 0.3


@pytest.mark.parametrize("options", [DEFAULTS, DEMO, LOOSE], ids=["defaults", "demo", "loose"])
def test_thinking_pays_no_more_for_repeated_steps_and_not_for_stopping_half_way(options):
    once = "<think>4 * 2 = 8\n3 + 8 = 11</think><answer>11</answer>"
    again = "<think>" + "4 * 2 = 8\n" * 20 + "3 + 8 = 11\n" * 20 + "</think><answer>11</answer>"
    assert _thinking(again, options) == _thinking(once, options)
    half_way = "<think>4 * 2 = 8</think><answer>8</answer>"      # true, grounded, ends at its answer
    assert _thinking(half_way, options) <= _thinking(HONEST, options) - 0.3


def test_thinking_pays_a_word_problem_grounded_in_its_number_words():
    question = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
    honest = "<think>In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 in all.</think><answer>72</answer>"
    made_up = "<think>In May she sold 50 / 2 = 25 clips, so 47 + 25 = 72 in all.</think><answer>72</answer>"
    assert thinking_reward(honest, question=question) == 1.0
    assert thinking_reward(made_up, question=question) <= 0.3


def test_thinking_checks_coverage_of_the_tasks_own_steps():
    record = {"prompt": "Compute 37 + 48 - 19.", "answer": "66", "reasoning": "37 + 48 = 85\n85 - 19 = 66"}
    honest = "<think>37 + 48 = 85\n85 - 19 = 66</think><answer>66</answer>"
    shortcut = "<think>48 - 19 = 29</think><answer>29</answer>"   # true and grounded, but not the solution
    with_steps = sample_reward("thinking", reference_steps=True)
    assert with_steps(honest, record) == 1.0
    assert with_steps(shortcut, record) <= with_steps(honest, record) - 0.3
    assert with_steps(shortcut, record) < sample_reward("thinking")(shortcut, record)


@pytest.mark.parametrize("options", [DEFAULTS, DEMO, LOOSE], ids=["defaults", "demo", "loose"])
def test_free_text_cannot_be_maxed_by_counting_filler_repetition_or_copying(options):
    question = "Which is heavier, a kilogram of iron or a kilogram of feathers?"
    honest = ("<think>Both weigh one kilogram: mass does not depend on the material, feathers only take "
              "more room because their density is lower.</think><answer>neither</answer>")
    gamed = [
        "<think>" + " ".join(map(str, range(200))) + "</think><answer>neither</answer>",
        "<think>" + "Hmm, let me think very carefully about this. " * 20 + "</think><answer>neither</answer>",
        "<think>" + "mass density material " * 40 + "</think><answer>neither</answer>",
        f"<think>{question} {question}</think><answer>neither</answer>",
        "<think>neither neither neither, the answer is neither</think><answer>neither</answer>",
    ]
    best = thinking_reward(honest, question=question, **options)
    assert best >= 0.6 * (1 - options.get("arithmetic_weight", 0.0))
    for completion in gamed:
        assert thinking_reward(completion, question=question, **options) <= best - 0.3 * (
            1 - options.get("arithmetic_weight", 0.0)), completion


# ----------------------------------------------------------------------------- combined (the demo's)

@pytest.mark.parametrize("options", [DEFAULTS, DEMO, LOOSE], ids=["defaults", "demo", "loose"])
@pytest.mark.parametrize("case", list(GAMED))
def test_combined_reward_orders_honest_correct_over_wrong_over_gamed(case, options):
    best, wrong, gamed = (_combined(c, options) for c in (HONEST, HONEST_WRONG, GAMED[case]))
    assert best >= 0.6 and best > wrong
    if "11</answer>" in GAMED[case]:
        # The right answer with gamed reasoning: accuracy dominates by design (weight 1 of 1.2), so
        # the thinking reward can only keep it below honest work, not 0.3 below.
        assert gamed < best
    else:
        assert gamed < wrong and gamed <= best - 0.3


# -------------------------------------------------------------------------------------------- accuracy

ACCURACY_GAMED = {
    "answer outside the tags": "<think>4 * 2 = 8</think><answer>12</answer> 11",
    "answer before the tags": "11 <answer>12</answer>",
    "boxed outside the tags": "\\boxed{11} <answer>12</answer>",
    "a list of candidates": "<answer>10, 11, 12</answer>",
    "candidates without commas": "<answer>10 11 12</answer>",
    "either or": "<answer>11 or 12</answer>",
    "a chain of answers": "<answer>x = 11 = 12</answer>",
    "unclosed answer tag": "<answer>11",
    "empty answer, then text": "<answer></answer> the answer is 11",
    "answer in the think block only": "<think>the answer is 11</think><answer>12</answer>",
    "huge number": "<answer>" + "1" * 5000 + "</answer>",
    "11 with many digits": "<answer>11" + "0" * 100 + "</answer>",
    "unicode digits of another number": "<answer>١٢</answer>",
    "1 MB before the answer": "x" * MB + "<answer>12</answer>",
    "1 MB after a marker": "the answer is 11\n" + "x" * MB,
}


@pytest.mark.parametrize("case", list(ACCURACY_GAMED))
def test_accuracy_does_not_pay_gamed_answers(case):
    assert accuracy_reward(HONEST, ANSWER) == 1.0 and accuracy_reward(HONEST_WRONG, ANSWER) == 0.0
    assert accuracy_reward(ACCURACY_GAMED[case], ANSWER) == 0.0


@pytest.mark.parametrize("documented", ["<answer>11</answer>", "\\boxed{11}", "#### 11", "A: 11",
                                        "so the answer is 11.", "<answer>１１</answer>"])
def test_accuracy_still_pays_the_documented_answer_forms(documented):
    assert accuracy_reward(documented, ANSWER) == 1.0


# ---------------------------------------------------------------------------------------------- format

FORMAT_GAMED = {
    "nested think": "<think><think>r</think></think><answer>11</answer>",
    "nested answer": "<think>r</think><answer><answer>11</answer></answer>",
    "duplicated think": "<think>r</think><think>r</think><answer>11</answer>",
    "duplicated answer": "<think>r</think><answer>11</answer><answer>12</answer>",
    "unclosed think": "<think>r<answer>11</answer>",
    "unclosed answer": "<think>r</think><answer>11",
    "answer outside the tags": "<think>r</think> 11",
    "text after the answer": "<think>r</think><answer>11</answer> 12",
    "answer before the think": "<answer>11</answer><think>r</think>",
    "empty think": "<think> </think><answer>11</answer>",
    "1 MB after the answer": "<think>r</think><answer>11</answer>" + "x" * MB,
}


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("case", list(FORMAT_GAMED))
def test_format_pays_only_the_exact_format(case, partial):
    best = format_reward(HONEST, partial=partial)
    assert best == 1.0 and format_reward(HONEST_WRONG, partial=partial) == 1.0  # form, not correctness
    assert format_reward(FORMAT_GAMED[case], partial=partial) < best


# ------------------------------------------------------------------------------------------- countdown

NUMBERS, TARGET = [44, 19, 35, 5], 175
COUNTDOWN_GAMED = {
    "the target alone": "<answer>175</answer>",
    "the target as an equation": "<answer>175 = 175</answer>",
    "a no-op added": "<answer>(44 - 19) * 35 / 5 + 0</answer>",
    "a number used twice": "<answer>(44 - 19) * 35 / 5 * 5 / 5</answer>",
    "a number not given": "<answer>(44 - 19) * 7</answer>",
    "a wrong claimed value": "<answer>44 + 19 + 35 + 5 = 175</answer>",
    "the expression outside the tags": "<answer>175</answer> (44 - 19) * 35 / 5",
    "candidates": "<answer>(44 - 19) * 35 / 5, 44 + 19</answer>",
    "power": "<answer>(44 - 19) ** 1 * 35 / 5</answer>",
    "unicode digits": "<answer>(４４ - １９) * ３５ / ５</answer>",
    "huge literal": "<answer>" + "9" * 5000 + "</answer>",
    "1 MB of parentheses": "<answer>" + "(" * (MB // 2) + "</answer>",
}


@pytest.mark.parametrize("case", list(COUNTDOWN_GAMED))
def test_countdown_pays_only_a_valid_expression(case):
    honest, wrong = "<answer>(44 - 19) * 35 / 5</answer>", "<answer>44 + 19 + 35 + 5</answer>"
    assert countdown_reward(honest, NUMBERS, TARGET) == 1.0
    assert countdown_reward(wrong, NUMBERS, TARGET) == 0.0
    assert countdown_reward(COUNTDOWN_GAMED[case], NUMBERS, TARGET) == 0.0


# -------------------------------------------------------------------------------------- huge inputs

HUGE = ["9" * MB, "<think>" + "1 + 1 = 2\n" * (MB // 10) + "</think><answer>2</answer>",
        "<think>" + "(" * MB + "</think>", "<answer>" * (MB // 8), "٣" * MB]


@pytest.mark.parametrize("index", range(len(HUGE)))
def test_every_reward_is_finite_on_huge_inputs(index):
    text = HUGE[index]
    values = [accuracy_reward(text, ANSWER), format_reward(text), format_reward(text, partial=True),
              countdown_reward(text, NUMBERS, TARGET), _thinking(text, DEFAULTS), _thinking(text, DEMO),
              _combined(text, DEMO)]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_every_worked_solution_of_the_tasks_scores_full_marks(task):
    """The tasks' own reference steps are honest work, zeros, ones and repeated steps included."""
    from nanopost.prompts import PromptTemplate
    from nanopost.tasks import get_task

    template = PromptTemplate(instruction="Solve it.")
    for r in get_task(task).make_split(1000, seed=1):
        completion = template.target(r["reasoning"], r["answer"])
        assert thinking_reward(completion, question=r["prompt"]) == 1.0, r
        assert sample_reward("thinking", reference_steps=True)(completion, r) == 1.0, r
