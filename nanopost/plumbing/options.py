"""The options of the two training entry points, and the checks that need nothing but the options.

    SFTConfig                        scripts/sft.py: SFTOptions, then RunOptions
    GRPOConfig (nanopost.grpo_loop)  scripts/grpo.py: GRPOOptions, then RunOptions; it gives the task
                                     names and adds the temperature schedule's check of its stages,
                                     which need the core (the plumbing does not import it)
    Stage                            a curriculum stage, as --curriculum-stages tables give them

RunOptions are the options every run has with the same meaning and default; an option whose
default differs between SFT and GRPO (out, lr, log_every, ...) is declared by each. A config
names RunOptions as its first base: dataclasses collect fields from the last base to the first,
so a run's own options come first in --help and in the saved config, and the shared ones last.

`validate()` runs when a config is parsed (plumbing/config.py), so a bad value is refused before
anything is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence

from .chat_template import CHAT_FORMAT_HELP, ChatFormatName
from .config import is_finite, require
from .data_files import is_number
from .run import check_stop_on
from .runtime import pick_device
from .user_rewards import parse_spec


@dataclass
class RunOptions:
    """Where the run starts its randomness, what it runs on, what stops it, and how it treats --out."""

    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun: shard weights, gradients and optimizer state over ranks (FSDP2) instead of DDP"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block's activations in the backward instead of storing them: "
                "one more forward per block for much less activation memory"})
    stop_on: list[str] = field(default_factory=list, metadata={
        "help": "monitor findings that end the run early, e.g. early_stop,lr_too_high (nanopost.tools.monitor)"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --out from its latest checkpoint (its options must match; see --resume-override)"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh in an --out that holds a run, removing its metrics.jsonl, checkpoints/ and config"})
    resume_override: list[str] = field(default_factory=list, metadata={
        "help": "options --resume may change although they change what the run means, e.g. lr,train"})


def check_training_options(cfg) -> None:
    """Range checks of the options SFT and GRPO share (learning rate, AdamW, logging, device)."""
    require(
        ("--lr", cfg.lr, is_finite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
        ("--min-lr-ratio", cfg.min_lr_ratio, 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        # A warmup longer than the run is not refused: lr_at caps it at the run's length (a short
        # trial run with the default warmup is common), so the lr then rises over the whole run.
        ("--warmup-steps", cfg.warmup_steps, cfg.warmup_steps >= 0, ">= 0"),
        ("--weight-decay", cfg.weight_decay, is_finite(cfg.weight_decay) and cfg.weight_decay >= 0,
         "a finite number >= 0"),
        ("--betas", ",".join(map(str, cfg.betas)), all(0 <= b < 1 for b in cfg.betas), "two numbers in [0, 1)"),
        ("--clip-grad", cfg.clip_grad, cfg.clip_grad > 0, "> 0 (0 would zero every gradient; inf: no clipping)"),
        ("--eval-every", cfg.eval_every, cfg.eval_every >= 0, ">= 0 (0: evaluate only at the end)"),
        ("--save-every", cfg.save_every, cfg.save_every >= 0, ">= 0"),
        ("--log-every", cfg.log_every, cfg.log_every >= 1, ">= 1"),
    )
    pick_device(cfg.device)


# ---------------------------------------------------------------- SFT


@dataclass
class SFTOptions:
    """What an SFT run is asked besides the RunOptions."""

    model: str = field(default="", metadata={"help": "HF checkpoint directory to start from"})
    train: str = field(default="", metadata={"help": "training JSONL: {messages} or {prompt, completion}; {text} with --format text"})
    val: str | None = field(default=None, metadata={"help": "held-out JSONL (loss and answer accuracy)"})
    out: str = field(default="runs/sft", metadata={"help": "run directory"})
    format: Literal["chat", "text"] = field(default="chat", metadata={
        "help": "chat: loss on assistant replies; text: plain documents, loss on every token (pretraining)"})
    chat_format: ChatFormatName | None = field(default=None, metadata={"help": CHAT_FORMAT_HELP})
    max_len: int = field(default=512, metadata={"help": "tokens per packed row (longer examples: see overflow)"})
    overflow: Literal["truncate", "drop"] = "truncate"
    batch_rows: int = field(default=8, metadata={"help": "packed rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: float = 1.0
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0: from epochs"})
    max_seconds: float = field(default=0.0, metadata={
        "help": "stop after this much training time (0: no limit); e.g. a control arm at equal compute"})
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = field(default=10, metadata={
        "help": "steps of linear lr warmup (one longer than the run is cut to the run)"})
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 1.0
    eval_every: int = field(default=50, metadata={"help": "steps between held-out evaluations (0: only at the end)"})
    eval_accuracy_samples: int = field(default=64, metadata={"help": "held-out prompts for greedy accuracy"})
    max_new_tokens: int = 128
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: at evals and the end)"})
    log_every: int = 10


@dataclass
class SFTConfig(RunOptions, SFTOptions):
    """Every option of an SFT run (`--help` lists them with their defaults)."""

    def validate(self) -> None:
        check_stop_on(self.stop_on)  # at parse time, before any model is loaded
        if not self.model or not self.train:
            raise ValueError("--model and --train are required")
        check_training_options(self)
        require(
            ("--max-len", self.max_len, self.max_len >= 2, ">= 2 (an input token and its label)"),
            ("--batch-rows", self.batch_rows, self.batch_rows >= 1, ">= 1"),
            ("--grad-accum", self.grad_accum, self.grad_accum >= 1, ">= 1"),
            ("--max-steps", self.max_steps, self.max_steps >= 0, ">= 0 (0: as many as --epochs take)"),
            # With --max-steps 0 the epochs decide the length: 0 would still run one step.
            ("--epochs", self.epochs, self.max_steps > 0 or (is_finite(self.epochs) and self.epochs > 0),
             "a finite number > 0 (or give --max-steps)"),
            ("--max-seconds", self.max_seconds, self.max_seconds >= 0, ">= 0 (0: no time limit)"),
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("--eval-accuracy-samples", self.eval_accuracy_samples, not self.val or self.eval_accuracy_samples >= 1,
             ">= 1 with --val"),
        )


# ---------------------------------------------------------------- GRPO


# What --importance gives clip_low, clip_high and agg when they are left unset (None):
# token level, DAPO's clip-higher and token mean; sequence level (GSPO, arXiv 2507.18071), the
# paper's clip range, sized for a length-normalised ratio that stays within ~1e-3 of 1, and the
# per-sequence mean its objective is written with (verl forces it for GSPO).
IMPORTANCE_DEFAULTS = {"token": (0.2, 0.28, "token-mean"), "sequence": (3e-4, 4e-4, "seq-mean-token-mean")}


@dataclass
class GRPOOptions:
    """What a GRPO run is asked besides the RunOptions; nanopost.grpo_loop.GRPOConfig joins the two.

    clip_low, clip_high and agg default to None, "the default of the importance level": 0.2 /
    0.28 / token-mean for --importance token, 3e-4 / 4e-4 / seq-mean-token-mean for sequence
    (IMPORTANCE_DEFAULTS). A token-level clip range of 0.2 around GSPO's sequence ratio clips
    almost nothing, so a fixed default would silently be wrong for one of the two. None is
    resolved when the config is built (so the saved config.json shows the values used); a value
    given explicitly, on the command line, in a file or to the constructor, is always kept.
    """

    task_names: ClassVar[tuple[str, ...]] = ()  # what --task may name: GRPOConfig gives the core's tasks

    model: str = field(default="", metadata={"help": "HF checkpoint directory of the policy to start from"})
    train: str = field(default="", metadata={"help": "RL JSONL: {prompt|question, answer, difficulty?, id?}"})
    val: str | None = field(default=None, metadata={"help": "held-out RL JSONL for accuracy"})
    out: str = "runs/grpo"
    task: str | None = field(default=None, metadata={
        "help": "arithmetic | countdown | gsm8k: the task's answer check, for eval and as the `accuracy` reward"})
    chat_format: ChatFormatName | None = field(default=None, metadata={"help": CHAT_FORMAT_HELP})
    # prompt
    instruction: str = "Solve the problem."
    system: str | None = None
    reasoning: bool = field(default=True, metadata={"help": "ask for <think>...</think> before <answer>...</answer>"})
    # rewards
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1},
                                      metadata={"help": "reward name -> weight (accuracy, format, thinking, countdown)"})
    reward_mode: Literal["sum", "normalize_each"] = "sum"
    reward_models: dict[str, str] = field(default_factory=dict, metadata={
        "help": "name -> reward model directory; each is a reward usable in --rewards"})
    rm_ensemble: Literal["none", "mean", "min", "mean_minus_std"] = field(default="none", metadata={
        "help": "combine all reward models into one reward named 'rm' (members logged)"})
    rm_ensemble_lambda: float = 1.0
    rm_ensemble_normalize: Literal["group", "none"] = field(default="group", metadata={
        "help": "group: standardise each member's scores over the completions of each prompt before "
                "combining, so no member dominates by its scale (members are logged raw); none: raw scores"})
    reward_fn: list[str] = field(default_factory=list, metadata={"repeat": True, "help": (
        "a reward of your own, (completion, record) -> float, logged under its name; repeatable: "
        "module:function or path/file.py:function, optionally =weight (nanopost/user_rewards.py)")})
    # curriculum (nanopost/curriculum.py)
    curriculum: Literal["uniform", "staged", "learnability", "band"] = field(default="uniform", metadata={
        "help": "prompt sampling: uniform (a shuffle per epoch); staged (--curriculum-stages, uniform within a "
                "stage); learnability (weight p(1-p) of the online pass rate); band (pass rate inside "
                "--curriculum-band)"})
    curriculum_stages: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": 'TOML array of stages, e.g. "[{until = 0.5, levels = [1, 3], temperature = 0.8}, {until = 1.0}]"; '
                "keys: until, levels, min_difficulty, max_difficulty, quantiles, temperature, group_size"})
    curriculum_mix_previous: float = field(default=0.2, metadata={
        "help": "share of each step's prompts drawn from earlier stages"})
    curriculum_band: tuple[float, float] = field(default=(0.0, 1.0), metadata={
        "help": "band: draw prompts whose pass rate is strictly inside (lo, hi)"})
    curriculum_floor: float = field(default=0.01, metadata={"help": "learnability: the least weight of a prompt"})
    curriculum_explore: float = field(default=0.25, metadata={"help": "learnability: weight of a prompt not yet tried"})
    curriculum_retire: float | None = field(default=None, metadata={
        "help": "retire a prompt whose pass rate exceeds this after --curriculum-retire-min-tries groups"})
    curriculum_retire_min_tries: int = 3
    # rollouts
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    temperature_end: float | None = field(default=None, metadata={"help": "end value for linear/cosine schedules"})
    temperature_schedule: Literal["constant", "linear", "cosine", "stages"] = "constant"
    temperature_stages: list[tuple[float, float]] = field(default_factory=list,
                                                          metadata={"help": "[[boundary, T], ...] for 'stages'"})
    top_p: float = 1.0
    top_k: int = 0
    dynamic_sampling: Literal["off", "drop", "refill"] = "drop"
    max_refill_rounds: int = 2
    overlong_filter: bool = field(default=False, metadata={"help": "mask truncated completions out of the loss"})
    overlong_buffer: int = field(default=0, metadata={"help": "DAPO soft length penalty over the last N tokens (0: off)"})
    overlong_penalty: float = field(default=1.0, metadata={
        "help": "weight of that penalty, a reward term named 'overlong' in [-1, 0] combined with the "
                "others by --reward-mode (normalize_each standardises it per group like them)"})
    # loss
    adv_scale: Literal["group", "batch", "none"] = "group"
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = field(default=None, metadata={
        "help": "loss aggregation (none: token-mean, or seq-mean-token-mean with --importance sequence)"})
    clip_low: float | None = field(default=None, metadata={
        "help": "lower clip range (none: 0.2, or 3e-4 with --importance sequence)"})
    clip_high: float | None = field(default=None, metadata={
        "help": "upper clip range (none: 0.28, clip-higher, or 4e-4 with --importance sequence)"})
    dual_clip: float | None = None
    importance: Literal["token", "sequence"] = field(default="token", metadata={
        "help": "token: per-token ratio; sequence: GSPO's length-normalised sequence ratio, with GSPO's "
                "clip range and aggregation unless --clip-low/--clip-high/--agg are given"})
    beta: float = 0.0
    kl: Literal["k1", "k2", "k3"] = "k3"
    ref_reset_every: int = 0
    mu: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass"})
    micro_batch: int = field(default=0, metadata={"help": "rows per forward/backward (0: the whole mini-batch)"})
    # optimizer
    lr: float = 1e-5
    warmup_steps: int = field(default=0, metadata={
        "help": "steps of linear lr warmup (one longer than the run is cut to the run)"})
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    clip_grad: float = 1.0
    # evaluation, logging, checkpoints
    eval_every: int = 20
    eval_samples: int = 200
    eval_k: int = field(default=0, metadata={"help": "avg@k samples per prompt at eval_temperature (0: greedy only)"})
    eval_temperature: float = 1.0
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: at evals and the end)"})
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_DEFAULTS:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_DEFAULTS)}, got {self.importance!r}")
        low, high, agg = IMPORTANCE_DEFAULTS[self.importance]
        self.clip_low = low if self.clip_low is None else self.clip_low
        self.clip_high = high if self.clip_high is None else self.clip_high
        self.agg = agg if self.agg is None else self.agg

    def validate(self) -> None:
        """The checks the options decide alone (of a GRPOConfig: the RunOptions' are read too)."""
        check_stop_on(self.stop_on)  # at parse time, before any model is loaded
        if not self.model or not self.train:
            raise ValueError("--model and --train are required")
        if self.group_size < 2:
            raise ValueError("--group-size must be >= 2: advantages compare completions of the same prompt")
        if not self.rewards:
            raise ValueError("at least one reward is needed")
        check_training_options(self)
        rows = self.prompts_per_step * self.group_size  # the rows one step trains on (before dropping groups)
        require(
            ("--steps", self.steps, self.steps >= 1, ">= 1"),
            ("--prompts-per-step", self.prompts_per_step, self.prompts_per_step >= 1, ">= 1"),
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("--top-k", self.top_k, self.top_k >= 0, ">= 0 (0: off)"),
            ("--max-refill-rounds", self.max_refill_rounds, self.max_refill_rounds >= 0, ">= 0"),
            ("--overlong-buffer", self.overlong_buffer, 0 <= self.overlong_buffer <= self.max_new_tokens,
             f"in [0, --max-new-tokens {self.max_new_tokens}]"),
            ("--overlong-penalty", self.overlong_penalty,
             is_finite(self.overlong_penalty) and self.overlong_penalty >= 0, "a finite number >= 0"),
            ("--clip-low", self.clip_low, 0 <= self.clip_low < 1,
             "in [0, 1): the ratio is clipped below at 1 - clip_low"),
            ("--clip-high", self.clip_high, is_finite(self.clip_high) and self.clip_high >= 0, "a finite number >= 0"),
            ("--dual-clip", self.dual_clip, self.dual_clip is None or self.dual_clip > 1,
             "> 1 (it caps the loss at -dual_clip * A), or none"),
            ("--beta", self.beta, is_finite(self.beta) and self.beta >= 0, "a finite number >= 0"),
            ("--ref-reset-every", self.ref_reset_every, self.ref_reset_every >= 0, ">= 0 (0: never)"),
            ("--mu", self.mu, self.mu >= 1, ">= 1"),
            ("--minibatches", self.minibatches, 1 <= self.minibatches <= rows,
             f"in [1, {rows}]: a step has --prompts-per-step {self.prompts_per_step} x --group-size "
             f"{self.group_size} = {rows} rows to split"),
            ("--micro-batch", self.micro_batch, self.micro_batch >= 0, ">= 0 (0: the whole mini-batch)"),
            ("--eval-samples", self.eval_samples, not self.val or self.eval_samples >= 1, ">= 1 with --val"),
            ("--eval-k", self.eval_k, self.eval_k >= 0, ">= 0 (0: greedy only)"),
            ("--eval-temperature", self.eval_temperature,
             is_finite(self.eval_temperature) and self.eval_temperature >= 0, "a finite number >= 0"),
            ("--rm-ensemble-lambda", self.rm_ensemble_lambda, is_finite(self.rm_ensemble_lambda), "a finite number"),
            ("--rewards", self.rewards, all(is_finite(w) for w in self.rewards.values()), "finite weights"),
        )
        # Each temperature option belongs to one schedule; given with another, it would do nothing.
        annealed = self.temperature_schedule in ("linear", "cosine")
        if self.temperature_end is not None and not annealed:
            raise ValueError(f"--temperature-end is used only by --temperature-schedule linear or cosine, and this "
                             f"run's is {self.temperature_schedule}: drop --temperature-end or choose one of those")
        if annealed and self.temperature_end is None:
            raise ValueError(f"--temperature-schedule {self.temperature_schedule} needs --temperature-end, the "
                             "temperature to end at (without it the temperature stays at --temperature)")
        if self.temperature_stages and self.temperature_schedule != "stages":
            raise ValueError(f"--temperature-stages is used only by --temperature-schedule stages, and this run's "
                             f"is {self.temperature_schedule}: drop it or add --temperature-schedule stages")
        if self.temperature_schedule == "stages" and not self.temperature_stages:
            raise ValueError("--temperature-schedule stages needs --temperature-stages")
        temperatures = [("--temperature", self.temperature), ("--temperature-end", self.temperature_end)]
        temperatures += [("--temperature-stages", t) for _, t in self.temperature_stages]
        for option, t in temperatures:
            if t is not None and not t > 0:
                raise ValueError(f"{option} must be > 0, got {t}: GRPO samples its groups, and greedy "
                                 "groups have zero variance, so no advantage")
        self._check_rewards()
        self._check_curriculum()
        if self.overlong_buffer > 0 and "overlong" in self.rewards:
            raise ValueError("--rewards may not name 'overlong' while --overlong-buffer is on: that is "
                             "the name of the length penalty's own reward term")
        if self.task is not None and self.task not in self.task_names:
            raise ValueError(f"--task must be one of {', '.join(self.task_names)}, got {self.task!r}")
        self._check_stages()

    def _check_rewards(self) -> None:
        own = [parse_spec(spec) for spec in self.reward_fn]
        names = [name for _, name, _ in own]
        for name in names:
            if names.count(name) > 1 or name in self.reward_models or name == "overlong":
                raise ValueError(f"--reward-fn: the name {name!r} is taken (another --reward-fn, a reward model "
                                 "or the overlong penalty); rename the function")
        # Countdown's own check needs the puzzle's numbers and target, which only Countdown records have.
        if "countdown" in self.rewards and "countdown" not in names and self.task not in (None, "countdown"):
            raise ValueError(f"--rewards names 'countdown', Countdown's expression check, but --task is {self.task}, "
                             "whose records have no numbers and target to check it against: drop it from --rewards")

    def _check_curriculum(self) -> None:
        if self.curriculum == "uniform":
            # Each curriculum option belongs to a curriculum; with uniform sampling it would do nothing.
            given = [f.name for f in dataclasses.fields(self) if f.name.startswith("curriculum_")
                     and getattr(self, f.name) != _default(f)]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} is used only by --curriculum staged, learnability "
                                 "or band, and this run's is uniform: choose one of those or drop the option")
        if self.curriculum == "staged" and not self.curriculum_stages:
            raise ValueError('--curriculum staged needs --curriculum-stages, e.g. '
                             '"[{until = 0.5, levels = [1, 3]}, {until = 1.0}]"')
        lo, hi = self.curriculum_band
        require(
            ("--curriculum-mix-previous", self.curriculum_mix_previous, 0 <= self.curriculum_mix_previous <= 1,
             "in [0, 1]"),
            ("--curriculum-band", self.curriculum_band, 0 <= lo < hi <= 1, "(lo, hi) with 0 <= lo < hi <= 1"),
            ("--curriculum-floor", self.curriculum_floor,
             is_finite(self.curriculum_floor) and self.curriculum_floor >= 0, "a finite number >= 0"),
            ("--curriculum-explore", self.curriculum_explore,
             is_finite(self.curriculum_explore) and self.curriculum_explore > 0, "a finite number > 0"),
            ("--curriculum-retire", self.curriculum_retire,
             self.curriculum_retire is None or 0 <= self.curriculum_retire < 1, "in [0, 1), or none"),
            ("--curriculum-retire-min-tries", self.curriculum_retire_min_tries, self.curriculum_retire_min_tries >= 1,
             ">= 1"),
        )


    def _check_stages(self) -> None:
        """The stages as the sampler will read them, and the rows a stage's own group size leaves
        the update to split into --minibatches."""
        try:
            stages = stages_from_tables(self.curriculum_stages)
        except ValueError as e:
            raise ValueError(f"--curriculum-stages: {e}") from None
        for i, g in enumerate(stage.group_size for stage in stages):
            if g is not None and self.minibatches > self.prompts_per_step * g:
                raise ValueError(f"--curriculum-stages: stage {i}: group_size {g} gives {self.prompts_per_step * g} "
                                 f"rows a step, fewer than --minibatches {self.minibatches}")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# ---------------------------------------------------------------- curriculum stages


