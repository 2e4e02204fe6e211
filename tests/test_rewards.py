"""Rule rewards: positives, negatives and the known exploits for each, plus robustness."""

import math
import random
import time

import pytest

from nanopost.rewards import (_equations, accuracy_reward, answers_match, combine_rewards, extract_answer,
                              format_reward, parse_number, sample_reward, thinking_reward)
from nanopost.tasks.countdown import countdown_reward

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
            "in May. How many clips did Natalia sell altogether in April and May?")
REASONING = ("In April she sold 48 clips. May was half of April, so in May she sold 48 / 2 = 24 clips. "
             "Adding both months gives the total: 48 + 24 = 72 clips. That total counts every clip "
             "from the two months together, which is what the question asks for, and the halving "
             "checks out because twice 24 is 48 again.")
GOOD = f"<think>\n{REASONING}\n</think>\n<answer>72</answer>"


# ------------------------------------------------------------------------------------ extract_answer

@pytest.mark.parametrize("text, answer", [
    ("<think>x</think><answer>18</answer>", "18"),
    ("<answer>\n 18 \n</answer>", "18"),
    ("<answer>\\boxed{18}</answer>", "18"),                           # box inside the tag unwrapped
    ("so \\boxed{\\frac{3}{4}} in the end", "\\frac{3}{4}"),          # nested braces
    ("\\boxed{ {a} + {b} }", "{a} + {b}"),
    ("\\boxed {7}", "7"),
    ("Natalia sold 72 clips.\n#### 72", "72"),
    ("#### 1,000\n", "1,000"),
    ("So the answer is 18. Let me check it once more.", "18"),
    ("The final answer is: $18$.", "$18$"),
    ("THE ANSWER IS 1,234.5", "1,234.5"),
    ("Q: how many?\nA: 18", "18"),
    ("Answer: 42", "42"),
    ("Final Answer: x = 3", "x = 3"),
])
def test_extract_answer_finds_each_kind(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text, answer", [
    ("\\boxed{5} and then <answer>7</answer>", "7"),              # tag beats box
    ("#### 5\n\\boxed{7}", "7"),                                  # box beats ####
    ("The answer is 5\n#### 7", "7"),                             # #### beats "answer is"
    ("A: we add them. The answer is 7.", "7"),                    # "answer is" beats "A:"
    ("A: 5\nso the answer is 7", "7"),
])
def test_extract_answer_follows_the_priority_order(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text, answer", [
    ("<answer>5</answer> no wait <answer>7</answer>", "7"),
    ("\\boxed{5} hmm \\boxed{7}", "7"),
    ("#### 5\n#### 7", "7"),
    ("the answer is 5; actually the answer is 7", "7"),
    ("A: 5\nA: 7", "7"),
])
def test_extract_answer_takes_the_last_occurrence(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text", [
    "", "no answer here", "<answer>  </answer>", "<answer>18", "18</answer>", "\\boxed{18",
    "\\boxed 18", "####", "the answer is", None, 18,
])
def test_extract_answer_returns_none_without_a_complete_answer(text):
    assert extract_answer(text) is None


def test_extract_answer_ignores_an_unclosed_last_box_and_falls_back():
    assert extract_answer("\\boxed{5} then \\boxed{7\n#### 9") == "9"


def test_extract_answer_uses_custom_answer_tags():
    assert extract_answer("[ANS]12[/ANS]", answer_tags=("[ANS]", "[/ANS]")) == "12"


def test_extract_answer_reads_written_markers_only_near_the_end():
    assert extract_answer("the answer is 5\n" + "x" * 30_000) is None
    assert extract_answer("x" * 30_000 + "\nthe answer is 5") == "5"
    assert extract_answer("<answer>5</answer>" + "x" * 30_000) == "5"


# ------------------------------------------------------------------------------------- answers_match

