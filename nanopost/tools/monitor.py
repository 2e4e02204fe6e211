"""Training diagnostics: read a run's metrics and say, in plain words, what looks wrong and why.

    findings = diagnose(read_metrics(run_dir))
    print(format_report(findings))

Each `Finding` names a problem (`code`), how bad it is (`severity`: "error", "warning", "info"),
what it means and what to try (`message`), and the numbers it rests on (`evidence`: steps and
values), so a reader can check the claim against the curves. The checks:

    overfitting        the train signal keeps improving after the best held-out evaluation while the
                       held-out error is flat or rising (SFT: train loss vs val_loss; GRPO: the
                       accuracy reward vs held-out accuracy); advice on weight decay / KL beta / stopping
    reward_hacking     a reward component that is not the task (format, thinking, length, ...) rises
                       while accuracy (held-out, else the train accuracy reward) does not
    length_exploding   completions grow several-fold or get truncated more and more
    length_collapsing  completions shrink several-fold
    entropy_collapse   policy entropy falls to a small fraction of where it started
    kl_runaway         KL to the reference is large and still rising
    lr_too_low         the loss falls, steadily but slowly (as fast per unit of lr late as early,
                       so not converging): a higher lr would get further
    lr_too_high        loss spikes, growing noise, grad-norm bursts, a rising loss, NaN/inf (error)
    no_learning        the loss does not fall at all: suspect the data before the optimizer
    no_signal          (GRPO) most groups' rewards all agree, so most prompts teach nothing
    early_stop         (info) Prechelt's GL_alpha or UP_s fired on the held-out error: where the
                       run could have stopped, and the step with the best held-out error

A healthy run gives no warning. "early" and "late" are the first and last `window` share of the
train rows. The held-out error is
val_loss when logged, else 1 - avg@k, else 1 - accuracy. Every threshold is a field of
`Thresholds` and can be passed to `diagnose` / `LiveMonitor` by name.

`LiveMonitor` runs the same checks while training: the loop hands it every metrics row and it
prints each new finding once, and raises `should_stop` only for the codes listed in `stop_on`.
A non-finite loss or gradient norm is more than a finding: the weights are lost with it, so
the run's scaffold ends the run there (plumbing/run.py: stop_if_diverged, whatever `stop_on` says)
before anything saves them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..plumbing.run import check_stop_on

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    code: str
    severity: str  # "error" | "warning" | "info"
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Thresholds:
    """When each check fires. Shares are fractions, gains and drops as described per field."""

    window: float = 0.25  # share of the train rows that makes the "early" and the "late" window
    min_rows: int = 20  # train rows needed before any trend is judged
    smooth: int = 5  # train rows averaged for "the train signal at step s"
    min_evals: int = 3  # evaluations needed to judge the held-out curve (best + 2 after it)
    # overfitting and reward hacking
    train_gain: float = 0.05  # train improvement that counts: relative for a loss, absolute for a reward
    proxy_gain: float = 0.1  # absolute gain of a non-task reward component that counts as rising
    accuracy_gain: float = 0.02  # accuracy gain (absolute) that counts as "accuracy improved too"
    task_rewards: tuple[str, ...] = ("accuracy", "countdown")  # reward components that are the task
    hacking_rows: int = 50  # train rows before reward hacking is judged: the format is learned before
    #                         the task, so early on a rising format reward with a flat accuracy is normal
    hacking_evals: int = 2  # held-out evaluations that are enough to judge reward hacking: the start
    #                          and now say whether accuracy moved, and the train accuracy is no
    #                          substitute under a curriculum (its prompts get harder as it goes)
    # completion length, entropy, KL (GRPO)
    length_growth: float = 3.0  # late / early mean length above this: exploding
    length_shrink: float = 0.4  # late / early mean length below this: collapsing
    max_truncated: float = 0.2  # late truncated share above this (and rising): exploding
    entropy_drop: float = 0.1  # late / early mean entropy below this: collapse
    kl_max: float = 0.1  # late mean KL (nats per token) above this while rising: runaway
    max_zero_std: float = 0.8  # late share of zero-variance groups above this: no signal
    # learning rate and data (SFT loss)
    slow_drop: float = 0.1  # the loss fell less than this share from early to late window: slow
    flat_drop: float = 0.01  # ... less than this share and without a significant trend: not learning
    steady_ratio: float = 0.5  # late / early slope (per unit lr) above this: still falling at its early pace
    trend_t: float = 3.0  # |t| of a least-squares slope that counts as a real trend
    spike_window: int = 20  # rows of recent history a spike or burst is judged against
    spike_rel: float = 0.25  # a spike is this much above the recent median ...
    spike_k: float = 6.0  # ... and this many robust standard deviations above it
    max_spikes: int = 2  # spikes (or grad-norm bursts) that make a run unstable
    grad_burst: float = 5.0  # grad_norm above this multiple of the recent median: a burst
    noise_growth: float = 3.0  # late / early spread of step-to-step loss changes: noise growing
    # early stopping (Prechelt 1998)
    gl_alpha: float = 5.0  # GL(t) = 100 * (E(t) / E_opt(t) - 1) above alpha
    up_s: int = 3  # held-out error rose at s successive evaluations

    @classmethod
    def make(cls, **overrides: Any) -> Thresholds:
        """Thresholds with the named overrides; an unknown name is an error that lists close ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        for name in overrides:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
                raise ValueError(f"unknown threshold {name!r}{hint}")
        return cls(**overrides)