@dataclass(frozen=True)
class Stage:
    """One phase of a curriculum (nanopost/curriculum.py): which prompts, and optionally the
    temperature and group size.

    `until` ends the stage. If every stage's `until` is <= 1 they are fractions of total_steps
    and step s belongs to the first stage with s / total_steps < until; otherwise all are
    absolute step numbers and s belongs to the first stage with s < until. Steps past the last
    boundary stay in the last stage. The rule is nanopost.schedules.stage_at, which a "stages"
    temperature schedule follows too, so one built from the same boundaries changes at the same
    steps.

    A prompt is in the stage when its difficulty lies in [min_difficulty, max_difficulty] and
    between the `quantiles` (lo, hi) of all prompts' difficulties, bounds included; None means
    no bound.
    """

    until: float
    min_difficulty: float | None = None
    max_difficulty: float | None = None
    quantiles: tuple[float, float] | None = None
    temperature: float | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        # Refused here rather than at the first sampling step of the stage, which may be hours in.
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"Stage(until={self.until}): temperature must be > 0 to sample GRPO groups "
                             f"(greedy groups have zero variance, so no advantage), got {self.temperature}")

    @property
    def filters(self) -> bool:
        return self.min_difficulty is not None or self.max_difficulty is not None or self.quantiles is not None


