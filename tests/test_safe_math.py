"""safe_math: exact, bounded arithmetic on model text; and the Countdown check and reward built on it
(tasks/countdown.py: reaches_target, countdown_reward)."""

import random
import time
from fractions import Fraction

import pytest

from nanopost.plumbing.safe_math import applies_identity, evaluate, normalize_operators, safe_eval
from nanopost.tasks.countdown import countdown_reward, reaches_target


@pytest.mark.parametrize("expr, value", [
    ("1 + 2", 3),
    ("7 - 10", -3),
    ("6 * 7", 42),
    ("1 / 3", Fraction(1, 3)),
    ("1 / 3 * 3", 1),                     # exact: no float rounding
    ("0.1 + 0.2", Fraction(3, 10)),       # decimal literals read as exact decimals
    ("(44 - 19) * 35 / 5", 175),
    ("-(2 + 3)", -5),
    ("--4", 4),
    ("2 * -3", -6),
    (" 8 ", 8),
    ("1.", 1),
    (".5 * 4", 2),
    ("(" * 60 + "1" + ")" * 60, 1),       # redundant parentheses are not depth
    ("10 - 2 - 3", 5),                    # left associative
    ("100 / 10 / 5", 2),
])
def test_evaluates_arithmetic_exactly(expr, value):
    assert safe_eval(expr) == Fraction(value)


@pytest.mark.parametrize("expr, value", [
    ("3 × 4", 12), ("12 ÷ 4", 3), ("−5 + 2", -3), ("3 \\times 4", 12), ("3 \\cdot 4", 12),
    ("12 \\div 4", 3), ("3 · 4", 12),
])
def test_unicode_and_latex_operators_are_normalised(expr, value):
    assert safe_eval(expr) == value


def test_normalize_operators_maps_each_sign_to_ascii():
    assert normalize_operators("6 × 7 ÷ 2 − 1") == "6 * 7 / 2 - 1"


@pytest.mark.parametrize("expr", ["1 / 0", "1 / (2 - 2)", "0 / 0", "5 / (1 / 2 - 0.5)"])
def test_division_by_zero_is_none(expr):
    assert safe_eval(expr) is None


@pytest.mark.parametrize("expr", [
    "2 ** 3", "9**9**9", "44**19**35", "7 // 2", "7 % 2", "abs(-1)", "__import__('os').system('x')",
    "().__class__.__base__", "1e5", "1e999999", "x + 1", "1_000", "+5", "[1]", "1 if 1 else 2",
    "lambda: 1", "'a'", "1; 2", "", "   ", "08", "1j", "True", "1 2", "(1 + 2", "1 + 2)", "1 = 1",
    "1 < 2", "~1", "1 << 100", "2 & 3", "1.2.3", "\x00", "1 +\x00 2",
])
def test_rejects_everything_outside_the_grammar(expr):
    assert safe_eval(expr) is None


@pytest.mark.parametrize("expr", [
    "(" * 100000,
    "(" * 100000 + "1" + ")" * 100000,
    "(1 + " * 40 + "1" + ")" * 40,     # an expression tree deeper than MAX_DEPTH
    "-" * 40 + "1",
    "1" * 33,                          # literal longer than MAX_DIGITS
    "9" * 5000,
    "1" + " + 1" * 100,                # longer than MAX_CHARS
    "1" + "0" * 100000,
])
def test_bounds_length_depth_and_literal_size(expr):
    start = time.perf_counter()
    assert safe_eval(expr) is None
    assert time.perf_counter() - start < 0.05


def test_evaluate_returns_the_literals_in_order():
    value, literals = evaluate("(44 - 19) * 35 / 5")
    assert value == 175
    assert literals == [44, 19, 35, 5]


