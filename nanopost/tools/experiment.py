"""Repeated and controlled experiments: one config over several seeds, an A/B pair, a control arm.

    python scripts/experiment.py --kind sft --seeds 3 --model M --train T --val V --lr 1e-3
    python scripts/experiment.py --kind grpo --seeds 5 --ab "lr=1e-6" "lr=3e-6" --model M ...
    python scripts/experiment.py --kind grpo --seeds 5 --control --model M ...

Every option the experiment does not know is passed to the training config (SFTConfig or
GRPOConfig), so an arm is exactly `scripts/sft.py` / `scripts/grpo.py` with those options. Arms:

    (default)   one arm, "base"
    --ab A B    two arms that differ only in the fields named in A and B ("lr=1e-3 beta=0.04")
    --control   (GRPO) adds the arm "control": the same run with a random reward (a fair coin per
                completion, a function of the seed, prompt and text) in place of the real rewards,
                whose weights go to 0 so they are still logged. What a run learns beyond what the
                control learns is what the reward taught; the rest is format and sampling drift.

Every arm runs with the same seeds (--seeds K from --first-seed), into OUT/<arm>-seed<k>, so
scripts/plot.py draws each arm as a mean ± std band. Runs go one after another, or in --jobs
parallel processes, each with max(1, cores // jobs) torch threads (or --threads). A seed fixes a
run on CPU at a given thread count; a different thread count may change the last bits of the
sums, and CUDA kernels are not all deterministic.

The summary (printed, and written to OUT/summary.json and OUT/summary.md) has, per arm and
metric, the value of each seed, mean ± sample std and a 95% t-interval of the mean. Eval metrics
are the last evaluation's; train metrics the mean of the last --tail train rows (one step's
value is noise). Each arm is compared with the first one by Welch's t-test (unequal variances,
which is what two different lrs give): the difference is called larger than the seed-to-seed
spread when p < 0.05, i.e. when the 95% interval of the difference excludes 0. With K seeds per
arm a difference of about 2-3 std's is needed to pass at K = 3; papers' 5-15 point seed
spreads are why one run per arm tells nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import re
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..grpo_loop import GRPOConfig, train_grpo
from ..plumbing.config import parse_config
from ..plumbing.metrics import read_metrics
from ..rewards import RewardFn
from ..sft_loop import SFTConfig, train_sft
from .monitor import LiveMonitor

# -- statistics: small pure functions ----------------------------------------------------------------


def mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("mean of no values")
    return sum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz).

    The fraction converges fast for x < (a + 1) / (a + b + 2); above that the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) brings x back into that range.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float, iters: int = 500, eps: float = 1e-15) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (df may be fractional, or inf)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if math.isinf(df):
        return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on t_cdf (monotone, so it cannot miss)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def t_interval(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided interval for the mean: mean ± t_{(1+c)/2, n-1} * std / sqrt(n); unbounded for n < 2."""
    m = mean(xs)
    if len(xs) < 2:
        return (-math.inf, math.inf)
    half = t_quantile(0.5 + confidence / 2.0, len(xs) - 1) * std(xs) / math.sqrt(len(xs))
    return (m - half, m + half)


@dataclass
class Welch:
    diff: float  # mean(b) - mean(a)
    t: float
    df: float
    p: float  # two-sided
    lo: float  # 95% interval of the difference
    hi: float


