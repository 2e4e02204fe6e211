"""Which prompts the GRPO loop trains on next: uniform, staged easy -> hard, or the unstable ones.

The loop talks to a sampler through six methods, so a curriculum is a drop-in replacement:

    sample(n, step) -> list of records      the prompts for this step
    update(records, pass_rates, step)       what the last rollouts showed (fraction correct per prompt)
    state_dict() / load_state_dict(state)   so a resumed run draws exactly the same prompts
    metrics() -> dict                       logged with each step
    stage_settings(step) -> dict            a temperature or group size of its own, if any

`UniformSampler` walks through the data in a fresh seeded shuffle each epoch.

`CurriculumSampler` adds the three ideas that make a prompt worth its rollouts:

 1. Hard prompts late. `Stage`s split training into phases, each with its own difficulty range
    (absolute, or as quantiles of the data's difficulties), so training goes easy -> hard as in
    Kimi k1.5's curriculum sampling and AceReason's staged prompt sets. A share `mix_previous`
    (default 0.2) of each step's prompts still comes from earlier stages: easy items kept in the
    mix hold answer length and format (arXiv 2511.01937). A stage may also set the sampling
    temperature and group size; raising the temperature by stage ("hotter late", POLARIS
    1.4 -> 1.45 -> 1.5) keeps entropy up once the policy has sharpened. A `Stage` is a record
    of the options (plumbing/options.py, which reads and checks --curriculum-stages).
 2. Unstable prompts first. With a 0/1 reward and pass rate p, a group's reward variance is
    p(1 - p), and GRPO learns nothing from a group whose answers all agree (DAPO). So the sampler
    tracks each prompt's pass rate online (an EMA of every group's fraction correct, weight
    `ema` = 0.3 on the newest group, plus counts) and selects by `mode`:
        "uniform"        every prompt of the stage equally likely
        "band"           only prompts whose estimate lies strictly inside `band` (lo, hi);
                         (0, 1) drops prompts always or never solved, the prompt-level form of
                         DAPO's dynamic sampling; (0.2, 0.8) is Bae et al.'s balanced filter
        "learnability"   weight p(1 - p) (LILO, Foster & Foerster arXiv 2502.12272; SPEED-RL's
                         SNR <= 4N p(1 - p)), at least `floor` so a prompt the policy could not
                         solve is retried now and then as it improves
    A prompt never seen has no estimate: the band keeps it, and learnability weighs it
    `explore` (default 0.25 = p(1 - p) at p = 0.5, i.e. optimistic until measured).
 3. Mastered prompts retire. With `retire_threshold` set, a prompt whose EMA exceeds it after at
    least `retire_min_tries` groups is not drawn again (POLARIS drops items above 0.9 accuracy).

A step's prompts are drawn without replacement (refill rounds of the same step included), by
Efraimidis-Spirakis weighted keys: prompts of positive weight first, then, only if the stage runs
short, the zero-weight ones, then unretired prompts of other stages, then retired ones.

Difficulty is the record's "difficulty" field, or 1 - pass rate from a pre-pass of k samples per
prompt with the current model (tools/difficulty.py: estimate_pass_rates, which also reports
held-out accuracy per difficulty level).

Randomness: draw number i uses Random(seed, i), so the state is a few counters and the tracker,
plain containers that torch.load(weights_only=True) reads back.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Literal, Mapping, Protocol, Sequence

from .plumbing.options import Stage, check_stages
from .schedules import stage_at


class PromptSampler(Protocol):
    def sample(self, n: int, step: int) -> list[dict]: ...
    def update(self, records: Sequence[dict], pass_rates: Sequence[float], step: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def metrics(self) -> dict[str, float]: ...
    def stage_settings(self, step: int) -> dict[str, Any]: ...


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
        return {"epoch": self.epoch, "position": self.position, "prompts": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The order is a shuffle of the prompts' positions: over other data it would be another order.
        saved = state.get("prompts", len(self.records))
        if saved != len(self.records) or int(state["position"]) > len(self.records):
            raise ValueError(f"the sampler state was saved over {saved} prompts and the training data has "
                             f"{len(self.records)}: resume with the run's own --train")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)

    def metrics(self) -> dict[str, float]:
        return {"epoch": float(self.epoch)}

    def stage_settings(self, step: int) -> dict[str, Any]:
        return {}  # the schedule's temperature and the configured group size


# ---------------------------------------------------------------- difficulty


def record_key(record: dict, index: int) -> str:
    """A record's name for pass rates and sampler state: its "id", else its position in the list."""
    value = record.get("id")
    return str(index) if value is None else str(value)


