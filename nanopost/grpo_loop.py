"""GRPO training loop.

One step:

    sampler picks P prompts -> render with the prompt template -> generate G completions each at
    the step's temperature T (logprobs kept) -> score with named reward functions (each logged,
    then weighted and summed) -> group advantages -> dynamic sampling (drop groups whose rewards
    all agree; optionally refill with new prompts) -> mu passes over the rollouts in mini-batches
    with the clipped loss -> curriculum learns each prompt's pass rate -> metrics -> maybe eval.

Choices, and where this loop departs from the textbook (DeepSeekMath) GRPO:

 1. No KL term by default (beta = 0): with verifiable rewards the reference mainly costs a
    second model and a forward pass (DAPO, Dr. GRPO). beta > 0 loads a frozen reference,
    optionally reset to the policy every `ref_reset_every` steps.
 2. Token-mean aggregation by default (DAPO): every generated token weighs the same, so long
    answers are neither favoured nor diluted by per-sequence averaging.
 3. Clip-higher (clip_high 0.28 > clip_low 0.2, DAPO): rare tokens can gain probability, which
    keeps entropy from collapsing. Sequence-level ratios (--importance sequence, GSPO) default
    to GSPO's own clip range (3e-4 / 4e-4) and per-sequence aggregation instead (GRPOConfig).
 4. Old logprobs are the learner's own, in the learner's precision. The sampler decodes in fp32
    and keeps log_softmax(logits / T) at the sampled tokens; an fp32 learner recomputes exactly
    that, so those serve as old logprobs and mu = 1 costs no extra forward. Under bf16 autocast
    the learner's logprobs differ from the sampler's by rounding, and a ratio off 1 by rounding
    lets the clip act on noise; so with a single optimizer step (mu = 1, one mini-batch) the old
    logprobs are the step's own, detached (the ratio is exactly 1, as in verl), and otherwise
    one no-grad bf16 forward computes them for every row before the first step. Either way the
    update logs how far the learner is from the sampler over the loss tokens of its first
    optimizer step (before any update): `logp_mismatch_mean`, the mean |learner - sampler| logprob,
    and `ratio_max_sampler`, the largest exp(learner - sampler).
 5. Groups whose rewards all agree carry no signal (zero advantage); dynamic sampling drops
    them so they do not dilute the token mean, and "refill" draws new prompts to replace them.
 6. Truncated completions may be masked out of the loss (overlong filtering) or get DAPO's soft
    length penalty over the last `overlong_buffer` tokens before max_new_tokens, a reward term
    named "overlong" combined with the others by `reward_mode` (see `collect`).
 7. The temperature follows a schedule (constant, linear, cosine or per-stage), used both for
    sampling and for the loss logprobs, and logged each step.

Under torchrun (nanopost.plumbing.distributed) every rank draws the same prompts, generates and scores
the completions of its own block of groups, then all ranks gather every rollout: rewards,
advantages (batch scaling included), dynamic-sampling decisions and curriculum statistics are
computed over the global batch, identically everywhere. The update shards each mini-batch's rows
across ranks; losses divide by the global token / sequence counts, so N processes make the update
one process makes on the same rollouts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from .curriculum import CurriculumSampler, PromptSampler, UniformSampler
from .data import tokenize_prompt
from .eval import EvalItem, default_check, evaluate
from .generate import generate, shared_prefix
from .grpo import group_advantages, policy_loss
from .model import PrefixLogprobs, Transformer
from .plumbing import distributed, interrupt
from .plumbing.data_files import check_prompts_fit, load_rl
from .plumbing.hf_io import load_config, load_model
from .plumbing.options import GRPOOptions, RunOptions, stages_from_tables
from .plumbing.run import Run
from .plumbing.runtime import autocast
from .plumbing.tokenizer import Tokenizer
from .plumbing.user_rewards import load_reward_fns, model_rewards, parse_spec
from .prompts import PromptTemplate
from .rewards import combine_rewards, sample_reward
from .schedules import lr_at, set_lr, temperature_at
from .tasks import TASKS, get_task


@dataclass
class GRPOConfig(RunOptions, GRPOOptions):
    """Every option of a GRPO run (plumbing/options.py; `--help` lists them with their defaults),
    with what only the core knows: the task names, and the temperature schedule's stages."""

    task_names = tuple(TASKS)

    def validate(self) -> None:
        super().validate()  # the options' own checks, the task's name and the curriculum's stages among them
        try:  # the stage boundaries (increasing, >= 0) as the schedule reads them at the first step
            self.scheduled_temperature(0)
        except ValueError as e:
            raise ValueError(f"--temperature-stages: {e}") from None

    def scheduled_temperature(self, step: int) -> float:
        """The sampling temperature --temperature-schedule gives `step` (a curriculum stage may set its own)."""
        return temperature_at(step, self.steps, kind=self.temperature_schedule, start=self.temperature,
                              end=self.temperature if self.temperature_end is None else self.temperature_end,
                              stages=self.temperature_stages or None)


