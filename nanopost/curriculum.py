"""Which prompts the GRPO loop trains on next.

The loop talks to a sampler through four methods, so a curriculum is a drop-in replacement:

    sample(n, step) -> list of records      the prompts for this step
    update(records, pass_rates, step)       what the last rollouts showed (fraction correct per prompt)
    state_dict() / load_state_dict(state)   so a resumed run draws exactly the same prompts
    metrics() -> dict                       logged with each step

`UniformSampler` walks through the data in a fresh seeded shuffle each epoch.
"""

from __future__ import annotations

import random
from typing import Any, Protocol, Sequence


class PromptSampler(Protocol):
    def sample(self, n: int, step: int) -> list[dict]: ...
    def update(self, records: Sequence[dict], pass_rates: Sequence[float], step: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def metrics(self) -> dict[str, float]: ...


class UniformSampler:
    """Every prompt once per epoch, in an order that depends only on (seed, epoch)."""

    def __init__(self, records: Sequence[dict], seed: int = 0):
        if not records:
            raise ValueError("the prompt sampler needs at least one record")
        self.records = list(records)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def sample(self, n: int, step: int = 0) -> list[dict]:
        out = []
        for _ in range(n):
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.records[self._order[self.position]])
            self.position += 1
        return out

    def update(self, records: Sequence[dict], pass_rates: Sequence[float], step: int = 0) -> None:
        pass  # uniform sampling ignores outcomes

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)

    def metrics(self) -> dict[str, float]:
        return {"epoch": float(self.epoch)}