# -- early stopping (Prechelt, "Early Stopping — But When?", 1998) ---------------------------------


def generalization_loss(errors: Sequence[float]) -> list[float]:
    """GL(t) = 100 * (E(t) / E_opt(t) - 1), E_opt(t) the lowest error up to and including t.

    An error of 0 is perfect; once reached, any later error is an infinite relative loss.
    """
    out, best = [], math.inf
    for e in errors:
        best = min(best, e)
        if best > 0:
            out.append(100.0 * (e / best - 1.0))
        else:
            out.append(0.0 if e <= 0 else math.inf)
    return out


def gl_alpha_stop(errors: Sequence[float], alpha: float) -> int | None:
    """Index of the first evaluation where GL > alpha, or None."""
    return next((i for i, gl in enumerate(generalization_loss(errors)) if gl > alpha), None)


def up_s_stop(errors: Sequence[float], s: int) -> int | None:
    """Index of the first evaluation that ends s successive rises of the error, or None.

    Evaluations are the ends of Prechelt's strips: UP_s stops at t when E rose from the previous
    evaluation at t and at the s - 1 evaluations before it.
    """
    if s < 1:
        raise ValueError(f"up_s needs s >= 1, got {s}")
    run = 0
    for i in range(1, len(errors)):
        run = run + 1 if errors[i] > errors[i - 1] else 0
        if run >= s:
            return i
    return None


# -- series and trends ------------------------------------------------------------------------------