def unique_keys(records: Sequence[dict]) -> list[str]:
    keys = [record_key(r, i) for i, r in enumerate(records)]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"record id {dup!r} appears more than once; pass rates are kept per id")
    return keys


# ---------------------------------------------------------------- the curriculum


Mode = Literal["uniform", "band", "learnability"]
MODES = ("uniform", "band", "learnability")


class CurriculumSampler:
    """Staged, difficulty-aware prompt sampler with online pass-rate tracking (module docstring)."""

    def __init__(
        self,
        records: Sequence[dict],
        *,
        total_steps: int,
        stages: Sequence[Stage] | None = None,
        mode: Mode = "uniform",
        band: tuple[float, float] = (0.0, 1.0),
        retire_threshold: float | None = None,
        retire_min_tries: int = 3,
        ema: float = 0.3,
        explore: float = 0.25,
        floor: float = 0.01,
        mix_previous: float = 0.2,
        pass_rates: Mapping[str, float] | None = None,
        seed: int = 0,
    ):
        """`pass_rates` (from tools/difficulty.py: `estimate_pass_rates`) gives records without a "difficulty" field
        their difficulty (1 - p) and starts every listed prompt's tracked pass rate at p."""
        if not records:
            raise ValueError("the prompt sampler needs at least one record")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= band[0] < band[1] <= 1.0:
            raise ValueError(f"band must be (lo, hi) with 0 <= lo < hi <= 1, got {band}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if not 0.0 <= mix_previous <= 1.0:
            raise ValueError(f"mix_previous must be in [0, 1], got {mix_previous}")
        if explore <= 0 or floor < 0:
            raise ValueError(f"explore must be > 0 and floor >= 0, got explore={explore}, floor={floor}")
        if retire_threshold is not None and not 0.0 <= retire_threshold < 1.0:
            raise ValueError(f"retire_threshold must be in [0, 1), got {retire_threshold}")
        self.records = list(records)
        self.keys = unique_keys(self.records)
        self.total_steps = total_steps
        self.stages = list(stages) if stages else [Stage(until=1.0)]
        self.mode, self.band = mode, (float(band[0]), float(band[1]))
        self.retire_threshold, self.retire_min_tries = retire_threshold, retire_min_tries
        self.ema_weight, self.explore, self.floor = ema, explore, floor
        self.mix_previous, self.seed = mix_previous, seed

        self._index = {key: i for i, key in enumerate(self.keys)}
        prior = {str(k): float(v) for k, v in (pass_rates or {}).items()}
        unknown = [k for k in prior if k not in self._index]
        if unknown:
            raise ValueError(f"pass_rates names {len(unknown)} ids not in the records, e.g. {unknown[0]!r}")
        self.difficulty: dict[str, float | None] = {}
        for key, record in zip(self.keys, self.records):
            d = record.get("difficulty")
            if d is None and key in prior:  # difficulty in [0, 1]: 0 = always solved, 1 = never solved
                if not 0.0 <= prior[key] <= 1.0:
                    raise ValueError(f"a pass rate must be in [0, 1], got {prior[key]}")
                d = 1.0 - prior[key]
            self.difficulty[key] = None if d is None else float(d)
        self._by_object = {id(r): key for r, key in zip(self.records, self.keys)}
        self._bounds = check_stages(self.stages)
        self.pools = [self._stage_pool(i, s) for i, s in enumerate(self.stages)]
        self.previous = []  # prompts of earlier stages that the stage itself does not hold
        for i, pool in enumerate(self.pools):
            earlier = {k for p in self.pools[:i] for k in p} - set(pool)
            self.previous.append([k for k in self.keys if k in earlier])

        # Online pass-rate tracker and draw state: everything state_dict saves.
        self.ema: dict[str, float] = dict(prior)
        self.tries: dict[str, int] = {}
        self.successes: dict[str, float] = {}  # sum of the groups' fractions correct
        self.retired: set[str] = set()
        self._draws = 0  # sample() calls so far: draw i uses Random(seed, i)
        self._step = -1  # the step whose prompts are in _drawn
        self._drawn: list[str] = []  # this step's prompts, never drawn twice in one step
        self._batch_p: list[float | None] = []  # their tracked pass rates when drawn

    # -- stages

    def _stage_pool(self, i: int, stage: Stage) -> list[str]:
        if not stage.filters:
            return list(self.keys)
        missing = [k for k in self.keys if self.difficulty[k] is None]
        if missing:
            raise ValueError(f"stage {i} filters by difficulty, but record {missing[0]!r} has none: give it a "
                             '"difficulty" field or pass pass_rates= from estimate_pass_rates')
        lo = -math.inf if stage.min_difficulty is None else stage.min_difficulty
        hi = math.inf if stage.max_difficulty is None else stage.max_difficulty
        if stage.quantiles is not None:
            values = sorted(self.difficulty.values())
            lo = max(lo, _quantile(values, stage.quantiles[0]))
            hi = min(hi, _quantile(values, stage.quantiles[1]))
        pool = [k for k in self.keys if lo <= self.difficulty[k] <= hi]
        if not pool:
            span = (min(self.difficulty.values()), max(self.difficulty.values()))
            raise ValueError(f"stage {i} selects no prompt: difficulty in [{lo}, {hi}], the data spans {span}")
        return pool

    def stage_index(self, step: int) -> int:
        """Which stage `step` belongs to: the first whose `until` it has not reached; past the last
        boundary, the last (schedules.stage_at)."""
        return min(stage_at(step, self.total_steps, self._bounds), len(self._bounds) - 1)

    def stage_settings(self, step: int) -> dict[str, Any]:
        """The stage's overrides for the loop: {"temperature": T, "group_size": G}, those set."""
        stage = self.stages[self.stage_index(step)]
        out: dict[str, Any] = {}
        if stage.temperature is not None:
            out["temperature"] = float(stage.temperature)
        if stage.group_size is not None:
            out["group_size"] = int(stage.group_size)
        return out

    # -- sampling

    def weight(self, key: str) -> float:
        """How likely the prompt is to be drawn under `mode` (0: only when nothing else is left)."""
        p = self.ema.get(key)
        if self.mode == "uniform":
            return 1.0
        if self.mode == "band":
            return 1.0 if p is None or self.band[0] < p < self.band[1] else 0.0
        return self.explore if p is None else max(p * (1.0 - p), self.floor)

    def sample(self, n: int, step: int) -> list[dict]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if step != self._step:
            self._step, self._drawn, self._batch_p = step, [], []
        rng = random.Random(f"{self.seed}/{self._draws}")
        self._draws += 1
        stage = self.stage_index(step)
        want = math.floor(self.mix_previous * n)
        want += rng.random() < self.mix_previous * n - want  # unbiased rounding of the share
        chosen = self._pick(self.previous[stage], want, rng) if stage > 0 else []
        chosen += self._pick(self.pools[stage], n - len(chosen), rng)
        # The stage ran short: any unretired prompt, then retired ones, then a second pass when n
        # exceeds the whole data set.
        chosen += self._pick(self.keys, n - len(chosen), rng)
        chosen += self._pick(self.keys, n - len(chosen), rng, allow_retired=True)
        while len(chosen) < n:
            self._drawn = []
            chosen += self._pick(self.keys, n - len(chosen), rng, allow_retired=True)
        self._batch_p += [self.ema.get(k) for k in chosen]
        return [self.records[self._index[k]] for k in chosen]

    def _pick(self, pool: Sequence[str], n: int, rng: random.Random, allow_retired: bool = False) -> list[str]:
        if n <= 0:
            return []
        taken = set(self._drawn)
        keyed = []
        for key in pool:
            if key in taken or (key in self.retired and not allow_retired):
                continue
            w = self.weight(key)
            u = 1.0 - rng.random()  # in (0, 1]
            # Efraimidis-Spirakis: the n largest u^(1/w) are a weighted draw without replacement;
            # zero-weight prompts rank after all others, in random order.
            keyed.append(((1, math.log(u) / w) if w > 0 else (0, u), key))
        keyed.sort(key=lambda t: t[0], reverse=True)
        chosen = [key for _, key in keyed[:n]]
        self._drawn += chosen
        return chosen

    # -- tracking

    def update(self, records: Sequence[dict], pass_rates: Sequence[float], step: int) -> None:
        if len(records) != len(pass_rates):
            raise ValueError(f"update got {len(records)} records but {len(pass_rates)} pass rates")
        for record, p in zip(records, pass_rates):
            key = self._key(record)
            p = float(p)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"pass rate of {key!r} must be in [0, 1], got {p}")
            old = self.ema.get(key)
            self.ema[key] = p if old is None else (1.0 - self.ema_weight) * old + self.ema_weight * p
            self.tries[key] = self.tries.get(key, 0) + 1
            self.successes[key] = self.successes.get(key, 0.0) + p
            if (self.retire_threshold is not None and self.tries[key] >= self.retire_min_tries
                    and self.ema[key] > self.retire_threshold):
                self.retired.add(key)

    def _key(self, record: dict) -> str:
        key = self._by_object.get(id(record))
        if key is None:
            key = None if record.get("id") is None else str(record["id"])
        if key not in self._index:
            name = record.get("id", record.get("prompt"))
            raise ValueError(f"update: record {name!r} is not one of the sampler's records")
        return key

    # -- state and metrics

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self._draws, "step": self._step, "drawn": list(self._drawn),
                "batch_p": list(self._batch_p), "ema": dict(self.ema), "tries": dict(self.tries),
                "successes": dict(self.successes), "retired": sorted(self.retired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        strangers = [k for part in ("ema", "tries", "successes") for k in state[part] if k not in self._index]
        strangers += [k for k in state["retired"] if k not in self._index]
        if strangers:
            raise ValueError(f"sampler state names prompt {strangers[0]!r}, which is not in the data")
        self._draws, self._step = int(state["draws"]), int(state["step"])
        self._drawn = [str(k) for k in state["drawn"]]
        self._batch_p = [None if p is None else float(p) for p in state["batch_p"]]
        self.ema = {str(k): float(v) for k, v in state["ema"].items()}
        self.tries = {str(k): int(v) for k, v in state["tries"].items()}
        self.successes = {str(k): float(v) for k, v in state["successes"].items()}
        self.retired = {str(k) for k in state["retired"]}

    def metrics(self) -> dict[str, float]:
        out = {"stage": float(self.stage_index(max(self._step, 0))), "retired": float(len(self.retired)),
               "seen_frac": len(self.tries) / len(self.keys)}
        levels = [self.difficulty[k] for k in self._drawn if self.difficulty[k] is not None]
        if levels:
            out["batch_difficulty"] = sum(levels) / len(levels)
        known = [p for p in self._batch_p if p is not None]
        if known:
            out["batch_pass_rate"] = sum(known) / len(known)
        if self.tries:
            out["pass_rate_mean"] = sum(self.ema[k] for k in self.tries) / len(self.tries)
        return out


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default)."""
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)