@pytest.mark.parametrize("pred, gold", [
    ("18", "18"), ("18", "18.0"), ("18", "$18"), ("18", "18.00"), ("$18.00", "18"), ("\\$18", "18"),
    ("1,000", "1000"), ("1,000,000", "1000000"), ("1,234.5", "1234.50"),
    ("3/4", "0.75"), ("\\frac{3}{4}", "0.75"), ("\\dfrac{6}{8}", "3/4"), ("-3/4", "-0.75"),
    ("-5", "−5"), ("−5", "-5.0"), ("-$5", "-5"), ("$-5", "-5"),
    ("50%", "50"), ("50\\%", "50"), ("50 percent", "50"), ("90°", "90"), ("90^\\circ", "90"),
    ("18 dollars", "18"), ("18 cm", "18"), ("18 \\text{ apples}", "18"),
    ("x = 18", "18"), ("$18$", "18"), ("\\(18\\)", "18"), ("**18**", "18"), ("\\boxed{18}", "18"),
    ("$\\boxed{18}$.", "18"), ("18.", "18"), (" 18 ", "18"), ("+18", "18"), (".5", "0.5"),
    ("１８", "18"),                                                    # full-width digits
    ("18", 18), ("18", 18.0), ("0.1", 0.1),
    ("Paris", "paris"), ("  New   York ", "new york"), ("Paris.", "paris"), ("(B)", "b"),
    ("\\text{Paris}", "Paris"), ('"yes"', "yes"),
])
def test_answers_match_equivalent_forms(pred, gold):
    assert answers_match(pred, gold)
    assert answers_match(gold, pred) or not isinstance(gold, str)


@pytest.mark.parametrize("pred, gold", [
    ("18", "180"), ("180", "18"), ("1.5", "15"), ("15", "1.5"), ("18", "-18"), ("18", "18.5"),
    ("0.75", "3/5"), ("1,00", "100"), ("1,0000", "10000"), ("50%", "0.5"), ("5 thousand", "5"),
    ("5 million", "5"), ("3/0", "0"), ("18 or 19", "18"), ("18", "eighteen"), ("1e2", "100"),
    ("1 1/2", "1.5"), ("Paris", "London"), ("", ""), ("  ", "  "), (None, "18"), ("18", None),
    ("18 apples and 3 pears", "18"), ("0.333", "1/3"), ("2 pi", "2"), ("2\\pi", "2"), ("18x", "18"),
    ("\\boxed{1} + \\boxed{2}", "1"), ("\\boxed{1} + {2}", "1"),
])
def test_answers_match_rejects_near_misses(pred, gold):
    assert not answers_match(pred, gold)


def test_parse_number_is_exact():
    assert parse_number("0.1") * 3 == parse_number("0.3")
    assert parse_number("1/3") * 3 == 1
    assert parse_number("not a number") is None
    assert parse_number("9" * 100) is None           # too long to be compared numerically


# -------------------------------------------------------------------------------------- accuracy

def test_accuracy_reward_pays_for_the_right_answer_only():
    assert accuracy_reward(GOOD, "72") == 1.0
    assert accuracy_reward(GOOD, 72) == 1.0
    assert accuracy_reward(GOOD, "72.0") == 1.0
    assert accuracy_reward(GOOD, "720") == 0.0
    assert accuracy_reward("<think>72</think>", "72") == 0.0         # no answer given
    assert accuracy_reward("#### 72", "72") == 1.0


def test_accuracy_reward_of_huge_integer_gold_is_zero_not_an_error():
    assert accuracy_reward("<answer>1</answer>", 10 ** 5000) == 0.0


# ---------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("completion", [
    "<think>reasoning</think><answer>18</answer>",
    "<think>\nreasoning\n</think>\n<answer>\n18\n</answer>\n",
    "  \n<think>multi\nline\nreasoning</think>\n\n<answer>18</answer>  \n",
])
def test_format_reward_accepts_one_think_then_one_answer(completion):
    assert format_reward(completion) == 1.0


