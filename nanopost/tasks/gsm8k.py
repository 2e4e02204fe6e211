"""GSM8K grade-school math word problems, read from the dataset's JSONL files.

Each line of the dataset is {"question": str, "answer": str}, where the answer is the worked
solution, with calculator annotations, ending in the final answer after "####":

    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n...\\n#### 72"

A record keeps the question as "prompt", the text after "####" as "answer" (thousands separators
removed: "1,080" becomes "1080"), and the solution before it as "reasoning", without the
<<48/2=24>> annotations, which a person writing the solution would not write.

Difficulty is the number of non-empty reasoning lines, clamped to 1..8 (MAX_LEVEL). The dataset's
solutions have at least two lines, so `levels` lists the levels the file has, not 1..8.
The split is the file: data/gsm8k/train.jsonl or test.jsonl (MIT licence, data/gsm8k/LICENSE).
Ids are "gsm8k-{file stem}-{line number}".
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from nanopost.plumbing.data_files import read_jsonl
from nanopost.rewards import accuracy_reward
from nanopost.tasks.base import Task

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "gsm8k"
MAX_LEVEL = 8

_ANNOTATION = re.compile(r"<<[^<>]*>>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def parse_solution(solution: str) -> tuple[str, str]:
    """(reasoning, final answer) of a GSM8K answer text; ValueError if it has no "####"."""
    body, marker, final = solution.rpartition("####")
    if not marker:
        raise ValueError('no "####" before the final answer')
    answer = _THOUSANDS.sub("", final.strip())
    if not answer:
        raise ValueError('nothing after "####"')
    reasoning = "\n".join(line.strip() for line in _ANNOTATION.sub("", body).splitlines() if line.strip())
    return reasoning, answer


def load_gsm8k(path: str | Path) -> list[dict]:
    """Records ({"id", "prompt", "answer", "difficulty", "reasoning"}) from a GSM8K JSONL file.

    Errors name the file and line: "data/gsm8k/test.jsonl:17: missing field "answer"".
    """
    path = Path(path)
    records = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        for field in ("question", "answer"):
            if not isinstance(row.get(field), str):
                raise ValueError(f'{where}: missing field "{field}" (a string)')
        try:
            reasoning, answer = parse_solution(row["answer"])
        except ValueError as e:
            raise ValueError(f'{where}: field "answer": {e}') from e
        records.append({
            "id": f"gsm8k-{path.stem}-{lineno}",
            "prompt": row["question"].strip(),
            "answer": answer,
            "difficulty": min(MAX_LEVEL, max(1, reasoning.count("\n") + 1)),
            "reasoning": reasoning,
        })
    return records


class GSM8KTask(Task):
    """GSM8K problems from one file; `split` picks data/gsm8k/{split}.jsonl unless `path` is given."""

    name = "gsm8k"

    def __init__(self, split: str = "train", path: str | Path | None = None):
        self.path = Path(path) if path is not None else DATA_DIR / f"{split}.jsonl"
        self.records = load_gsm8k(self.path)
        self.by_level: dict[int, list[dict]] = {}
        for record in self.records:
            self.by_level.setdefault(record["difficulty"], []).append(record)
        self.levels = sorted(self.by_level)

    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict:
        return dict(rng.choice(self.by_level[self.pick_level(rng, difficulty)]))

    def check(self, completion: str, record: dict) -> float:
        return accuracy_reward(completion, record["answer"])

    def __repr__(self) -> str:
        return f"GSM8KTask(path={str(self.path)!r}, levels={self.levels})"
