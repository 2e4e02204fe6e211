"""Tasks: deterministic question generators (or datasets) with verifiers and difficulty levels.

    arithmetic   multi-step + / - on 1-3 digit numbers, levels 1..9    (tasks/arithmetic.py)
    countdown    reach a target from 3-4 numbers with + - * /, 1..4   (tasks/countdown.py)
    gsm8k        grade-school word problems from data/gsm8k, 2..8     (tasks/gsm8k.py)

    task = get_task("arithmetic", split="test")
    record = task.sample(random.Random(0), difficulty=3)
    # {"id", "prompt", "answer", "difficulty", "reasoning", ...extras}
    task.check("<think>...</think><answer>66</answer>", record)      # 1.0 or 0.0
    split = task.make_split(900, seed=0)                              # balanced over levels
    write_jsonl(split, "data/arithmetic/test.jsonl")

Records are in the RL data format (the prompt is the raw question; prompt templates are applied
later, by nanopost.prompts) and carry a worked "reasoning" for SFT traces.
"""

from __future__ import annotations

from typing import Any

from nanopost.tasks.arithmetic import ArithmeticTask
from nanopost.tasks.base import GeneratedTask, Task, write_jsonl
from nanopost.tasks.countdown import CountdownTask
from nanopost.tasks.gsm8k import GSM8KTask

TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "gsm8k": GSM8KTask}

__all__ = ["Task", "GeneratedTask", "ArithmeticTask", "CountdownTask", "GSM8KTask", "TASKS", "get_task",
           "write_jsonl"]


def get_task(name: str, **kwargs: Any) -> Task:
    """The task called `name`, built with `kwargs` (e.g. split="test")."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