@pytest.mark.parametrize("completion", [
    "<think>r</think><answer>18</answer> trailing junk",                       # text after </answer>
    "<think>r</think>\n<answer>18</answer>\nTRAILING <answer>42</answer>",
    "<think>a</think><think>b</think><answer>18</answer>",                      # duplicate think
    "<think>a</think><answer>1</answer><answer>2</answer>",                     # duplicate answer
    "<think>a</think><answer>1</answer><think>b</think><answer>2</answer>",
    "<think>a<think>b</think><answer>18</answer>",                              # unbalanced tags
    "<think>a</think></think><answer>18</answer>",
    "<think>a</think><answer>18</answer></answer>",
    "<think>a</think><answer>18",                                               # truncated
    "<think>a<answer>18</answer></think>",                                      # answer inside think
    "<answer>18</answer><think>a</think>",                                      # wrong order
    "<think> </think><answer>18</answer>",                                      # empty reasoning
    "<think>a</think><answer>\n</answer>",                                      # empty answer
    "Sure! <think>a</think><answer>18</answer>",                                # text before think
    "<think>a</think> so it is <answer>18</answer>",                            # text between
    "<answer>18</answer>", "<think>a</think>", "18", "",
    "</think>a<think><answer>18</answer>",
])
def test_format_reward_rejects_exploits_and_malformed_output(completion):
    assert format_reward(completion) == 0.0


def test_format_reward_option_for_a_prompt_that_opened_the_think_block():
    assert format_reward("reasoning</think><answer>18</answer>", prompt_opens_think=True) == 1.0
    assert format_reward("<think>reasoning</think><answer>18</answer>", prompt_opens_think=True) == 0.0
    assert format_reward("reasoning</think><answer>18</answer>") == 0.0


@pytest.mark.parametrize("completion, credit", [
    ("<think>r</think><answer>18</answer>", 1.0),
    ("<think>r</think><answer>18</answer> junk", 0.75),                # ordered, but trailing text
    ("<think>r</think> words <answer>18</answer>", 0.5),               # both blocks, text between
    ("<answer>18</answer><think>r</think>", 0.5),
    ("<answer>18</answer>", 0.25),                                     # answer alone
    ("<think>r</think>", 0.25),
    ("<think>a</think><think>b</think><answer>18</answer>", 0.25),     # duplicate think block
    ("no tags", 0.0),
])
def test_format_reward_partial_credit(completion, credit):
    assert format_reward(completion, partial=True) == credit


def test_format_reward_custom_tags():
    text = "<reasoning>r</reasoning><final>18</final>"
    assert format_reward(text) == 0.0
    assert format_reward(text, think_tags=("<reasoning>", "</reasoning>"),
                         answer_tags=("<final>", "</final>")) == 1.0


# -------------------------------------------------------------------------------------- thinking

def test_thinking_reward_pays_for_real_reasoning():
    assert thinking_reward(GOOD, question=QUESTION) > 0.8


@pytest.mark.parametrize("completion", [
    "<think></think><answer>72</answer>",
    "<think>   \n </think><answer>72</answer>",
    "<answer>72</answer>",
    "72",
    "",
    f"<think>{REASONING}",                                                     # never closed
    f"<think>{REASONING}</think><think>{REASONING}</think><answer>72</answer>",  # duplicate blocks
    f"<think>{REASONING}<think></think><answer>72</answer>",
])
def test_thinking_reward_is_zero_without_one_reasoning_block(completion):
    assert thinking_reward(completion) == 0.0


@pytest.mark.parametrize("markers", [
    "First, Second, Next, Finally,",
    "Step 1: Step 2: Step 3: Finally,",
    "1.\n2.\n3.\n- \n* \n• ",
    "Let's think step by step. First, ... Then, ... So, ... Therefore, ... Hmm. Wait.",
])
def test_thinking_reward_gives_nothing_for_marker_words(markers):
    assert thinking_reward(f"<think>{markers}</think><answer>72</answer>") == 0.0


def test_adding_marker_words_never_raises_the_thinking_reward():
    plain = "she sold 48 clips in april and 24 in may which makes 72 clips"
    marked = "First, she sold 48 clips in april. Second, 24 in may. Finally, which makes 72 clips"
    assert (thinking_reward(f"<think>{marked}</think><answer>72</answer>")
            <= thinking_reward(f"<think>{plain}</think><answer>72</answer>") + 1e-9)