def make_sampler(cfg: GRPOConfig, records: list[dict], pass_rates: dict[str, float] | None = None) -> PromptSampler:
    """The prompt sampler --curriculum and its options describe (nanopost/curriculum.py).

    `pass_rates` (tools/difficulty.py: estimate_pass_rates) give records without a "difficulty" theirs and
    start the online estimates. The demo and the curriculum experiment build theirs here too.
    """
    if cfg.curriculum == "uniform":
        return UniformSampler(records, seed=cfg.seed)
    try:
        return CurriculumSampler(
            records, total_steps=cfg.steps, stages=stages_from_tables(cfg.curriculum_stages),
            mode="uniform" if cfg.curriculum == "staged" else cfg.curriculum, band=cfg.curriculum_band,
            retire_threshold=cfg.curriculum_retire, retire_min_tries=cfg.curriculum_retire_min_tries,
            explore=cfg.curriculum_explore, floor=cfg.curriculum_floor, mix_previous=cfg.curriculum_mix_previous,
            pass_rates=pass_rates, seed=cfg.seed)
    except ValueError as e:  # e.g. a stage that filters by difficulty over records without one
        raise ValueError(f"--curriculum-stages: {e} ({cfg.train})") from None


def reward_setup(cfg: GRPOConfig, task, records: list[dict], log) -> tuple[dict[str, float], dict[str, Callable]]:
    """(weights, functions) of the run's rewards other than reward models: --rewards, the task's
    check as `accuracy`, and each --reward-fn (imported and checked on the first records now)."""
    own = load_reward_fns(cfg.reward_fn, records)
    weights = dict(cfg.rewards)
    for spec in cfg.reward_fn:
        _, name, weight = parse_spec(spec)
        weights[name] = weight if weight is not None else weights.get(name, 1.0)
        log(f"reward {name}: {spec}, weight {weights[name]:g}")
    if "accuracy" in own or "accuracy" not in weights:
        return weights, own
    if task is None and records and records[0].get("numbers") is not None and records[0].get("target") is not None:
        raise ValueError(f"{cfg.train} holds Countdown puzzles (numbers, target), and without --task the `accuracy` "
                         "reward compares the answer's text with the reference expression, so another correct "
                         "expression earns 0: add --task countdown")
    return weights, {**task_rewards(task, records, cfg.train, log), **own}


def task_rewards(task, records: list[dict], path: str, log) -> dict[str, Callable]:
    """With --task, the task's own check is the `accuracy` reward, so training scores what eval scores
    (Countdown: any expression reaching the target, not the reference's spelling)."""
    if task is None:
        return {}
    for i, record in enumerate(records):
        missing = [f for f in task.fields if record.get(f) is None]
        if missing:
            raise ValueError(f"{path}: record {record.get('id', i)!r} has no {missing[0]!r}, which --task "
                             f"{task.name}'s check needs (fields: {', '.join(task.fields)})")
    log(f"reward accuracy: the {task.name} task's check ({task.verifier})")
    return {"accuracy": task.check}


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollouts:
    """G completions for each of several prompts; rows of one group are consecutive."""

    records: list[dict]  # one per group
    prompts: list[list[int]]  # one per row
    tokens: torch.Tensor  # [N, T]
    old_logprobs: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] 1.0 on generated tokens
    finished: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N] weighted total
    per_function: dict[str, list[float | None]]
    texts: list[str]
    seconds: dict[str, float] = field(default_factory=dict)  # time spent generating and scoring

    def select_groups(self, keep: list[int], group_size: int) -> Rollouts:
        rows = [g * group_size + j for g in keep for j in range(group_size)]
        idx = torch.tensor(rows, dtype=torch.long)
        return Rollouts(
            records=[self.records[g] for g in keep], prompts=[self.prompts[r] for r in rows],
            tokens=self.tokens[idx], old_logprobs=self.old_logprobs[idx], mask=self.mask[idx],
            finished=self.finished[idx], rewards=self.rewards[idx],
            per_function={k: [v[r] for r in rows] for k, v in self.per_function.items()},
            texts=[self.texts[r] for r in rows], seconds=self.seconds)

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        return Rollouts(
            records=[r for p in parts for r in p.records], prompts=[x for p in parts for x in p.prompts],
            tokens=torch.cat([p.tokens for p in parts]), old_logprobs=torch.cat([p.old_logprobs for p in parts]),
            mask=torch.cat([p.mask for p in parts]), finished=torch.cat([p.finished for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]),
            per_function={k: [x for p in parts for x in p.per_function[k]] for k in parts[0].per_function},
            texts=[t for p in parts for t in p.texts],
            seconds={k: sum(p.seconds.get(k, 0.0) for p in parts) for k in ("generate", "score")})


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to max - buffer tokens, then falling linearly to -penalty."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    excess = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0)
    return -penalty * (excess / buffer).clamp(max=1.0)