def _random_expression(rng: random.Random, depth: int) -> tuple[str, Fraction | None]:
    """A random expression and its value computed independently of the parser (None: divides by 0)."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(0, 99)
        return str(n), Fraction(n)
    op = rng.choice("+-*/")
    left, a = _random_expression(rng, depth - 1)
    right, b = _random_expression(rng, depth - 1)
    if a is None or b is None or (op == "/" and b == 0):
        value = None
    else:
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    return f"({left} {op} {right})", value


def test_matches_an_independent_evaluation_on_random_expressions():
    rng = random.Random(0)
    for _ in range(500):
        expr, value = _random_expression(rng, 3)
        assert safe_eval(expr) == value, expr


def test_never_raises_on_random_strings_over_its_alphabet():
    rng = random.Random(1)
    alphabet = "0123456789.+-*/()×÷− eE_x=*%"
    start = time.perf_counter()
    for _ in range(2000):
        expr = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        result = safe_eval(expr)
        assert result is None or isinstance(result, Fraction)
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------------ countdown

NUMBERS = [44, 19, 35, 5]


@pytest.mark.parametrize("completion", [
    "<think>25 * 7 = 175</think>\n<answer>(44 - 19) * 35 / 5</answer>",
    "<answer>(44 - 19) * 35 / 5 = 175</answer>",           # a true trailing "= target" is fine
    "<answer>(44 − 19) × 35 ÷ 5</answer>",                 # unicode operators
    "<answer>35 * (44 - 19) / 5</answer>",
    "so the result is \\boxed{(44-19)*35/5}",
    "<answer>(44 - 19) * 35 / 5 </answer>  ",
])
def test_countdown_rewards_a_correct_expression_using_each_number_once(completion):
    assert countdown_reward(completion, NUMBERS, 175) == 1.0


@pytest.mark.parametrize("completion", [
    "<answer>(44 - 19) * 35</answer>",                     # 5 not used (all must be used by default)
    "<answer>(44 - 19) * 35 / 5 + 0</answer>",             # 0 is not a given number
    "<answer>(44 - 19) * 35 / 5 * 5 / 5</answer>",         # 5 used three times
    "<answer>(44 - 19) * 35 / 5 = 170</answer>",           # the claimed value is false
    "<answer>(44 - 19) * 35 / 5 = 175 = 175</answer>",
    "<answer>175</answer>",                                # just the target
    "<answer>44 + 19 + 35 + 5</answer>",                   # wrong value (103)
    "<answer>I think (44 - 19) * 35 / 5</answer>",         # words around the expression
    "(44 - 19) * 35 / 5",                                  # no answer at all
    "<answer>44**19**35</answer>",                         # a power: rejected, never computed
    "<answer>__import__('os').system('ls')</answer>",
    "<answer></answer>",
    "<answer>(44 - 19) * 35 / 5",                          # unclosed tag
    "<answer>(44 - 19) * 35 / 5</answer><answer>44 + 19</answer>",   # the last answer counts
])
def test_countdown_gives_zero_for_wrong_or_malformed_answers(completion):
    assert countdown_reward(completion, NUMBERS, 175) == 0.0


def test_countdown_use_all_false_allows_a_subset_but_not_reuse():
    assert countdown_reward("<answer>(44 - 19) * 35</answer>", NUMBERS, 875, use_all=False) == 1.0
    assert countdown_reward("<answer>(44 - 19) * 35</answer>", NUMBERS, 875) == 0.0
    assert countdown_reward("<answer>44 + 44</answer>", NUMBERS, 88, use_all=False) == 0.0


def test_countdown_allows_repeated_numbers_as_often_as_given():
    assert countdown_reward("<answer>3 * 3 + 1</answer>", [3, 3, 1], 10) == 1.0
    assert countdown_reward("<answer>3 * 3 * 3 + 1</answer>", [3, 3, 1], 28) == 0.0


def test_countdown_compares_fractions_exactly():
    assert countdown_reward("<answer>8 / (3 - 8 / 3)</answer>", [8, 3, 8, 3], 24) == 1.0
    assert countdown_reward("<answer>1 / 3</answer>", [1, 3], 0.333) == 0.0


def test_countdown_accepts_numbers_and_target_as_strings_or_floats():
    assert countdown_reward("<answer>2 + 3</answer>", ["2", "3"], "5") == 1.0
    assert countdown_reward("<answer>2 + 3</answer>", [2.0, 3.0], 5.0) == 1.0
    assert countdown_reward("<answer>2 + 3</answer>", [2, 3], float("nan")) == 0.0
    assert countdown_reward("<answer>2 + 3</answer>", [2, 3], "9**9**9") == 0.0


def test_reaches_target_checks_a_bare_expression_without_extracting_an_answer():
    assert reaches_target("(44 - 19) * 35 / 5", NUMBERS, 175)
    assert reaches_target("(44 - 19) * 35 / 5 = 175", NUMBERS, 175)
    assert not reaches_target("(44 - 19) * 35 / 5 = 170", NUMBERS, 175)   # a false claimed value
    assert not reaches_target("(44 - 19) * 35", NUMBERS, 875)             # 5 unused
    assert reaches_target("(44 - 19) * 35", NUMBERS, 875, use_all=False)
    assert not reaches_target("<answer>(44 - 19) * 35 / 5</answer>", NUMBERS, 175)  # tags are not arithmetic
    assert not reaches_target(None, NUMBERS, 175)


@pytest.mark.parametrize("expr, given, expected", [
    ("12 + 0", (), True), ("0 + 12", (), True), ("12 - 0", (), True), ("12 * 1", (), True),
    ("1 * 12", (), True), ("12 / 1", (), True), ("-(-12)", (), True), ("(3 + 0) * 2", (), True),
    ("4 - 2", (), False), ("3 + 4 * 2", (), False), ("5 * 0", (), False), ("0 - 5", (), False),
    ("4 - 0", (0,), False), ("8 * 1", (1,), False),       # the problem gave the 0 or the 1
    ("2**3", (), False), ("a + 0", (), False),             # not an expression at all
])
def test_applies_identity_finds_steps_that_change_nothing(expr, given, expected):
    assert applies_identity(expr, [Fraction(g) for g in given]) is expected