def test_thinking_reward_penalises_repetition():
    looped = "<think>" + "she sold 48 clips so " * 60 + "</think><answer>72</answer>"
    assert thinking_reward(looped) < 0.1


def test_thinking_reward_is_zero_when_the_reasoning_restates_the_question():
    assert thinking_reward(f"<think>{QUESTION}</think><answer>72</answer>", question=QUESTION) == 0.0
    reworded = QUESTION.replace("Natalia", "She").replace("altogether", "in total")
    assert thinking_reward(f"<think>{reworded}</think><answer>72</answer>", question=QUESTION) < 0.3


def test_thinking_reward_is_zero_when_the_reasoning_is_copied_into_the_answer():
    assert thinking_reward(f"<think>{REASONING}</think><answer>{REASONING}</answer>") == 0.0
    assert thinking_reward(f"<think>{REASONING}</think><answer>72</answer>\n{REASONING}") == 0.0


def test_thinking_reward_ramps_up_to_the_window_and_never_rises_past_it():
    words = [f"w{i}" for i in range(400)]   # all distinct: only length matters
    scores = [thinking_reward(f"<think>{' '.join(words[:n])}</think><answer>1</answer>",
                              min_tokens=20, max_tokens=100, overlong_tokens=100)
              for n in range(1, 400)]
    assert scores[9] == pytest.approx(10 / 20)
    assert all(s == 1.0 for s in scores[19:100])
    assert all(a >= b for a, b in zip(scores[19:], scores[20:]))
    assert scores[149] == pytest.approx(0.5)
    assert all(s == 0.0 for s in scores[199:])          # over-long reasoning earns nothing


def test_thinking_reward_counts_tokens_with_the_given_tokenizer():
    text = "<think>abcdefghij klmnopqrst</think><answer>1</answer>"
    assert thinking_reward(text, min_tokens=20) == pytest.approx(2 / 20)
    assert thinking_reward(text, min_tokens=20, tokenize=list) == 1.0    # 21 characters as tokens


def test_thinking_reward_option_for_a_prompt_that_opened_the_think_block():
    assert thinking_reward(f"{REASONING}</think><answer>72</answer>", prompt_opens_think=True) > 0.8


def test_thinking_reward_arithmetic_part_prefers_correct_steps():
    right = "<think>" + REASONING + "</think><answer>72</answer>"
    wrong = "<think>" + REASONING.replace("48 + 24 = 72", "48 + 24 = 70") + "</think><answer>72</answer>"
    none = "<think>" + " ".join(f"w{i}" for i in range(60)) + "</think><answer>72</answer>"
    scores = [thinking_reward(t, question=QUESTION, arithmetic_weight=0.5) for t in (right, wrong, none)]
    assert scores[0] == 1.0 and scores[0] > scores[1]
    assert scores[2] == pytest.approx(0.5)        # no equations: free text pays at most 1 - w
    assert thinking_reward(none, arithmetic_weight=1.0) == 0.0


# ------------------------------------------------------------------------------ arithmetic steps

def true_share(text):
    """Share of the equations thinking_reward finds in `text` that are true; None if it finds none."""
    steps = _equations(text)
    return sum(step[0] for step in steps) / len(steps) if steps else None


@pytest.mark.parametrize("text, score", [
    ("48 / 2 = 24", 1.0),
    ("48 / 2 = 25", 0.0),
    ("48 + 24 = 72 and 48 / 2 = 25", 0.5),
    ("So 3 + 4 = 7, 7 * 2 = 14.", 1.0),                  # clauses separated by ", "
    ("x = 3 + 4 = 7", 1.0),                              # chain
    ("3 + 4 = 7 = 8", 0.0),                              # a chain is true only if every side agrees
    ("1,000 + 500 = 1,500", 1.0),                        # thousands separators
    ("6 × 7 = 42 and 42 ÷ 6 = 7 and 10 − 3 = 7", 1.0),   # unicode operators
    ("$3 + $4 = $7", 1.0),
    ("1 / 3 + 1 / 6 = 0.5", 1.0),                        # exact rationals
    ("0.1 + 0.2 = 0.3", 1.0),
    ("Step 1. 2 * 3 = 6", 1.0),                          # a list number before the equation
    ("(2 + 3) * 4 = 20", 1.0),
])
def test_each_equation_is_checked(text, score):
    assert true_share(text) == score