class RewardScorer:
    """Named, weighted reward functions applied to decoded completions.

    `known` adds terms whose values are already computed, {name: (values, weight)}: they are
    combined exactly like the functions (the same weighting, the same per-group normalisation
    under "normalize_each"). Functions that keep state across calls (a model reward's running
    statistics) are saved with `state_dict` and restored with `load_state_dict`.
    """

    def __init__(self, weights: dict[str, float], mode: str = "sum", extra: dict[str, Callable] | None = None):
        extra = extra or {}
        self.funcs = [(name, extra[name] if name in extra else builtin_reward(name), w) for name, w in weights.items()]
        self.mode = mode
        self.stateful = {name: fn for name, fn, _ in self.funcs
                         if hasattr(fn, "state_dict") and hasattr(fn, "load_state_dict")}

    def __call__(self, texts: list[str], samples: list[dict], group_size: int,
                 known: dict[str, tuple[list[float], float]] | None = None):
        # A known term scores the batch with its values (the overlong penalty counts tokens, not text).
        funcs = self.funcs + [(name, SimpleNamespace(score_batch=lambda *_, values=values: values), w)
                              for name, (values, w) in (known or {}).items()]
        total, per = combine_rewards(texts, samples, funcs, group_size=group_size, mode=self.mode)
        return torch.tensor(total, dtype=torch.float32), per

    def state_dict(self) -> dict[str, dict]:
        return {name: fn.state_dict() for name, fn in self.stateful.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, fn in self.stateful.items():
            if name in state:
                fn.load_state_dict(state[name])


def builtin_reward(name: str) -> Callable:
    """The function of a --rewards name that no function of the run claims: one of nanopost.rewards
    (sample_reward), or "countdown", the Countdown task's check (None for a record without the
    puzzle's numbers and target)."""
    if name == "countdown":
        task = get_task("countdown")
        return lambda completion, sample: (None if any(sample.get(f) is None for f in task.fields)
                                           else task.check(completion, sample))
    try:
        return sample_reward(name)
    except ValueError:
        raise ValueError(f'unknown reward {name!r}; expected "accuracy", "format", "thinking" or "countdown"') from None


def collect(policy: Transformer, tokenizer: Tokenizer, records: list[dict], prompt_ids: list[list[int]],
            scorer: RewardScorer, cfg: GRPOConfig, temperature: float, generator: torch.Generator) -> Rollouts:
    G = cfg.group_size
    prompts = [p for p in prompt_ids for _ in range(G)]
    t0 = time.perf_counter()
    policy.eval()
    out = generate(policy, prompts, max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                   top_p=cfg.top_p, top_k=cfg.top_k, stop_token_ids=tokenizer.stop_token_ids,
                   generator=generator, pad_token_id=tokenizer.pad_token_id)
    policy.train()
    t1 = time.perf_counter()
    texts = [tokenizer.decode(out.completion(i), skip_special_tokens=True) for i in range(len(prompts))]
    samples = [{**r, "question": r["prompt"]} for r in records for _ in range(G)]
    # DAPO adds its soft overlong penalty to the reward. Here it is one more named term, "overlong"
    # (values in [-1, 0], weight overlong_penalty), combined with the others by reward_mode: under
    # "normalize_each" it is standardised per group like every other term, not added raw after them.
    known = {}
    if cfg.overlong_buffer > 0:
        known["overlong"] = (overlong_penalty(out.lengths.cpu(), cfg.max_new_tokens, cfg.overlong_buffer, 1.0).tolist(),
                             cfg.overlong_penalty)
    rewards, per = scorer(texts, samples, G, known=known)
    return Rollouts(records=list(records), prompts=prompts, tokens=out.tokens.cpu(),
                    old_logprobs=out.logprobs.cpu(), mask=out.mask.cpu(), finished=out.finished.cpu(),
                    rewards=rewards, per_function=per, texts=texts,
                    seconds={"generate": t1 - t0, "score": time.perf_counter() - t1})


def collect_global(policy: Transformer, tokenizer: Tokenizer, records: list[dict], prompt_ids: list[list[int]],
                   scorer: RewardScorer, cfg: GRPOConfig, temperature: float, generator: torch.Generator,
                   dist: distributed.Dist) -> Rollouts:
    """`collect` on this rank's block of prompts, then every rank's rollouts in prompt order."""
    mine = distributed.shard(len(records), dist)
    local = None
    with distributed.gathered(policy):
        if len(mine):
            local = collect(policy, tokenizer, records[mine.start : mine.stop], prompt_ids[mine.start : mine.stop],
                            scorer, cfg, temperature, generator)
    if not dist.active:
        return local
    parts = [p for p in dist.gather(local) if p is not None]
    out = Rollouts.concat(parts)
    out.seconds = {k: max(p.seconds[k] for p in parts) for k in out.seconds}  # ranks run side by side
    return out


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> list[bool]:
    groups = rewards.view(-1, group_size)
    return (groups.max(dim=1).values == groups.min(dim=1).values).tolist()


# ---------------------------------------------------------------- policy update


def sequence_logprobs(model: Transformer, prompts: list[list[int]], tokens: torch.Tensor, temperature: float,
                      want_entropy: bool = False, mask: torch.Tensor | None = None):
    """log pi(token) at temperature for every completion token: [N, T] (and entropy [N, T]).

    Rows of one group share their prompt, so each distinct prompt runs through the model once and
    its keys/values serve all of its rows (SharedPrefix). The LM head runs on completion
    positions only, and with `mask` [N, T] only where it is set (the rest are 0): with a real
    vocabulary the head is most of the work, and a completion that stopped early needs none
    after its end. Padding after a completion needs no attention mask: attention is causal, so
    no real token sees it, and its own logprobs are masked out by the caller.
    """
    # Through forward(), not its parts: a DDP wrapper only synchronises what goes through forward.
    # Positions [N, T]: after the prompt, then after each completion token but the last.
    keep = None if mask is None else mask.to(tokens.device).bool()
    out = model(PrefixLogprobs(shared_prefix(prompts, tokens.device), tokens[:, :-1],
                               tokens if keep is None else tokens[keep], where=keep, temperature=temperature,
                               with_entropy=want_entropy))
    if keep is not None:
        out = tuple(_scatter(x, keep) for x in out) if want_entropy else _scatter(out, keep)
    return out if want_entropy else (out, None)


def _scatter(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """values at the True entries of keep [N, T], zeros elsewhere (differentiable)."""
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)


def rows_logprobs(model: Transformer, batch: Rollouts, rows: list[int], temperature: float, device,
                  want_entropy: bool = False):
    """`sequence_logprobs` of the batch's `rows`: their prompts, completions and masks."""
    return sequence_logprobs(model, [batch.prompts[i] for i in rows], batch.tokens[rows].to(device), temperature,
                             want_entropy=want_entropy, mask=batch.mask[rows])


def learner_logprobs(policy: Transformer, batch: Rollouts, cfg: GRPOConfig, temperature: float, device,
                     dist: distributed.Dist) -> torch.Tensor:
    """[N, T] logprobs of every row in the learner's precision, without grad, on the CPU like the sampler's.

    Each rank computes its block of rows, a micro-batch at a time, and all ranks gather the blocks.
    The weights are gathered whole first (FSDP2), so ranks need not run the same number of forwards.
    """
    mine = distributed.shard(len(batch.prompts), dist)
    size = max(1, cfg.micro_batch if 0 < cfg.micro_batch < len(mine) else len(mine))
    parts = [batch.old_logprobs[:0]]
    with distributed.gathered(policy), torch.no_grad(), autocast(device, cfg.precision):
        for start in range(mine.start, mine.stop, size):
            rows = list(range(start, min(start + size, mine.stop)))
            parts.append(rows_logprobs(policy, batch, rows, temperature, device)[0].float().cpu())
    return torch.cat(dist.gather(torch.cat(parts)))


def update_policy(policy: Transformer, reference: Transformer | None, optimizer, batch: Rollouts,
                  advantages: torch.Tensor, cfg: GRPOConfig, temperature: float, device, *,
                  dist: distributed.Dist = distributed.Dist(), wrapped: torch.nn.Module | None = None
                  ) -> dict[str, float]:
    """mu passes of mini-batch optimizer steps over the rollouts; returns averaged statistics.

    Every rank holds the whole batch and trains on its block of each mini-batch through `wrapped`
    (the DDP wrapper; `policy` alone in one process). The loss normalisers count the whole
    mini-batch, so the all-reduced gradient is the single-process one.
    """
    wrapped = policy if wrapped is None else wrapped
    loss_mask = batch.mask.clone()
    if cfg.overlong_filter:
        loss_mask[~batch.finished] = 0.0
    N = len(batch.prompts)
    ref_rows: dict[int, torch.Tensor] = {}  # reference logprobs by row, computed once each
    t_ref = 0.0

    def reference_logprobs(rows: list[int]) -> torch.Tensor:
        nonlocal t_ref
        t0 = time.perf_counter()
        todo = [i for i in rows if i not in ref_rows]
        if todo:
            with torch.no_grad(), autocast(device, cfg.precision):
                logp = rows_logprobs(reference, batch, todo, temperature, device)[0].float()
            ref_rows.update(zip(todo, logp))
        t_ref += time.perf_counter() - t0
        return torch.stack([ref_rows[i] for i in rows])

    # Old logprobs in the learner's precision (Choices 4): the sampler's when the learner runs in
    # fp32 as the sampler does; under autocast a single optimizer step's own, detached, and several
    # steps' from one no-grad pass before the first.
    mixed = isinstance(autocast(device, cfg.precision), torch.autocast)
    own_old = mixed and cfg.mu == 1 and cfg.minibatches <= 1
    old_logprobs = batch.old_logprobs
    if mixed and not own_old:
        old_logprobs = learner_logprobs(policy, batch, cfg, temperature, device, dist)
    ratio_max_sampler = 0.0

    sums: dict[str, float] = defaultdict(float)
    grad_norms = []
    n_steps = 0
    for _ in range(cfg.mu):
        # Fresh mini-batches each pass (the global RNG is part of the checkpoint, so resume is exact);
        # rank 0's order for every rank, so all shard the same mini-batches.
        order = dist.broadcast(torch.randperm(N).tolist()) if cfg.minibatches > 1 else list(range(N))
        for mb in _split(order, cfg.minibatches):
            n_steps += 1
            n_tokens = loss_mask[mb].sum()
            # Rows with loss tokens after the overlong filter, counted over the whole mini-batch
            # (every rank holds it), so micro-batches and ranks share one normaliser.
            n_seqs = (loss_mask[mb].sum(dim=1) > 0).sum()
            # This process's rows, in micro-batches; a stand-in (real=False) counts zero.
            micro = distributed.micro_batches(mb, dist, cfg.micro_batch)
            for m, (rows, real) in enumerate(micro):
                r = torch.tensor(rows, dtype=torch.long)
                ref_logp = reference_logprobs(rows) if reference is not None else None
                with distributed.sync_gradients(wrapped, m == len(micro) - 1):
                    with autocast(device, cfg.precision):
                        logp, entropy = rows_logprobs(wrapped, batch, rows, temperature, device, want_entropy=True)
                    old_logp = logp.detach().float() if own_old else old_logprobs[r].to(device)
                    loss, s = policy_loss(
                        logp.float(), old_logp, advantages[r].to(device),
                        loss_mask[r].to(device), ref_logp=ref_logp, beta=cfg.beta, kl=cfg.kl,
                        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                        importance=cfg.importance, agg=cfg.agg, max_len=cfg.max_new_tokens,
                        num_tokens=n_tokens if cfg.agg == "token-mean" else None,
                        num_seqs=n_seqs if cfg.agg != "token-mean" else None)
                    # DDP averages gradients over ranks; the global normalisers want their sum.
                    (loss * (dist.world if real else 0.0)).backward()
                # Zero-weighted stand-ins add zeros, so every rank sums the same keys.
                w = 1.0 if real else 0.0
                sums["loss"] += w * loss.item()  # micro-batch losses of one step add up to the step's loss
                mask = batch.mask[r].to(device)
                sums["entropy_sum"] += w * (entropy * mask).sum().item()
                sums["entropy_tokens"] += w * mask.sum().item()
                for k, v in s.items():
                    sums[k] += w * float(v) * len(rows) / len(mb)
                if n_steps == 1:  # weights not updated yet: how far the learner is from the sampler
                    keep = loss_mask[r].to(device).bool()
                    gap = torch.where(keep, logp.detach().float() - batch.old_logprobs[r].to(device), 0.0)
                    sums["mismatch_sum"] += w * gap.abs().sum().item()
                    sums["mismatch_tokens"] += w * keep.sum().item()
                    if real:  # rows without loss tokens give exp(-inf) = 0
                        top = gap.masked_fill(~keep, -math.inf).max().exp().item()
                        ratio_max_sampler = max(ratio_max_sampler, top)
            grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    keys = sorted(sums)
    total = dict(zip(keys, dist.all_sum([sums[k] for k in keys])))
    out = {k: v / n_steps for k, v in total.items() if not k.startswith(("entropy_", "mismatch_"))}
    out["entropy"] = total["entropy_sum"] / max(total["entropy_tokens"], 1.0)
    out["logp_mismatch_mean"] = total["mismatch_sum"] / max(total["mismatch_tokens"], 1.0)
    out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    times, ratios = zip(*dist.gather((t_ref, ratio_max_sampler)))
    out["time_reference"], out["ratio_max_sampler"] = max(times), max(ratios)
    return out


def _split(order: list[int], parts: int) -> list[list[int]]:
    parts = max(1, min(parts, len(order)))
    size = math.ceil(len(order) / parts)
    return [order[i : i + size] for i in range(0, len(order), size)]


# ---------------------------------------------------------------- the loop


def tokenize_prompts(tokenizer: Tokenizer, template: PromptTemplate, path: str | None, records: list[dict],
                     max_new_tokens: int, context: int) -> dict[str, list[int]]:
    """{prompt_key: token ids} of the records read from `path`, rendered with the template (a
    conversational record as written); a prompt that leaves no room for max_new_tokens in the model's
    context is refused now, naming its path:line, rather than when the sampler first draws it."""
    ids = {prompt_key(r): tokenize_prompt(tokenizer, template.record_messages(r)) for r in records}
    if records:
        check_prompts_fit(path, {i: len(ids[prompt_key(r)]) for i, r in enumerate(records)}, max_new_tokens, context)
    return ids


def prompt_key(record: dict):
    """What a record's rendering depends on: its question, or its whole conversation when it has one
    (two conversations may end with the same user message)."""
    messages = record.get("messages")
    return record["prompt"] if messages is None else json.dumps(messages, sort_keys=True)


@dataclass
class Prompts:
    """The training and held-out records, and each one's rendered prompt by prompt_key."""

    records: list[dict]
    ids: dict[str, list[int]]
    val_records: list[dict]
    val_ids: dict[str, list[int]]


def load_prompts(cfg: GRPOConfig, tokenizer: Tokenizer, template: PromptTemplate) -> Prompts:
    """Read and render both files, each prompt checked against the model's context, all before the
    model is loaded, so a bad line costs no time."""
    records = load_rl(cfg.train)
    if cfg.prompts_per_step > len(records):
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} is more than the {len(records)} prompt(s) in "
                         f"{cfg.train}: a step would draw the same prompt twice; lower --prompts-per-step "
                         f"to at most {len(records)}")
    context = load_config(cfg.model).max_position_embeddings
    ids = tokenize_prompts(tokenizer, template, cfg.train, records, cfg.max_new_tokens, context)
    val_records = load_rl(cfg.val)[: cfg.eval_samples] if cfg.val else []
    val_ids = tokenize_prompts(tokenizer, template, cfg.val, val_records, cfg.max_new_tokens, context)
    return Prompts(records, ids, val_records, val_ids)