def _sorted(rows: Iterable[Mapping], kind: str) -> list[Mapping]:
    return sorted((r for r in rows if r.get("kind") == kind), key=lambda r: r.get("step", 0))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _column(rows: Sequence[Mapping], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that carry a number under `name`; non-finite values kept."""
    pairs = [(r.get("step", 0), _number(r.get(name))) for r in rows]
    pairs = [(s, v) for s, v in pairs if v is not None]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(values)
    return steps[ok], values[ok]


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y on x and its t statistic (inf when the fit is exact)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return 0.0, 0.0
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - slope * xc
    se = math.sqrt(float((resid * resid).sum()) / (len(x) - 2) / float((xc * xc).sum()))
    if se == 0:
        return slope, (math.inf if slope > 0 else -math.inf if slope < 0 else 0.0)
    return slope, slope / se


def _window(n: int, t: Thresholds) -> int:
    return max(3, int(round(n * t.window)))


def _mean_up_to(steps: np.ndarray, values: np.ndarray, step: float, k: int) -> float:
    """Mean of the last k values logged at or before `step`."""
    sel = values[steps <= step][-k:]
    return float(sel.mean()) if len(sel) else math.nan


def _fmt(x: Any) -> str:
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if not math.isfinite(x):
            return str(x)
        return f"{x:.3g}"
    return str(x)


def _span(steps: np.ndarray) -> str:
    return f"steps {int(steps[0])}-{int(steps[-1])}"


def _is_rl(train: Sequence[Mapping]) -> bool:
    return any("reward_mean" in r for r in train)


def _heldout_error(evals: Sequence[Mapping]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(name, steps, errors) of the held-out error: val_loss, else 1 - avg@k, else 1 - accuracy."""
    for r in evals:
        if _number(r.get("val_loss")) is not None:
            s, v = _finite(*_column(evals, "val_loss"))
            return "val_loss", s, v
    avg = sorted({k for r in evals for k in r if k.startswith("avg@")})
    name = avg[0] if avg else "accuracy"
    s, v = _finite(*_column(evals, name))
    if not len(v):
        return None
    return f"1 - {name}", s, 1.0 - v


def _peak_lr(train: Sequence[Mapping]) -> float | None:
    """The schedule's largest lr: the number a user sets, whatever warmup and decay do to it."""
    _, lr = _finite(*_column(train, "lr"))
    return float(lr.max()) if len(lr) else None


def _mean_lr(train: Sequence[Mapping], steps: np.ndarray) -> float | None:
    s, lr = _finite(*_column(train, "lr"))
    sel = lr[(s >= steps[0]) & (s <= steps[-1])]
    return float(sel.mean()) if len(sel) and sel.mean() > 0 else None


# -- the checks -------------------------------------------------------------------------------------


def _check_early_stop(evals: Sequence[Mapping], t: Thresholds) -> Finding | None:
    held = _heldout_error(evals)
    if held is None or len(held[2]) < 2:
        return None
    name, steps, errors = held
    gl_at = gl_alpha_stop(errors, t.gl_alpha)
    up_at = up_s_stop(errors, t.up_s)
    if gl_at is None and up_at is None:
        return None
    best = int(np.argmin(errors))
    gl = generalization_loss(errors)
    evidence: dict[str, Any] = {"error": name, "best_step": int(steps[best]), "best_error": float(errors[best])}
    said = []
    if gl_at is not None:
        evidence.update(gl_step=int(steps[gl_at]), gl=float(gl[gl_at]), gl_alpha=t.gl_alpha)
        said.append(f"GL_{_fmt(t.gl_alpha)} fired at step {int(steps[gl_at])} "
                    f"({name} {_fmt(errors[gl_at])}, GL = {_fmt(gl[gl_at])})")
    if up_at is not None:
        evidence.update(up_step=int(steps[up_at]), up_s=t.up_s,
                        up_errors=[float(e) for e in errors[up_at - t.up_s : up_at + 1]])
        said.append(f"UP_{t.up_s} fired at step {int(steps[up_at])} ({name} rose at {t.up_s} "
                    f"successive evaluations)")
    first = min(i for i in (gl_at, up_at) if i is not None)
    message = (f"Early stopping: {'; '.join(said)}. The held-out error was lowest at step {int(steps[best])} "
               f"({name} {_fmt(errors[best])}): stop there, or keep a checkpoint from then.")
    if best > first:
        message += (f" The error improved again after the first firing, so stopping at step "
                    f"{int(steps[first])} would have been early: use a larger alpha or s for this run's noise.")
    return Finding("early_stop", "info", message, evidence)


def _check_overfitting(train: Sequence[Mapping], evals: Sequence[Mapping], t: Thresholds) -> Finding | None:
    held = _heldout_error(evals)
    if held is None or len(held[2]) < t.min_evals:
        return None
    name, esteps, errors = held
    best = int(np.argmin(errors))
    if len(errors) - 1 - best < t.min_evals - 1:
        return None  # too few evaluations after the best one to call the held-out curve flat
    rl = _is_rl(train)
    if rl:
        signal = next((f"reward_{n}_mean" for n in t.task_rewards if any(f"reward_{n}_mean" in r for r in train)),
                      "reward_mean")
    else:
        signal = "loss"
    steps, values = _finite(*_column(train, signal))
    if len(values) < t.min_rows:
        return None
    s_best, s_last = esteps[best], esteps[-1]
    at_best = _mean_up_to(steps, values, s_best, t.smooth)
    at_end = _mean_up_to(steps, values, s_last, t.smooth)
    if rl:
        gain, shown = at_end - at_best, f"rose from {_fmt(at_best)} to {_fmt(at_end)}"
    else:
        gain = (at_best - at_end) / abs(at_best) if at_best else 0.0
        shown = f"fell {gain:.0%}, from {_fmt(at_best)} to {_fmt(at_end)}"
    if not gain > t.train_gain:
        return None
    gl_last = generalization_loss(errors)[-1]
    evidence = {"train_metric": signal, "heldout_error": name, "best_step": int(s_best), "last_step": int(s_last),
                f"train_{signal}_at_best": at_best, f"train_{signal}_at_end": at_end,
                "heldout_error_at_best": float(errors[best]), "heldout_error_at_end": float(errors[-1]),
                "heldout_steps": [int(s) for s in esteps[best:]],
                "heldout_errors": [float(e) for e in errors[best:]], "gl_at_end": gl_last}
    advice = ("Regularise: raise the KL coefficient (beta, e.g. 0.01-0.04) or lower the lr, use more or more "
              "varied prompts, and keep the best evaluation's checkpoint." if rl else
              "Regularise: raise weight_decay (e.g. 0.1), train fewer epochs or stop at the best step, "
              "add data; the checkpoint 'best' holds the lowest val_loss.")
    message = (f"Overfitting: after step {int(s_best)}, where the held-out error was lowest ({name} "
               f"{_fmt(errors[best])}), the train {signal} {shown} by step {int(s_last)} while the held-out "
               f"error did not improve ({name} {_fmt(errors[-1])}, GL = {_fmt(gl_last)}). {advice}")
    return Finding("overfitting", "warning", message, evidence)


def _reward_components(train: Sequence[Mapping]) -> list[str]:
    names = {k[len("reward_"):-len("_mean")] for r in train for k in r
             if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"}
    return sorted(names)


def _early_late(steps: np.ndarray, values: np.ndarray, t: Thresholds) -> tuple[float, float, np.ndarray, np.ndarray]:
    w = _window(len(values), t)
    return float(values[:w].mean()), float(values[-w:].mean()), steps[:w], steps[-w:]


def _check_reward_hacking(train: Sequence[Mapping], evals: Sequence[Mapping], t: Thresholds) -> Finding | None:
    proxies = [n for n in _reward_components(train) if n not in t.task_rewards and n != "overlong"]
    rising = {}
    for n in proxies:
        s, v = _finite(*_column(train, f"reward_{n}_mean"))
        if len(v) >= max(t.min_rows, t.hacking_rows):
            early, late, _, _ = _early_late(s, v, t)
            if late - early > t.proxy_gain:
                rising[n] = (early, late, s)
    if not rising:
        return None
    es, acc = _finite(*_column(evals, "accuracy"))
    if len(acc) >= t.hacking_evals:
        w = max(1, int(round(len(acc) * t.window)))
        acc_name, acc_early, acc_late = "held-out accuracy", float(acc[:w].mean()), float(acc[-w:].mean())
    else:
        task = next((n for n in t.task_rewards if n in _reward_components(train)), None)
        if task is None:
            return None  # nothing measures the task, so nothing to compare the proxies with
        s, v = _finite(*_column(train, f"reward_{task}_mean"))
        if len(v) < t.min_rows:
            return None
        acc_name = f"train reward_{task}_mean"
        acc_early, acc_late, _, _ = _early_late(s, v, t)
    if acc_late - acc_early > t.accuracy_gain:
        return None
    parts = [f"reward_{n}_mean {_fmt(e)} -> {_fmt(l)}" for n, (e, l, _) in rising.items()]
    steps = next(iter(rising.values()))[2]
    evidence: dict[str, Any] = {f"reward_{n}_mean": [e, l] for n, (e, l, _) in rising.items()}
    evidence.update({"accuracy_metric": acc_name, "accuracy": [acc_early, acc_late],
                     "steps": [int(steps[0]), int(steps[-1])]})
    message = (f"Reward hacking: the reward grew through {', '.join(rising)} ({'; '.join(parts)}, "
               f"{_span(steps)}, early vs late window) while {acc_name} did not ({_fmt(acc_early)} -> "
               f"{_fmt(acc_late)}). The policy is learning the proxy, not the task: lower the weight of "
               f"{', '.join(rising)} (or anneal it away once the format is learned), check the reward "
               f"cannot be met without a correct answer, and read some completions.")
    return Finding("reward_hacking", "warning", message, evidence)


def _check_length(train: Sequence[Mapping], t: Thresholds) -> Finding | None:
    s, v = _finite(*_column(train, "len_mean"))
    if len(v) < t.min_rows:
        return None
    early, late, _, _ = _early_late(s, v, t)
    ratio = late / early if early > 0 else math.inf
    evidence: dict[str, Any] = {"len_mean": [early, late], "steps": [int(s[0]), int(s[-1])], "ratio": ratio}
    ts, tv = _finite(*_column(train, "truncated_frac"))
    trunc_early = trunc_late = None
    if len(tv) >= t.min_rows:
        trunc_early, trunc_late, _, _ = _early_late(ts, tv, t)
        evidence["truncated_frac"] = [trunc_early, trunc_late]
    for name in ("len_correct", "len_wrong"):
        _, cv = _finite(*_column(train, name))
        if len(cv):
            evidence[f"{name}_late"] = float(cv[-_window(len(cv), t):].mean())
    # truncation that is high and still climbing (a constant 25% may be the task's long tail)
    truncating = trunc_late is not None and trunc_late > t.max_truncated and trunc_late > trunc_early + 0.05
    if ratio > t.length_growth or truncating:
        msg = f"Completion length is exploding: mean length {_fmt(early)} -> {_fmt(late)} tokens (x{_fmt(ratio)}, "
        msg += f"{_span(s)})"
        if trunc_late is not None:
            msg += f", truncated {trunc_early:.0%} -> {trunc_late:.0%}"
        if "len_correct_late" in evidence and "len_wrong_late" in evidence:
            msg += (f"; late, correct answers average {_fmt(evidence['len_correct_late'])} tokens and wrong ones "
                    f"{_fmt(evidence['len_wrong_late'])}")
        msg += (". If the extra length does not buy accuracy, penalise it (overlong_buffer), mask truncated "
                "completions (overlong_filter), or check a thinking/length reward is not paying for words.")
        return Finding("length_exploding", "warning", msg, evidence)
    if ratio < t.length_shrink:
        msg = (f"Completion length is collapsing: mean length {_fmt(early)} -> {_fmt(late)} tokens "
               f"(x{_fmt(ratio)}, {_span(s)}). The policy may have dropped its reasoning: check the format "
               "and thinking rewards, the loss aggregation (per-sequence means favour short correct answers, "
               "Dr. GRPO), and read some completions.")
        return Finding("length_collapsing", "warning", msg, evidence)
    return None


def _check_entropy(train: Sequence[Mapping], t: Thresholds) -> Finding | None:
    s, v = _finite(*_column(train, "entropy"))
    if len(v) < t.min_rows:
        return None
    early, late, _, _ = _early_late(s, v, t)
    if early > 0 and late < t.entropy_drop * early:
        msg = (f"Entropy collapse: policy entropy fell from {_fmt(early)} to {_fmt(late)} nats per token "
               f"({_span(s)}, early vs late window). Samples of a group become identical and stop teaching: "
               "raise clip_high (clip-higher, e.g. 0.28), raise the sampling temperature, or lower the lr.")
        return Finding("entropy_collapse", "warning", msg,
                       {"entropy": [early, late], "steps": [int(s[0]), int(s[-1])]})
    return None


def _check_kl(train: Sequence[Mapping], t: Thresholds) -> Finding | None:
    s, v = _finite(*_column(train, "kl"))
    if len(v) < t.min_rows:
        return None
    early, late, _, ls = _early_late(s, v, t)
    w = _window(len(v), t)
    _, t_stat = _slope(ls, v[-w:])
    if late > t.kl_max and t_stat > t.trend_t:
        msg = (f"KL is running away: KL to the reference rose from {_fmt(early)} to {_fmt(late)} nats per token "
               f"and is still rising ({_span(s)}). Raise beta, lower the lr, or reset the reference "
               "(ref_reset_every).")
        return Finding("kl_runaway", "warning", msg,
                       {"kl": [early, late], "steps": [int(s[0]), int(s[-1])], "late_slope_t": t_stat})
    return None


def _check_zero_std(train: Sequence[Mapping], t: Thresholds) -> Finding | None:
    s, v = _finite(*_column(train, "zero_std_frac"))
    if len(v) < t.min_rows:
        return None
    _, late, _, ls = _early_late(s, v, t)
    if late > t.max_zero_std:
        msg = (f"Little learning signal: in {late:.0%} of the groups every completion got the same reward "
               f"(late window, steps {int(ls[0])}-{int(ls[-1])}), so their advantages are zero. The prompts are "
               "too hard or too easy for the model, or the reward never varies: check the reward on a few "
               "completions, use a curriculum, or dynamic_sampling=refill.")
        return Finding("no_signal", "warning", msg, {"zero_std_frac_late": late, "steps": [int(ls[0]), int(ls[-1])]})
    return None


def _spikes(values: np.ndarray, t: Thresholds) -> list[int]:
    """Indices whose value jumps well above the median of the preceding spike_window values."""
    m = t.spike_window
    if len(values) <= m:
        return []
    hist = np.lib.stride_tricks.sliding_window_view(values[:-1], m)  # [n - m, m]: the m values before i
    med = np.median(hist, axis=1)
    mad = 1.4826 * np.median(np.abs(hist - med[:, None]), axis=1)
    cur = values[m:]
    hit = (cur > med * (1 + t.spike_rel)) & (cur > med + t.spike_k * mad)
    return [int(i) + m for i in np.nonzero(hit)[0]]


def _bursts(values: np.ndarray, t: Thresholds) -> list[int]:
    """Indices whose value exceeds grad_burst times the median of the preceding spike_window values."""
    m = t.spike_window
    if len(values) <= m:
        return []
    hist = np.lib.stride_tricks.sliding_window_view(values[:-1], m)
    med = np.median(hist, axis=1)
    return [int(i) + m for i in np.nonzero(values[m:] > t.grad_burst * med)[0]]


def _non_finite(train: Sequence[Mapping]) -> tuple[int, str, float] | None:
    for r in train:
        for name in ("loss", "grad_norm", "reward_mean", "kl"):
            v = _number(r.get(name))
            if v is not None and not math.isfinite(v):
                return int(r.get("step", 0)), name, v
    return None


def _check_instability(train: Sequence[Mapping], t: Thresholds) -> Finding | None:
    lr = _peak_lr(train)
    lower = f"Lower the learning rate (lr {_fmt(lr)}: try {_fmt(lr / 3)})" if lr else "Lower the learning rate"
    lower += ", lengthen the warmup and keep clip_grad on."
    bad = _non_finite(train)
    if bad is not None:
        step, name, v = bad
        msg = (f"Training diverged: {name} became {v} at step {step}. {lower} NaN can also come from a "
               "bad batch or from low precision overflowing (try --precision fp32 to tell them apart).")
        return Finding("lr_too_high", "error", msg, {"step": step, "metric": name, "value": str(v)})
    signs: list[str] = []
    evidence: dict[str, Any] = {}
    if not _is_rl(train):  # a policy loss hovers around 0 and changes sign: spikes mean nothing there
        s, v = _finite(*_column(train, "loss"))
        if len(v) >= t.min_rows:
            spikes = _spikes(v, t)
            if len(spikes) >= t.max_spikes:
                evidence["spike_steps"] = [int(s[i]) for i in spikes]
                evidence["spike_losses"] = [float(v[i]) for i in spikes]
                shown = ", ".join(f"{int(s[i])} ({_fmt(v[i])})" for i in spikes[:5])
                signs.append(f"{len(spikes)} loss spikes (steps {shown}{', ...' if len(spikes) > 5 else ''})")
            d = np.diff(v)
            w = _window(len(d), t)
            spread = [1.4826 * float(np.median(np.abs(x - np.median(x)))) for x in (d[:w], d[-w:])]
            if spread[0] > 0 and spread[1] > t.noise_growth * spread[0]:
                evidence["loss_change_spread"] = spread
                signs.append(f"step-to-step loss noise grew x{_fmt(spread[1] / spread[0])} "
                             f"({_fmt(spread[0])} -> {_fmt(spread[1])})")
            early, late, _, ls = _early_late(s, v, t)
            _, t_late = _slope(ls, v[-len(ls):])
            if late > early and t_late > t.trend_t:
                evidence["loss_early_late"] = [early, late]
                signs.append(f"the loss is rising ({_fmt(early)} early, {_fmt(late)} late)")
    gs, gv = _finite(*_column(train, "grad_norm"))
    if len(gv) >= t.min_rows:
        bursts = _bursts(gv, t)
        if len(bursts) >= t.max_spikes:
            evidence["grad_burst_steps"] = [int(gs[i]) for i in bursts]
            evidence["grad_burst_norms"] = [float(gv[i]) for i in bursts]
            signs.append(f"{len(bursts)} grad-norm bursts above {_fmt(t.grad_burst)}x the recent median "
                         f"(steps {', '.join(str(int(gs[i])) for i in bursts[:5])})")
    if not signs:
        return None
    return Finding("lr_too_high", "warning", f"Training is unstable: {'; '.join(signs)}. {lower}", evidence)


def _check_progress(train: Sequence[Mapping], t: Thresholds) -> Finding | None:
    """Too slow (lr_too_low) or no progress at all (no_learning), from the SFT loss."""
    if _is_rl(train):
        return None
    s, v = _finite(*_column(train, "loss"))
    ts, tokens = _finite(*_column(train, "loss_tokens"))
    if len(tokens) and (tokens == 0).any():
        step = int(ts[np.argmax(tokens == 0)])
        msg = (f"No loss tokens: step {step} trained on 0 tokens. The loss mask is empty: check that the data "
               "has assistant replies, that they survive max_len truncation, and the chat template.")
        return Finding("no_learning", "warning", msg, {"step": step, "loss_tokens": 0})
    if len(v) < t.min_rows:
        return None
    if not v.any():
        msg = (f"The loss is exactly 0 at every step ({_span(s)}): no token is trained. Check the loss mask "
               "(assistant replies present, not cut by max_len) and the chat template.")
        return Finding("no_learning", "warning", msg, {"steps": [int(s[0]), int(s[-1])], "loss": 0.0})
    early, late, es, ls = _early_late(s, v, t)
    if late < 1e-3:
        return None  # learned what there is to learn
    drop = (early - late) / abs(early) if early else 0.0
    _, t_all = _slope(s, v)
    w = _window(len(v), t)
    evidence = {"loss_early": early, "loss_late": late, "relative_drop": drop,
                "steps": [int(s[0]), int(s[-1])], "slope_t": t_all, "lr": _peak_lr(train)}
    if t_all < -t.trend_t and drop < t.slow_drop:
        early_slope, _ = _slope(es, v[:w])
        late_slope, _ = _slope(ls, v[-w:])
        # Progress per unit of lr: a decaying schedule slows the loss on purpose, which is not convergence.
        lr_early, lr_late = _mean_lr(train, es), _mean_lr(train, ls)
        per_lr = lr_early is not None and lr_late is not None
        pace_early = early_slope / lr_early if per_lr else early_slope
        pace_late = late_slope / lr_late if per_lr else late_slope
        if pace_early < 0 and pace_late <= t.steady_ratio * pace_early:  # both negative
            lr = evidence["lr"]
            evidence.update(early_slope=early_slope, late_slope=late_slope)
            pace = "loss change per step per unit of lr" if per_lr else "loss change per step"
            msg = (f"Learning is slow: the loss fell only {drop:.1%} ({_fmt(early)} -> {_fmt(late)}, {_span(s)}) "
                   f"and is still falling at its early pace ({pace}: {_fmt(pace_late)} late vs {_fmt(pace_early)} "
                   f"early), so it is far from converged. The learning rate is likely too low"
                   f"{f' (lr {_fmt(lr)}): try {_fmt(3 * lr)} to {_fmt(10 * lr)}' if lr else ''}, "
                   "or find one with scripts/lr_find.py.")
            return Finding("lr_too_low", "warning", msg, evidence)
    if abs(t_all) < t.trend_t and drop < t.flat_drop:
        msg = (f"The loss is not decreasing: {_fmt(early)} early, {_fmt(late)} late ({_span(s)}), no trend "
               f"(t = {_fmt(t_all)}). Suspect the training data before the optimizer: check that the loss mask "
               "covers the answer tokens (decode the masked tokens of one batch), that labels are the inputs "
               "shifted by one, that the chat template matches the model, that answers are not cut by max_len, "
               "and that the model can overfit 8 examples; only then try a higher lr."
               + (" Note: the learning rate is 0." if evidence["lr"] == 0 else ""))
        return Finding("no_learning", "warning", msg, evidence)
    return None


# -- public API -------------------------------------------------------------------------------------


def diagnose(rows: Sequence[Mapping[str, Any]], **thresholds: Any) -> list[Finding]:
    """Every finding about a run's metrics rows (see the module docstring), worst first."""
    t = Thresholds.make(**thresholds)
    train, evals = _sorted(rows, "train"), _sorted(rows, "eval")
    instability = _check_instability(train, t)
    checks = [
        instability,
        None if instability else _check_progress(train, t),  # a diverging loss says nothing about the data
        _check_overfitting(train, evals, t),
        _check_reward_hacking(train, evals, t),
        _check_length(train, t),
        _check_entropy(train, t),
        _check_kl(train, t),
        _check_zero_std(train, t),
        _check_early_stop(evals, t),
    ]
    findings = [f for f in checks if f is not None]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def format_finding(f: Finding) -> str:
    lines = [f"[{f.severity}] {f.code}: {f.message}"]
    if f.evidence:
        lines.append("    evidence: " + ", ".join(f"{k} {_show(v)}" for k, v in f.evidence.items()))
    return "\n".join(lines)


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return _fmt(v)


def too_few_rows(rows: Sequence[Mapping[str, Any]], min_rows: int = Thresholds.min_rows) -> int | None:
    """The number of train rows when it is below `min_rows`, which the trend checks need; else None."""
    n = sum(r.get("kind") == "train" for r in rows)
    return n if n < min_rows else None


def format_report(findings: Sequence[Finding], *, rows: Sequence[Mapping[str, Any]] | None = None,
                  min_rows: int = Thresholds.min_rows) -> str:
    """The findings as plain text, one paragraph each; a clean run says so.

    Given the run's `rows`, a run with no problem found but fewer than `min_rows` train rows says
    that there are too few rows to judge (with the count) instead: no finding there means nothing.
    """
    problems = [f for f in findings if f.severity != "info"]
    few = too_few_rows(rows, min_rows) if rows is not None else None
    if problems:
        head = f"{len(problems)} problem(s) found."
    elif few is not None:
        head = f"Too few rows to judge: {few} train row(s), and the checks need at least {min_rows}."
    else:
        head = "No problems found."
    notes = len(findings) - len(problems)
    if notes:
        head += f" {notes} note(s)."
    return "\n\n".join([head, *(format_finding(f) for f in findings)]) + "\n"


class LiveMonitor:
    """The diagnostics during a run: call `observe(row)` with every metrics row the loop logs.

    Each finding is reported once (through `log`, and in observe's return value), the first time
    it shows. The run goes on unless a finding's code is in `stop_on`; then `should_stop` turns
    True and `stop_reason` holds the finding, for the loop to break out after its checkpoint.
    The full diagnosis runs on every eval row and every `every` train rows; a non-finite loss or
    gradient norm is reported on the row it appears in. A resumed run passes the rows logged so
    far as `history`: they count for the trends, and what they already showed is not reported again.
    """

    def __init__(self, *, stop_on: Iterable[str] = (), every: int = 10,
                 log: Callable[[str], Any] | None = print, history: Sequence[Mapping[str, Any]] = (),
                 **thresholds: Any):
        self.thresholds = dataclasses.asdict(Thresholds.make(**thresholds))
        self.stop_on = check_stop_on(stop_on)
        self.every = max(1, every)
        self.log = log
        self.rows: list[dict] = [dict(r) for r in history]
        self.reported: set[str] = {f.code for f in diagnose(self.rows, **self.thresholds)} if self.rows else set()
        self.stop_reason: Finding | None = None
        self._train_rows = sum(r.get("kind") == "train" for r in self.rows)

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def observe(self, row: Mapping[str, Any]) -> list[Finding]:
        """Record one row; returns the findings that are new with it."""
        self.rows.append(dict(row))
        due = row.get("kind") == "eval"
        if row.get("kind") == "train":
            self._train_rows += 1
            due = due or self._train_rows % self.every == 0
            due = due or any(_number(row.get(k)) is not None and not math.isfinite(row[k])
                             for k in ("loss", "grad_norm", "reward_mean", "kl"))
        if not due:
            return []
        new = [f for f in diagnose(self.rows, **self.thresholds) if f.code not in self.reported]
        for f in new:
            self.reported.add(f.code)
            if self.log is not None:
                self.log(f"monitor at step {row.get('step')}: " + format_finding(f))
            if f.code in self.stop_on and self.stop_reason is None:
                self.stop_reason = f
        return new