@pytest.mark.parametrize("text", [
    "no equations here", "x = 5", "5 = 5", "a = b", "2**10 = 1024", "9**9**9 = 1", "1 / 0 = 1", "",
    "the ratio 3:4 = 0.75",
])
def test_no_checkable_equation_is_found(text):
    assert _equations(text) == []


def test_the_final_answer_must_follow_from_the_last_step():
    text = "48 / 2 = 24 and 48 + 24 = 72"
    assert _equations(text)[-1][2] == 72
    think = f"<think>{text}</think><answer>{{}}</answer>"
    assert thinking_reward(think.format("72")) == 1.0
    assert thinking_reward(think.format("$72.00")) == 1.0
    assert thinking_reward(think.format("24")) == 0.25            # an intermediate value is not the answer
    assert thinking_reward("<think>48 + 24 = 70</think><answer>70</answer>") == 0.0  # a false step pays nothing


# ------------------------------------------------------------------------------------- combining

def _const(values):
    it = iter(values)
    return lambda completion, sample: next(it)


def test_combine_sum_weights_each_function_and_treats_none_as_zero():
    total, per = combine_rewards(["a", "b", "c"], [{}, {}, {}],
                                 [("x", _const([1.0, 0.0, None]), 2.0), ("y", _const([0.5, 0.5, 1.0]), 1.0)])
    assert total == [2.5, 0.5, 1.0]
    assert per == {"x": [1.0, 0.0, None], "y": [0.5, 0.5, 1.0]}


def test_combine_normalize_each_standardises_within_groups():
    # group 1: x = [1, 0, 0, 1] has mean 0.5 and unbiased std sqrt(1/3); group 2 is all equal: 0
    total, per = combine_rewards(["c"] * 8, [{}] * 2,
                                 [("x", _const([1, 0, 0, 1, 1, 1, 1, 1]), 1.0)],
                                 group_size=4, mode="normalize_each", eps=0.0)
    z = 0.5 / math.sqrt(1 / 3)
    assert total == pytest.approx([z, -z, -z, z, 0, 0, 0, 0])
    assert per["x"] == [1, 0, 0, 1, 1, 1, 1, 1]          # raw values are what gets logged


def test_combine_normalize_each_keeps_a_weak_signal_from_being_drowned():
    strong, weak = [1.0, 0.0, 1.0, 0.0], [0.01, 0.0, 0.0, 0.01]   # weak prefers completions 0 and 3
    funcs = lambda: [("strong", _const(strong), 1.0), ("weak", _const(weak), 1.0)]
    summed, _ = combine_rewards(["c"] * 4, [{}], funcs(), group_size=4)
    each, _ = combine_rewards(["c"] * 4, [{}], funcs(), group_size=4, mode="normalize_each")
    assert summed[0] - summed[2] == pytest.approx(0.01)     # the weak reward barely moves the sum
    assert each[0] - each[2] > 1.0                          # normalised, it counts as much as the strong one
    assert each[0] > each[2] > each[1] and each[0] > each[3] > each[1]


def test_combine_normalize_each_ignores_none_and_lone_values():
    total, _ = combine_rewards(["c"] * 4, [{}] * 4, [("x", _const([1.0, None, 0.0, None]), 1.0)],
                               group_size=2, mode="normalize_each")
    assert total == [0.0, 0.0, 0.0, 0.0]                   # one value per group: nothing to compare


def test_combine_passes_each_completion_its_sample():
    seen = []
    combine_rewards(["a", "b", "c", "d"], [{"id": 0}, {"id": 1}],
                    [("x", lambda c, s: seen.append((c, s["id"])) or 0.0, 1.0)], group_size=2)
    assert seen == [("a", 0), ("b", 0), ("c", 1), ("d", 1)]


