"""Countdown: reach a target by combining the given numbers with + - * /, each used exactly once.

    prompt     "Make 18 from the numbers 3, 7, 5, 2 using + - * / and each number once."
    reasoning  "7 * 3 = 21\\n21 - 5 = 16\\n16 + 2 = 18"
    answer     "7 * 3 - 5 + 2"
    extras     "numbers": [3, 7, 5, 2], "target": 18

Every puzzle is solvable by construction: the target is the value of a random expression over the
numbers, built by combining two of the remaining values at a time, as a player would. As in the
game every intermediate result is a positive integer (no zero, no fractions), and the target is
at most MAX_TARGET. The reference solution is that construction: one equation per step as the
reasoning, the whole expression, with only the parentheses it needs, as the answer. Any other
expression that reaches the target scores as well (`countdown_reward`, the task's check, below).

Difficulty is a level 1..4: how many numbers, then how large the largest of them is. The level is
a property of the puzzle, so no puzzle belongs to two levels.

    level       1      2      3      4
    numbers     3      3      4      4     each drawn from 1..largest
    largest   1..9  10..25  1..9  10..25

Train and held-out puzzles are kept apart by hashing the sorted numbers and the target, so a
puzzle listed in another order is still the same puzzle (see nanopost.tasks.base).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction
from typing import Iterable, Sequence

from nanopost.rewards import extract_answer
from nanopost.plumbing.safe_math import evaluate, normalize_operators, safe_eval
from nanopost.tasks.base import GeneratedTask

# level -> (how many numbers, the range of the largest one)
LEVELS = {1: (3, range(1, 10)), 2: (3, range(10, 26)), 3: (4, range(1, 10)), 4: (4, range(10, 26))}
MAX_TARGET = 100

# Binding strength: a sub-expression needs parentheses when it binds less tightly than its operator.
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "atom": 3}


class CountdownTask(GeneratedTask):
    """Countdown puzzles with a reference solution (see the module docstring)."""

    name = "countdown"
    levels = sorted(LEVELS)
    verifier = "the answer is an expression that uses each given number once and reaches the target"
    fields = ("numbers", "target")

    def generate(self, rng: random.Random, level: int) -> dict:
        count, largest = LEVELS[level]
        # A try fails when the largest number drawn is outside the level's range or the random
        # solution overshoots MAX_TARGET: more numbers, and larger ones, overshoot more often.
        while True:
            numbers = [rng.randint(1, largest[-1]) for _ in range(count)]
            if max(numbers) not in largest:
                continue
            target, expression, steps = _random_solution(rng, numbers)
            if target <= MAX_TARGET:
                break
        return {
            "prompt": f"Make {target} from the numbers {', '.join(map(str, numbers))} "
                      f"using + - * / and each number once.",
            "answer": expression,
            "difficulty": level,
            "reasoning": "\n".join(steps),
            "numbers": numbers,
            "target": target,
        }

    def key(self, record: dict) -> str:
        return f"{sorted(record['numbers'])} -> {record['target']}"

    def check(self, completion: str, record: dict) -> float:
        return countdown_reward(completion, record["numbers"], record["target"])


# ---------------------------------------------------------------- the check


def countdown_reward(completion: str, numbers: Sequence[int | float | str], target: int | float | str,
                     *, use_all: bool = True) -> float:
    """1.0 if the completion's answer is an expression over `numbers` that equals `target`, else 0.0.

    The answer is `rewards.extract_answer(completion)` (so `<answer>(44 - 19) * 35 / 5</answer>`),
    checked by `reaches_target`: each number used at most once, every one of them with `use_all=True`
    (the default), and a trailing "= value" must be right too. Formatting is scored separately
    (format_reward); this reward is correctness only.
    """
    answer = extract_answer(completion) if isinstance(completion, str) else None
    return 1.0 if answer is not None and reaches_target(answer, numbers, target, use_all=use_all) else 0.0


def reaches_target(expression: str, numbers: Iterable[int | float | str], target: int | float | str,
                   *, use_all: bool = True) -> bool:
    """True if `expression` is an arithmetic expression over `numbers` whose value is `target`.

    A trailing "= value" is allowed, but that value must equal the expression too. Each given number
    may be used at most once; with `use_all=True` (the default, as in the Countdown-Tasks datasets)
    every number must be used exactly once. Numbers are compared by value, so 3.0 counts as 3.
    `countdown_reward` applies it to a completion's answer.
    """
    if not isinstance(expression, str):
        return False
    expr, equals, claimed = normalize_operators(expression).partition("=")
    result = evaluate(expr)
    if result is None:
        return False
    value, used = result
    if equals and (safe_eval(claimed) != value or "=" in claimed):
        return False
    given = Counter(_number(n) for n in numbers)
    goal = _number(target)
    if goal is None or None in given:
        return False
    used_counts = Counter(used)
    if any(used_counts[n] > given[n] for n in used_counts):
        return False
    if use_all and used_counts != given:
        return False
    return value == goal


def _number(x: int | float | str) -> Fraction | None:
    """A given number or target as a Fraction; strings go through the same bounded parser."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return Fraction(x)
    if isinstance(x, float):
        return Fraction(str(x)) if math.isfinite(x) else None
    return safe_eval(x) if isinstance(x, str) else None


# ---------------------------------------------------------------- the reference solution


def _random_solution(rng: random.Random, numbers: list[int]) -> tuple[int, str, list[str]]:
    """(value, expression, step equations) of a random way to combine all of `numbers`."""
    items = [(n, str(n), "atom") for n in numbers]  # (value, expression, its outermost operator)
    steps = []
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, a_text, a_op), (b, b_text, b_op) = items[i], items[j]
        allowed = ["+", "*"] + ["-"] * (a > b) + ["/"] * (a % b == 0)
        op = rng.choice(allowed)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        steps.append(f"{a} {op} {b} = {value}")
        left = f"({a_text})" if _PRECEDENCE[a_op] < _PRECEDENCE[op] else a_text
        # a - (b + c) and a / (b * c) keep their parentheses; a + (b - c) and a * (b / c) need none.
        right_loose = _PRECEDENCE[b_op] < _PRECEDENCE[op] or (
            _PRECEDENCE[b_op] == _PRECEDENCE[op] and op in "-/")
        right = f"({b_text})" if right_loose else b_text
        items = [item for k, item in enumerate(items) if k not in (i, j)]
        items.append((value, f"{left} {op} {right}", op))
    value, expression, _ = items[0]
    return value, expression, steps