STAGE_KEYS = ("until", "levels", "min_difficulty", "max_difficulty", "quantiles", "temperature", "group_size")


def stages_from_tables(tables: Sequence[Mapping[str, Any]]) -> list[Stage]:
    """`Stage`s from plain tables, as a config file or option writes them:

        [{until = 0.5, levels = [1, 3], temperature = 0.8}, {until = 1.0, temperature = 1.0}]

    Keys are Stage's fields; `levels = [lo, hi]` is min_difficulty and max_difficulty in one.
    Every rule the sampler applies to its stages is checked here (`check_stages`), so a bad stage
    is refused when the options are read. Errors say which stage ("stage 1: ...").
    """
    stages = []
    for i, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ValueError(f"stage {i}: expected a table such as {{until = 0.5, levels = [1, 3]}}, got {table!r}")
        unknown = [k for k in table if k not in STAGE_KEYS]
        if unknown:
            raise ValueError(f"stage {i}: unknown key {unknown[0]!r}; expected {', '.join(STAGE_KEYS)}")
        if "until" not in table:
            raise ValueError(f"stage {i}: missing `until`, where the stage ends (a fraction of the steps, or a step)")
        kw = {k: v for k, v in table.items() if k != "levels"}
        if "levels" in table:
            levels = table["levels"]
            if "min_difficulty" in table or "max_difficulty" in table:
                raise ValueError(f"stage {i}: give `levels` or min_difficulty/max_difficulty, not both")
            if not isinstance(levels, (list, tuple)) or len(levels) != 2:
                raise ValueError(f"stage {i}: levels must be [lo, hi], got {levels!r}")
            kw["min_difficulty"], kw["max_difficulty"] = levels
        if kw.get("quantiles") is not None:
            kw["quantiles"] = tuple(kw["quantiles"])
        for key, value in kw.items():  # TOML gives numbers; a string or a bool here is a typo
            ok = value is None or (isinstance(value, tuple) and key == "quantiles" and len(value) == 2
                                   and all(is_number(v) for v in value)) or is_number(value)
            if not ok or (key == "group_size" and value is not None and not float(value).is_integer()):
                raise ValueError(f"stage {i}: {key} must be a number, got {value!r}")
        if kw.get("group_size") is not None:
            kw["group_size"] = int(kw["group_size"])
        try:
            stages.append(Stage(**kw))
        except ValueError as e:
            raise ValueError(f"stage {i}: {e}") from None
    check_stages(stages)
    return stages


def check_stages(stages: Sequence[Stage]) -> list[float]:
    """The stages' boundaries, after checking that they increase and each stage's ranges."""
    bounds = [float(s.until) for s in stages]
    if not all(b > 0 for b in bounds) or not all(b2 > b1 for b1, b2 in zip(bounds, bounds[1:])):  # NaN too
        raise ValueError(f"stage boundaries `until` must be > 0 and strictly increasing, got {bounds}")
    for i, s in enumerate(stages):
        if s.quantiles is not None and not 0.0 <= s.quantiles[0] <= s.quantiles[1] <= 1.0:
            raise ValueError(f"stage {i}: quantiles must be (lo, hi) with 0 <= lo <= hi <= 1, got {s.quantiles}")
        if (s.min_difficulty is not None and s.max_difficulty is not None
                and s.min_difficulty > s.max_difficulty):
            raise ValueError(f"stage {i}: its difficulty range [{s.min_difficulty}, {s.max_difficulty}] is empty")
        if s.group_size is not None and s.group_size < 2:
            raise ValueError(f"stage {i}: group_size must be >= 2, got {s.group_size}")
    return bounds