@pytest.mark.parametrize("kwargs, message", [
    ({"completions": ["a", "b", "c"], "samples": [{}] * 3, "group_size": 2}, "groups of 2"),
    ({"completions": ["a", "b"], "samples": [{}] * 3}, "3 samples for 2 completions"),
    ({"completions": ["a"], "samples": [{}], "mode": "gdpo"}, "mode"),
    ({"completions": ["a"], "samples": [{}], "funcs": [("x", lambda c, s: 1.0, 1.0)] * 2}, "unique"),
    ({"completions": ["a"], "samples": [{}], "funcs": [("x", lambda c, s: math.nan, 1.0)]}, "'x' returned nan"),
    ({"completions": ["a"], "samples": [{}], "funcs": [("x", lambda c, s: "1", 1.0)]}, "'x' returned '1'"),
])
def test_combine_rejects_bad_input_with_a_clear_message(kwargs, message):
    kwargs.setdefault("funcs", [("x", lambda c, s: 1.0, 1.0)])
    with pytest.raises(ValueError, match=message):
        combine_rewards(**kwargs)


def test_sample_rewards_read_their_fields_from_the_sample():
    accuracy, fmt = sample_reward("accuracy"), sample_reward("format", partial=True)
    thinking = sample_reward("thinking")
    assert accuracy(GOOD, {"answer": "72"}) == 1.0
    assert accuracy(GOOD, {}) is None
    assert fmt("<answer>1</answer>", {}) == 0.25
    assert thinking(f"<think>{QUESTION}</think><answer>72</answer>", {"question": QUESTION}) == 0.0
    total, per = combine_rewards([GOOD], [{"answer": "72"}], [("accuracy", accuracy, 1.0),
                                                             ("format", fmt, 0.5)])
    assert total == [1.5] and per == {"accuracy": [1.0], "format": [1.0]}


def test_sample_reward_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown reward"):
        sample_reward("length")
    with pytest.raises(ValueError, match="unknown reward"):  # the Countdown task's check is the task's
        sample_reward("countdown")
    with pytest.raises(TypeError, match="no options"):
        sample_reward("accuracy", partial=True)


# ------------------------------------------------------------------------------------ robustness

REWARDS = {  # name -> (fn of one string, lowest value, highest value)
    "accuracy": (lambda s: accuracy_reward(s, "18"), 0.0, 1.0),
    "format": (format_reward, 0.0, 1.0),
    "format_partial": (lambda s: format_reward(s, partial=True), 0.0, 1.0),
    "format_opened": (lambda s: format_reward(s, prompt_opens_think=True), 0.0, 1.0),
    "thinking": (lambda s: thinking_reward(s, question=s, arithmetic_weight=0.5), 0.0, 1.0),
    "thinking_opened": (lambda s: thinking_reward(s, prompt_opens_think=True), 0.0, 1.0),
    "equations": (lambda s: true_share(s) or 0.0, 0.0, 1.0),
    "countdown": (lambda s: countdown_reward(s, [44, 19, 35, 5], 175), 0.0, 1.0),
    "match": (lambda s: float(answers_match(s, s)), 0.0, 1.0),
    "extract": (lambda s: float(extract_answer(s) is not None), 0.0, 1.0),
}