def load_policy(cfg: GRPOConfig, device) -> tuple[Transformer, Transformer | None]:
    """The policy to train, and with beta > 0 a frozen copy of it as the KL reference."""
    policy = load_model(cfg.model, device=device, dtype=torch.float32).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 else None
    return policy, reference


@dataclass
class GRPOState:
    """What a GRPO run builds before its first step (`start`), and what its steps carry on."""

    cfg: GRPOConfig
    run: Run
    tokenizer: Tokenizer
    template: PromptTemplate
    prompts: Prompts
    sampler: PromptSampler
    scorer: RewardScorer
    policy: Transformer
    reference: Transformer | None  # the frozen KL reference (beta > 0)
    trained: torch.nn.Module  # what the update trains through: the policy, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # this process's sampling stream
    eval_items: list[EvalItem]
    check: Callable  # (completion, EvalItem) -> correct?
    step: int = 0  # steps done
    best: float = -math.inf  # the best held-out accuracy so far


def start(cfg: GRPOConfig, log, monitor, sampler: PromptSampler | None, extra_rewards: dict[str, Callable] | None,
          check: Callable | None) -> GRPOState:
    """Everything before step 1, the cheap parts first: the prompts are read and rendered, and the
    rewards and the sampler built from them, before the model loads, so a bad line, stage or reward
    function costs no time. A resumed run gets back its step, sampler, streams and reward statistics."""
    run = Run(cfg, log, monitor)
    tokenizer = run.load_tokenizer()
    template = PromptTemplate(instruction=cfg.instruction, system=cfg.system, reasoning=cfg.reasoning)
    prompts = load_prompts(cfg, tokenizer, template)
    task = get_task(cfg.task) if cfg.task else None
    weights, reward_fns = reward_setup(cfg, task, prompts.records, run.log)
    sampler = sampler or make_sampler(cfg, prompts.records)
    policy, reference = load_policy(cfg, run.device)
    scorer = RewardScorer(weights, cfg.reward_mode,
                          {**reward_fns, **model_rewards(cfg, run.device), **(extra_rewards or {})})
    if check is None and task is not None:
        check = lambda completion, item: task.check(completion, item.record)  # noqa: E731
    eval_items = [EvalItem(prompts.val_ids[prompt_key(r)], r["answer"], r.get("difficulty"), r)
                  for r in prompts.val_records]
    # Each process samples its own completions; rank 0's stream is the single-process one.
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed + 1_000_003 * run.dist.rank)
    trained, optimizer, saved = run.prepare(policy)
    s = GRPOState(cfg, run, tokenizer, template, prompts, sampler, scorer, policy, reference, trained, optimizer,
                  generator, eval_items, check or default_check, saved.get("step", 0),
                  saved.get("best_accuracy", -math.inf))
    run.restore_rollouts(saved, sampler, generator, scorer, reference)
    prompt_tokens = sum(len(prompts.ids[prompt_key(r)]) for r in prompts.records)
    run.begin(s.step, cfg.steps, f"{len(prompts.records):,} prompts ({prompt_tokens:,} prompt tokens), "
              f"{len(prompts.val_records):,} held-out; {cfg.steps - s.step} steps to run, {cfg.prompts_per_step} "
              f"prompts x {cfg.group_size} samples of up to {cfg.max_new_tokens} tokens each", policy)
    return s


