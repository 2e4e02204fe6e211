"""Multi-step integer arithmetic with + and -, solved one equation per step.

    prompt     "Compute 37 + 48 - 19."
    reasoning  "37 + 48 = 85\\n85 - 19 = 66"
    answer     "66"

Difficulty is a single level 1..9, digits-major: level = 3 * (digits - 1) + ops.

    level    1  2  3  4  5  6  7  8  9
    digits   1  1  1  2  2  2  3  3  3     every operand has exactly this many digits (0..9, 10..99, 100..999)
    ops      1  2  3  1  2  3  1  2  3     operations, each + or - with equal chance

Only + and - appear, so reading left to right is also the usual order of operations, and every
step of the reasoning is one fact of the kind the previous step produced; multiplication would add
precedence rules and long products, which a tiny model trained from scratch learns far more
slowly. Results may be negative ("4 - 9 = -5"); answers_match reads "-5" and "−5" alike.

Extras in each record: "digits", "ops". Train and held-out questions are kept apart by hashing the
question text (see nanopost.tasks.base). Level 1 has only 200 distinct questions, so its
held-out bucket holds 18 of them (the held-out split of level 1 is those 18).
"""

from __future__ import annotations

import random

from nanopost.rewards import accuracy_reward
from nanopost.tasks.base import GeneratedTask

LEVELS = {3 * (digits - 1) + ops: (digits, ops) for digits in (1, 2, 3) for ops in (1, 2, 3)}


class ArithmeticTask(GeneratedTask):
    """Left-to-right sums and differences of `digits`-digit numbers (see the module docstring)."""

    name = "arithmetic"
    levels = sorted(LEVELS)

    def generate(self, rng: random.Random, level: int) -> dict:
        digits, ops = LEVELS[level]
        low = 0 if digits == 1 else 10 ** (digits - 1)
        value = rng.randint(low, 10 ** digits - 1)
        question, steps = [str(value)], []
        for _ in range(ops):
            op, operand = rng.choice("+-"), rng.randint(low, 10 ** digits - 1)
            result = value + operand if op == "+" else value - operand
            question.append(f"{op} {operand}")
            steps.append(f"{value} {op} {operand} = {result}")
            value = result
        return {
            "prompt": f"Compute {' '.join(question)}.",
            "answer": str(value),
            "difficulty": level,
            "reasoning": "\n".join(steps),
            "digits": digits,
            "ops": ops,
        }

    def check(self, completion: str, record: dict) -> float:
        return accuracy_reward(completion, record["answer"])