MB = 1_000_000
ADVERSARIAL = {
    "1MB letters": "a" * MB,
    "1MB spaces": " " * MB,
    "1MB newlines": "\n" * MB,
    "1MB words": "word " * (MB // 5),
    "deep parens": "(" * 100_000,
    "deep parens in answer": "<answer>" + "(" * 100_000 + "</answer>",
    "balanced deep parens": "<answer>" + "(" * 50_000 + "1" + ")" * 50_000 + "</answer>",
    "power tower": "<think>9**9**9 = 1</think><answer>9**9**9</answer>",
    "huge exponent": "<answer>1e999999</answer> the answer is 1e999999",
    "huge integer": "<answer>" + "9" * 5001 + "</answer>",
    "huge integer equation": "<think>" + "9" * 5001 + " + 1 = " + "1" + "0" * 5001 + "</think>",
    "unclosed boxes": "\\boxed{" * 150_000,
    "unbalanced tags": "<think>" * 50_000 + "</answer>" * 50_000,
    "tag soup": "<think></think><answer></answer>" * 30_000,
    "many answers": "<answer>18</answer>" * 50_000,
    "many markers": "#### 1\nthe answer is 2\nA: 3\n" * 30_000,
    "many equations": "1 + 1 = 2, " * 100_000,
    "equation run": "1=1 " * 250_000,
    "long think": "<think>" + "reason " * 150_000 + "</think><answer>18</answer>",
    "one huge token": "<think>" + "x" * MB + "</think><answer>18</answer>",
    "repeated steps": "<think>" + "First, Second, Finally, " * 40_000 + "</think><answer>18</answer>",
    "nul and odd unicode": "<think>\x00\u202e\ufeff\U0001f600\u0301</think>\x00<answer>１８\x00</answer>",
    "surrogate-like": "<answer>\ufffd\ufffd</answer> \x00 \u2028 \u2029",
    "dollar soup": "$" * MB,
    "digits and commas": "1," * (MB // 2),
}


@pytest.mark.parametrize("name", list(REWARDS))
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_every_reward_is_finite_in_range_and_fast_on_adversarial_input(name, case):
    fn, low, high = REWARDS[name]
    text = ADVERSARIAL[case]
    best = math.inf
    for _ in range(3):  # the best of three, so a busy machine does not fail the test
        start = time.perf_counter()
        value = fn(text)
        best = min(best, time.perf_counter() - start)
        assert isinstance(value, float) and math.isfinite(value) and low <= value <= high
    assert best < 0.05, f"{name} took {best * 1e3:.0f} ms on {case}"


def _fuzz_strings(count: int, seed: int):
    rng = random.Random(seed)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "}", "####", "A:",
              "the answer is ", "First, ", "=", "+", "-", "*", "/", "**", "(", ")", "18", "1,000",
              "3/4", "−", "×", "÷", "$", "%", " ", "\n", "\x00", "9" * 50, "1e999", "."]
    for i in range(count):
        if i % 2:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))).decode("utf-8", "replace")
        else:
            yield "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))


def test_every_reward_survives_random_fuzzing():
    start = time.perf_counter()
    for text in _fuzz_strings(3000, seed=0):
        for name, (fn, low, high) in REWARDS.items():
            value = fn(text)
            assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, (name, text)
    assert time.perf_counter() - start < 10


def test_rewards_of_non_strings_are_zero():
    for value in (None, 18, b"<answer>18</answer>", ["<answer>18</answer>"]):
        assert accuracy_reward(value, "18") == 0.0
        assert format_reward(value) == 0.0
        assert thinking_reward(value) == 0.0
        assert countdown_reward(value, [1, 2], 3) == 0.0


class _BatchScorer:
    """Stands in for a model reward: one call for the whole batch, optional member scores."""

    def __init__(self, members: bool):
        self.calls, self.members = 0, members

    def score_batch(self, completions, samples):
        self.calls += 1
        scores = [float(len(c)) for c in completions]
        return (scores, {"a": scores, "b": [0.0] * len(scores)}) if self.members else scores

    def __call__(self, completion, sample):
        raise AssertionError("a batch scorer must be called once per batch")


@pytest.mark.parametrize("members", [False, True])
def test_batch_scorers_are_called_once_and_ensemble_members_logged(members):
    scorer = _BatchScorer(members)
    total, per = combine_rewards(["ab", "abcd"], [{}, {}], [("rm", scorer, 0.5)], group_size=2)
    assert scorer.calls == 1 and total == [1.0, 2.0]  # 0.5 * len
    assert per["rm"] == [2.0, 4.0]
    assert ("rm.a" in per and per["rm.b"] == [0.0, 0.0]) == members