def welch_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch:
    """Welch's two-sample t-test of mean(b) - mean(a), variances not assumed equal.

    t = diff / sqrt(s_a^2/n_a + s_b^2/n_b); df by Welch-Satterthwaite. Needs two values per side.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch_test needs at least two values per side, got {len(a)} and {len(b)}")
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    diff = mean(b) - mean(a)
    se = math.sqrt(va + vb)
    if se == 0.0:  # both sides constant: the difference is exact
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return Welch(diff, t, len(a) + len(b) - 2.0, 1.0 if diff == 0 else 0.0, diff, diff)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    return Welch(diff, t, df, p, diff - half, diff + half)


# -- the control reward ------------------------------------------------------------------------------


def random_reward(seed: int, p: float = 0.5) -> RewardFn:
    """A reward that knows nothing of the task: 1 with probability p, from a hash of (seed, prompt,
    completion), so a rerun with the same seed scores the same text the same way."""

    def reward(completion: str, sample: Mapping[str, Any]) -> float:
        key = f"{seed}\0{sample.get('id', sample.get('prompt', ''))}\0{completion}".encode()
        u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
        return float(u < p)

    reward.__name__ = "random"
    return reward


# -- runs --------------------------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    overrides: list[str]  # training options, e.g. ["--lr", "1e-3"]
    label: str = ""  # how the arm was asked for, for the table


@dataclass
class RunSpec:
    kind: str  # "sft" | "grpo"
    arm: str
    seed: int
    argv: list[str]
    out: str


def arm_overrides(spec: str) -> list[str]:
    """"lr=1e-3 beta=0.04" -> ["--lr", "1e-3", "--beta", "0.04"] (shell quoting keeps spaces in a value)."""
    argv = []
    for item in shlex.split(spec):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"arm {spec!r}: expected field=value items, got {item!r}")
        argv += ["--" + key.lstrip("-"), value]
    return argv


def _config(kind: str, argv: list[str]):
    cls = SFTConfig if kind == "sft" else GRPOConfig
    return parse_config(cls, argv)


def run_one(spec: RunSpec, threads: int = 0, log: Callable[[str], Any] | None = None,
            tail: int = 5) -> dict[str, float]:
    """Train one arm at one seed into spec.out; returns its final metrics (see `final_metrics`).

    The run's log goes to spec.out/log.txt, and to `log` (prefixed with arm and seed) when given.
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(spec.kind, [*spec.argv, "--seed", str(spec.seed), "--out", str(out)])
    with open(out / "log.txt", "a") as f:
        def run_log(line: str) -> None:
            f.write(f"{line}\n")
            f.flush()
            if log is not None:
                log(f"[{spec.arm} seed {spec.seed}] {line}")

        if spec.kind == "sft":
            train_sft(cfg, log=run_log, monitor=LiveMonitor)
        else:
            train_grpo(cfg, log=run_log, extra_rewards={"random": random_reward(spec.seed)}, monitor=LiveMonitor)
    return final_metrics(read_metrics(out), tail)


