"""What a task is: records with a verifiable answer, levels of difficulty, balanced splits.

A record is a plain dict in the RL data format, plus the worked solution for SFT traces:

    {"id", "prompt" (the question text), "answer" (str), "difficulty" (int), "reasoning", ...extras}

`Task.check(completion, record)` has the uniform reward signature of `rewards.combine_rewards`
(`fn(completion, sample) -> float`), so a task's own answer check can be passed as a reward.

Generated tasks (`GeneratedTask`) keep train and held-out questions apart by hashing: a question
belongs to the held-out bucket when the SHA-256 of its key, read as a number, falls in the first
`held_out_percent` of 100. A task built with split="test" only ever emits held-out questions and
one built with split="train" never does, whatever the seeds, so no held-out question can reach
training. The key is the question itself, or a canonical form of it (Countdown sorts the numbers),
and the record id is derived from the same hash, so equal questions share one id.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterable

SPLITS = ("train", "test")

# make_split stops looking for new questions at a level after this many draws in a row brought
# none: the level has fewer distinct questions than asked for (1-digit sums have only 200).
_MAX_REPEATS = 200
# A bucket holds at least 1% of a level's questions, so a sample needs ~100 draws at worst; running
# out of tries means the level's few questions all hashed into the other bucket.
_MAX_TRIES = 10_000


class Task:
    """A source of records at numbered difficulty levels, with the check that scores answers."""

    name: str = "task"
    levels: list[int] = []
    # What `check` compares and the record fields it reads: GRPO's --task makes `check` the
    # `accuracy` reward, logs `verifier` and refuses training data without `fields`.
    verifier: str = "numeric match of the extracted answer with the record's answer"
    fields: tuple[str, ...] = ("answer",)

    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict:
        """One record at `difficulty` (a level drawn uniformly from `levels` when None)."""
        raise NotImplementedError

    def check(self, completion: str, record: dict) -> float:
        """1.0 if `completion` answers `record` correctly, else 0.0."""
        raise NotImplementedError

    def pick_level(self, rng: random.Random | None, difficulty: int | None) -> int:
        """`difficulty` if it is a level (else ValueError), or a level drawn uniformly when None."""
        if difficulty is None:
            return rng.choice(self.levels)
        if difficulty not in self.levels:
            raise ValueError(f"{self.name}: difficulty {difficulty!r} is not one of the levels {self.levels}")
        return difficulty

    def make_split(self, n: int, seed: int, levels: Iterable[int] | None = None) -> list[dict]:
        """`n` records with distinct ids, balanced over `levels` (default: all), deterministic in `seed`.

        Each level gets n // len(levels) records, the first n % len(levels) levels one more, and
        records are interleaved level by level, so every prefix of the split is balanced too. A level
        with fewer distinct questions than its share gives all it has. Each level draws from its
        own random stream, so a level's records do not depend on which other levels are asked for.
        """
        levels = list(self.levels if levels is None else levels)
        if n < 0 or not levels:
            raise ValueError(f"{self.name}: make_split needs n >= 0 and a level, got n={n}, levels={levels}")
        for level in levels:
            self.pick_level(None, level)  # fail before any work on an unknown level
        per_level = [
            self._distinct(random.Random(f"{self.name}:{seed}:{level}"), level,
                           n // len(levels) + (i < n % len(levels)))
            for i, level in enumerate(levels)
        ]
        longest = max(len(records) for records in per_level)
        return [records[j] for j in range(longest) for records in per_level if j < len(records)]

    def _distinct(self, rng: random.Random, level: int, k: int) -> list[dict]:
        found: dict[str, dict] = {}
        repeats = 0
        while len(found) < k and repeats < _MAX_REPEATS:
            record = self.sample(rng, level)
            if record["id"] in found:
                repeats += 1
            else:
                found[record["id"]] = record
                repeats = 0
        return list(found.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(levels={self.levels})"


class GeneratedTask(Task):
    """A task whose records come from a seeded generator, split into train / held-out by hashing."""

    def __init__(self, split: str = "train", held_out_percent: int = 10):
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {split!r}")
        if not 0 < held_out_percent < 100:
            raise ValueError(f"{self.name}: held_out_percent must be in 1..99, got {held_out_percent!r}")
        self.split = split
        self.held_out_percent = held_out_percent

    def generate(self, rng: random.Random, level: int) -> dict:
        """A record at `level` without its id, from either bucket.

        The level must follow from the question itself (no question at two levels), so that ids
        are distinct across the levels of a split as well as within each.
        """
        raise NotImplementedError

    def key(self, record: dict) -> str:
        """The text that identifies a question: equal keys are the same question."""
        return record["prompt"]

    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict:
        level = self.pick_level(rng, difficulty)
        want_held_out = self.split == "test"
        for _ in range(_MAX_TRIES):
            record = self.generate(rng, level)
            digest = hashlib.sha256(self.key(record).encode("utf-8")).hexdigest()
            if (int(digest[:8], 16) % 100 < self.held_out_percent) == want_held_out:
                return {"id": f"{self.name}-{digest[:12]}", **record}
        raise RuntimeError(f"{self.name}: level {level} has no questions in the {self.split} bucket")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, levels={self.levels})"


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> None:
    """One JSON object a line, UTF-8, "\\n" line ends; the same records always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