def step_settings(cfg: GRPOConfig, sampler: PromptSampler, step: int) -> tuple[float, float, GRPOConfig]:
    """This step's learning rate, sampling temperature and config: the schedules' and cfg, unless a
    curriculum stage sets its own temperature or group size ("hotter late" in one line)."""
    lr = lr_at(step, base_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=min(cfg.warmup_steps, cfg.steps),
               kind=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    settings = sampler.stage_settings(step)
    temperature = settings["temperature"] if "temperature" in settings else cfg.scheduled_temperature(step)
    G = settings.get("group_size", cfg.group_size)
    return lr, temperature, cfg if G == cfg.group_size else dataclasses.replace(cfg, group_size=G)


def sample_rollouts(s: GRPOState, cfg: GRPOConfig, temperature: float
                    ) -> tuple[Rollouts, list[Rollouts], dict[str, float]]:
    """One step's rollouts, with dynamic sampling: a group whose rewards all agree has advantage 0
    everywhere and teaches nothing, so "drop" drops it and "refill" also draws more prompts, up
    to max_refill_rounds times, to replace it. Returns (all that was sampled, the groups kept, the
    counts logged). cfg carries this step's group size."""
    G = cfg.group_size
    sampled, kept, n_zero = [], [], 0
    want = cfg.prompts_per_step
    for _ in range(1 + (cfg.max_refill_rounds if cfg.dynamic_sampling == "refill" else 0)):
        records = s.sampler.sample(want, s.step)
        # Rendered at the start; a sampler given by the caller may hold prompts of its own.
        prompt_ids = [s.prompts.ids.get(prompt_key(r)) or tokenize_prompt(s.tokenizer, s.template.record_messages(r))
                      for r in records]
        ro = collect_global(s.policy, s.tokenizer, records, prompt_ids, s.scorer, cfg, temperature, s.generator,
                            s.run.dist)
        s.sampler.update(records, _pass_rates(ro, G), s.step)
        zero = zero_variance_groups(ro.rewards, G)
        n_zero += sum(zero)
        sampled.append(ro)
        if cfg.dynamic_sampling != "off":
            ro = ro.select_groups([g for g, z in enumerate(zero) if not z], G)
        if ro.records:
            kept.append(ro)
        want -= len(ro.records)
        if want <= 0:
            break
    everything = Rollouts.concat(sampled)
    n = len(everything.records)
    return everything, kept, {"zero_std_frac": n_zero / n, "groups_kept": sum(len(p.records) for p in kept),
                              "groups_sampled": n, "samples": n * G}


def _pass_rates(ro: Rollouts, group_size: int) -> list[float]:
    """Fraction of each group's completions judged correct (accuracy reward if present, else reward > 0)."""
    values = ro.per_function.get("accuracy")
    if values is None:
        values = (ro.rewards > 0).float().tolist()
    values = [0.0 if v is None else float(v) for v in values]
    return [sum(values[g * group_size : (g + 1) * group_size]) / group_size for g in range(len(ro.records))]


def step_metrics(ro: Rollouts) -> dict[str, float]:
    """What a step's rollouts show: their rewards, in total and per function, and their lengths."""
    lengths = ro.mask.sum(1)
    row: dict[str, float] = {
        "reward_mean": ro.rewards.mean().item(),
        "reward_std": ro.rewards.std().item() if len(ro.rewards) > 1 else 0.0,
        "len_mean": lengths.mean().item(),
        "len_max": lengths.max().item(),
        "truncated_frac": (~ro.finished).float().mean().item(),
    }
    for name, values in ro.per_function.items():
        v = torch.tensor([0.0 if x is None else x for x in values])
        row[f"reward_{name}_mean"] = v.mean().item()
        row[f"reward_{name}_std"] = v.std().item() if len(v) > 1 else 0.0
    if "accuracy" in ro.per_function:
        correct = torch.tensor([bool(x) for x in ro.per_function["accuracy"]])
        if correct.any():
            row["len_correct"] = lengths[correct].mean().item()
        if (~correct).any():
            row["len_wrong"] = lengths[~correct].mean().item()
    return row


def save(s: GRPOState, name: str) -> None:
    """Checkpoint `name`: the weights, the optimizer and all the rollouts continue from. Every
    process calls it (gathering the weights and the sampling streams are collectives)."""
    state = s.run.rollout_state(s.sampler, s.generator, s.scorer)
    s.run.save(name, s.policy, s.optimizer, s.tokenizer, {"step": s.step, **state, "best_accuracy": s.best},
               reference=s.reference if s.cfg.ref_reset_every else None)  # else it is still --model


def held_out_eval(s: GRPOState) -> dict:
    """Accuracy on the held-out prompts, logged and recorded; `best` is saved when it beats every
    earlier evaluation."""
    cfg, dist = s.cfg, s.run.dist
    with distributed.gathered(s.policy):
        res = evaluate(s.policy, s.tokenizer, s.eval_items, max_new_tokens=cfg.max_new_tokens, k=cfg.eval_k,
                       temperature=cfg.eval_temperature, check=s.check, seed=cfg.seed, dist=dist, log=s.run.log)
    row = {"kind": "eval", "step": s.step, **{k: v for k, v in res.items() if isinstance(v, (int, float))}}
    row.update({f"accuracy_level_{k}": v for k, v in res["per_difficulty"].items()})
    s.run.record(row)
    s.run.log(f"eval step {s.step}: accuracy {res['accuracy']:.3f} [{res['accuracy_lo']:.3f}, "
              f"{res['accuracy_hi']:.3f}]" + (f", avg@{cfg.eval_k} {res[f'avg@{cfg.eval_k}']:.3f}" if cfg.eval_k else ""))
    if dist.broadcast(res["accuracy"] > s.best):
        s.best = res["accuracy"]
        if s.step > 0:  # the evaluation before step 1 only sets the bar: that model is --model itself
            save(s, "best")
    return row


def record_step(s: GRPOState, row: dict, total: int) -> None:
    """A step's metrics row, to metrics.jsonl and the monitor, and its progress line every --log-every steps."""
    if s.step % s.cfg.log_every == 0 or s.step == total:
        accuracy = {"acc": row["reward_accuracy_mean"]} if "reward_accuracy_mean" in row else {}
        s.run.log(s.run.progress.line(s.step, reward=row["reward_mean"], **accuracy, T=row["temperature"],
                                      len=row["len_mean"], zero_std=row["zero_std_frac"], tok_per_s=row["tok_per_s"]))
    s.run.record(row)


@interrupt.stop_on_signals()
def train_grpo(cfg: GRPOConfig, *, sampler: PromptSampler | None = None, log=print,
               extra_rewards: dict[str, Callable] | None = None, check: Callable | None = None,
               monitor=None) -> dict:
    """Run GRPO as configured; returns the last eval row merged with the last train row.

    Under torchrun every process runs this; rank 0 alone logs and writes (see module docstring).
    `last` is saved every --save-every steps (0: at every --eval-every step), at the end, and when
    Ctrl-C or SIGTERM ends the run after the current step (plumbing/interrupt.py); `best` whenever a
    held-out evaluation's accuracy beats every earlier one. monitor: what watches the metrics as
    they come (plumbing/run.py; the script passes LiveMonitor).
    """
    s = start(cfg, log, monitor, sampler, extra_rewards, check)
    total, last_eval, row = cfg.steps, {}, {}
    if s.eval_items and s.step == 0 and cfg.eval_every:
        last_eval = held_out_eval(s)
    while s.step < total:
        t0 = time.perf_counter()
        lr, temperature, step_cfg = step_settings(cfg, s.sampler, s.step)
        set_lr(s.optimizer, lr)
        # 1. rollouts, with dynamic sampling
        rollouts, kept, counts = sample_rollouts(s, step_cfg, temperature)
        # 2. advantages and the update (skipped when every group was dropped: there is no signal to learn from)
        t1 = time.perf_counter()
        update_stats: dict = {}
        if kept:
            batch = Rollouts.concat(kept)
            advantages = group_advantages(batch.rewards, step_cfg.group_size, scale=cfg.adv_scale)
            update_stats = update_policy(s.policy, s.reference, s.optimizer, batch, advantages, step_cfg, temperature,
                                         s.run.device, dist=s.run.dist, wrapped=s.trained)
        seconds = {**rollouts.seconds, "update": time.perf_counter() - t1}  # generate, score, update
        s.step += 1
        # A function of the step alone, so a resumed run resets at the same steps.
        if s.reference is not None and cfg.ref_reset_every and s.step % cfg.ref_reset_every == 0:
            s.reference.load_state_dict(distributed.full_weights(s.policy))
        # 3. metrics, evaluation, checkpoints
        seconds["step"] = time.perf_counter() - t0
        row = {**step_metrics(rollouts), "kind": "train", "step": s.step, "lr": lr, "temperature": temperature,
               "group_size": step_cfg.group_size, **counts, **{f"time_{k}": v for k, v in seconds.items()},
               **update_stats, **{f"sampler_{k}": v for k, v in s.sampler.metrics().items()},
               "tok_per_s": rollouts.mask.sum().item() / seconds["step"]}
        record_step(s, row, total)
        if s.eval_items and s.run.eval_due(s.step, total):
            last_eval = held_out_eval(s)
        total = s.run.end_step(s.step, total, lambda name: save(s, name))
    return {**row, **last_eval}
