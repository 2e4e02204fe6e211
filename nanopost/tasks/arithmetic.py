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

With work="columns" each step is first worked digit by digit, ones column first, on the two
magnitudes (the larger on top, so a subtraction never goes below zero and the sign is decided
once), and then written as its equation:

    48+37:8+7=15,4+3+1=8          85-91 is worked as 91-85:11-5=6,9-8-1=0
    37+48=85                      85-91=-6

Spaces are left out: each would be a token of its own between split digits.

A carry is "+1" in the next column, a borrow writes the top digit plus 10 and "-1" in the next
column. Each column is a one-digit fact, so a small model that cannot add two-digit numbers in
one go can still get them right by writing more.

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
    works = ("equations", "columns")

    def __init__(self, split: str = "train", held_out_percent: int = 10, work: str = "equations"):
        super().__init__(split, held_out_percent)
        if work not in self.works:
            raise ValueError(f"{self.name}: work must be one of {self.works}, got {work!r}")
        self.work = work

    def generate(self, rng: random.Random, level: int) -> dict:
        digits, ops = LEVELS[level]
        low = 0 if digits == 1 else 10 ** (digits - 1)
        question = [str(rng.randint(low, 10 ** digits - 1))]
        for _ in range(ops):
            question.append(f"{rng.choice('+-')} {rng.randint(low, 10 ** digits - 1)}")
        prompt = f"Compute {' '.join(question)}."
        solved = self.solve(prompt)
        return {"prompt": prompt, "answer": solved["answer"], "difficulty": level, "reasoning": solved["reasoning"],
                "digits": digits, "ops": ops}

    def solve(self, prompt: str) -> dict:
        """{"answer", "reasoning"} for a question of this task ("Compute 37 + 48 - 19."), in this
        task's `work`; a held-out record's reasoning can be written in either."""
        first, *rest = prompt.removeprefix("Compute ").removesuffix(".").split(" ")
        value, steps = int(first), []
        for op, text in zip(rest[::2], rest[1::2]):
            operand = int(text)
            result = value + operand if op == "+" else value - operand
            if self.work == "columns":
                steps.append(f"{columns(value, op, operand)}\n{value}{op}{operand}={result}")
            else:
                steps.append(f"{value} {op} {operand} = {result}")
            value = result
        return {"answer": str(value), "reasoning": "\n".join(steps)}

    def check(self, completion: str, record: dict) -> float:
        return accuracy_reward(completion, record["answer"])


def columns(value: int, op: str, operand: int) -> str:
    """The digit-by-digit work for `value op operand` (operand >= 0), ones column first.

    The magnitudes are added when the signs agree ("-6 - 12" is 12+6) and otherwise the smaller is
    taken from the larger ("85 - 91" is 91-85); the equation written after the work carries the sign.
    """
    add = (value >= 0) == (op == "+")
    top, bottom = max(abs(value), operand), min(abs(value), operand)
    t, s = str(top), str(bottom).rjust(len(str(top)), "0")
    cols, carry = [], 0
    for dt, ds in zip(map(int, reversed(t)), map(int, reversed(s))):
        if add:
            x = dt + ds + carry
            cols.append(f"{dt}+{ds}{'+1' if carry else ''}={x}")
            carry = int(x >= 10)
        else:
            borrow = int(dt - carry < ds)
            x = 10 * borrow + dt - ds - carry
            cols.append(f"{10 * borrow + dt}-{ds}{'-1' if carry else ''}={x}")
            carry = borrow
    return f"{top}{'+' if add else '-'}{bottom}:" + ",".join(cols)