def final_metrics(rows: Sequence[Mapping[str, Any]], tail: int = 5) -> dict[str, float]:
    """The last eval row's numbers, and each train number averaged over the last `tail` train rows.

    On a name in both, the evaluation wins.
    """
    out: dict[str, float] = {}
    train = [r for r in rows if r.get("kind") == "train"][-max(tail, 1):]
    for name in {k for r in train for k in r}:
        values = [r[name] for r in train if _is_number(r.get(name))]
        if values and name not in ("step", "time"):
            out[name] = sum(values) / len(values)
    evals = [r for r in rows if r.get("kind") == "eval"]
    if evals:
        out.update({k: float(v) for k, v in evals[-1].items() if _is_number(v) and k not in ("step", "time")})
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_all(specs: Sequence[RunSpec], jobs: int = 1, *, threads: int = 0, tail: int = 5,
            log: Callable[[str], Any] = print) -> list[dict[str, float]]:
    """Final metrics of every run, in the order of `specs`; in `jobs` processes when jobs > 1, each
    with `threads` torch threads (0: cores // jobs)."""
    if jobs <= 1 or len(specs) <= 1:
        return [run_one(s, log=log, tail=tail) for s in specs]
    cores = _cores()
    if jobs > cores:
        log(f"only {cores} cores: running {cores} at a time instead of {jobs}")
    jobs = min(jobs, cores, len(specs))
    threads = threads or max(1, cores // jobs)
    log(f"running {len(specs)} runs, {jobs} at a time, {threads} torch thread(s) each")
    results: list[dict[str, float] | None] = [None] * len(specs)
    # spawn, not fork: a forked child inherits the parent's OpenMP pool, which can deadlock.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, s, threads, None, tail): i for i, s in enumerate(specs)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            log(f"done: {specs[i].arm} seed {specs[i].seed} ({specs[i].out})")
    return results  # type: ignore[return-value]


# -- the experiment ----------------------------------------------------------------------------------


@dataclass
class Experiment:
    kind: str
    base: list[str]  # training options every arm shares
    arms: list[Arm]
    seeds: list[int]
    out: Path
    jobs: int = 1
    threads: int = 0  # torch threads per parallel run; 0: cores // jobs
    metrics: list[str] | None = None  # None: the defaults of the kind, those present
    tail: int = 5
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # arm -> one dict per seed

    def specs(self) -> list[RunSpec]:
        return [RunSpec(self.kind, arm.name, seed, [*self.base, *arm.overrides],
                        str(self.out / f"{arm.name}-seed{seed}"))
                for arm in self.arms for seed in self.seeds]


DEFAULT_METRICS = {
    "sft": ["val_loss", "accuracy", "loss"],
    "grpo": ["accuracy", "avg@*", "pass@*", "reward_accuracy_mean", "reward_mean"],
}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def make_arms(kind: str, base: list[str], ab: Sequence[str] | None, control: bool) -> list[Arm]:
    """The arms asked for: "base", the two A/B arms, and "control" when asked."""
    if ab:
        names = [_safe_name(s) for s in ab]
        if len(set(names)) < len(names) or any(not n or len(n) > 40 for n in names):
            names = ["A", "B"]
        arms = [Arm(n, arm_overrides(s), s) for n, s in zip(names, ab)]
    else:
        arms = [Arm("base", [], "as configured")]
    if control:
        if kind != "grpo":
            raise ValueError("--control is defined for --kind grpo (a random reward in place of the real ones)")
        cfg = _config(kind, base)
        weights = {"random": 1.0, **{name: 0.0 for name in cfg.rewards if name != "random"}}
        table = "{" + ", ".join(f"{json.dumps(k)} = {v!r}" for k, v in weights.items()) + "}"
        arms.append(Arm("control", ["--rewards", table], "random reward"))
    return arms


def summarize(exp: Experiment) -> dict:
    """Per arm and metric: seeds' values, mean, std, 95% t-interval; comparisons with the first arm."""
    first = exp.results[exp.arms[0].name]
    names: list[str] = []
    for pattern in exp.metrics or DEFAULT_METRICS[exp.kind]:
        present = sorted({k for r in first for k in r})
        matched = [k for k in present if k == pattern or (pattern.endswith("*") and k.startswith(pattern[:-1]))]
        if exp.metrics and not matched:
            raise ValueError(f"metric {pattern!r} is not in the runs' metrics; they have {', '.join(present)}")
        names += [m for m in matched if m not in names]
    arms: dict[str, dict] = {}
    for arm in exp.arms:
        per_metric = {}
        for name in names:
            values = [r[name] for r in exp.results[arm.name] if name in r and math.isfinite(r[name])]
            if not values:
                continue
            lo, hi = t_interval(values)
            per_metric[name] = {"values": values, "n": len(values), "mean": mean(values), "std": std(values),
                                "ci95": [lo, hi]}
        arms[arm.name] = {"label": arm.label, "overrides": arm.overrides, "metrics": per_metric}
    comparisons = []
    base = exp.arms[0].name
    for arm in exp.arms[1:]:
        for name in names:
            a = arms[base]["metrics"].get(name, {}).get("values", [])
            b = arms[arm.name]["metrics"].get(name, {}).get("values", [])
            if len(a) < 2 or len(b) < 2:
                continue
            w = welch_test(a, b)
            comparisons.append({"metric": name, "a": base, "b": arm.name, "diff": w.diff, "t": w.t, "df": w.df,
                                "p": w.p, "ci95": [w.lo, w.hi], "larger_than_seed_spread": w.p < 0.05})
    return {"kind": exp.kind, "seeds": exp.seeds, "base_options": exp.base, "arms": arms,
            "comparisons": comparisons}


def format_summary(summary: dict) -> str:
    """The summary as a markdown table plus one sentence per comparison."""
    lines = ["| metric | arm | n | mean ± std | 95% CI | per seed |", "|---|---|---|---|---|---|"]
    for arm, info in summary["arms"].items():
        for name, m in info["metrics"].items():
            lo, hi = m["ci95"]
            lines.append(f"| {name} | {arm} | {m['n']} | {m['mean']:.4g} ± {m['std']:.2g} | "
                         f"[{lo:.4g}, {hi:.4g}] | {' '.join(f'{v:.4g}' for v in m['values'])} |")
    for arm, info in summary["arms"].items():
        shown = " ".join(info["overrides"]) or "(no overrides)"
        lines.append(f"\n{arm}: {info['label']} — {shown}")
    if summary["comparisons"]:
        lines.append("")
    for c in summary["comparisons"]:
        verdict = ("larger than the seed-to-seed spread" if c["larger_than_seed_spread"]
                   else "within the seed-to-seed spread")
        lines.append(f"- {c['metric']}: {c['b']} − {c['a']} = {c['diff']:+.4g} (95% CI [{c['ci95'][0]:.4g}, "
                     f"{c['ci95'][1]:.4g}], Welch t = {c['t']:.3g}, df = {c['df']:.3g}, p = {c['p']:.3g}): {verdict}")
    n = len(summary["seeds"])
    if n < 2:
        lines.append("\nOne seed per arm: no spread to compare against; use --seeds 3 or more.")
    return "\n".join(lines) + "\n"


def run_experiment(exp: Experiment, log: Callable[[str], Any] = print) -> dict:
    """Run every arm at every seed, then write and return the summary."""
    for arm in exp.arms:  # a typo in one arm should fail before hours of the other
        _config(exp.kind, [*exp.base, *arm.overrides])
    specs = exp.specs()
    for s in specs:
        if Path(s.out).exists() and any(Path(s.out).iterdir()):
            raise ValueError(f"{s.out} already holds a run; remove it or choose another --out")
    exp.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_all(specs, exp.jobs, threads=exp.threads, tail=exp.tail, log=log)
    for arm in exp.arms:
        exp.results[arm.name] = [r for s, r in zip(specs, results) if s.arm == arm.name]
    summary = summarize(exp)
    text = format_summary(summary)
    (exp.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (exp.out / "summary.md").write_text(text)
    log(f"\n{len(specs)} runs in {time.perf_counter() - t0:.0f}s; summary in {exp.out}/summary.md\n\n{text}")
    return summary


def parse_args(argv: Sequence[str]) -> Experiment:
    """The experiment's own options; every other option is a training option shared by all arms."""
    ap = argparse.ArgumentParser(prog="experiment.py", allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["sft", "grpo"], required=True)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--ab", nargs=2, metavar=("A", "B"), help='two arms, e.g. "lr=1e-3" "lr=3e-3"')
    ap.add_argument("--control", action="store_true", help="add a random-reward control arm (grpo)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per parallel run (default: cores // jobs)")
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--metrics", help="comma-separated metrics for the table (default: by kind)")
    ap.add_argument("--tail", type=int, default=5, help="train rows averaged for train metrics")
    args, rest = ap.parse_known_args(list(argv))
    if any(a == "--seed" or a.startswith("--seed=") for a in rest):
        raise ValueError("--seed belongs to the experiment: each arm runs with --seeds K seeds from --first-seed")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    return Experiment(kind=args.kind, base=rest, arms=make_arms(args.kind, rest, args.ab, args.control),
                      seeds=list(range(args.first_seed, args.first_seed + args.seeds)), out=Path(args.out),
                      jobs=args.jobs, threads=args.threads, tail=args.tail,
                      metrics=args.metrics.split(",") if args.metrics else None)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line (sys.argv[1:] when argv is None), run, and return the summary."""
    return run_experiment(parse_args(sys.argv[1:] if argv is None else argv))
