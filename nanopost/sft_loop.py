"""Supervised fine-tuning: next-token loss on the assistant tokens only.

One optimizer step:

    grad_accum packed micro-batches -> sum of token losses / tokens of the WHOLE step -> backward
    -> clip grad norm -> AdamW (warmup + cosine lr) -> log -> maybe eval / checkpoint

The loss of a step is normalised by the number of loss tokens across all its micro-batches, so
gradient accumulation gives the same gradient as one big batch however lengths are distributed
(dividing each micro-batch by its own count would over-weight short micro-batches).

Runs resume exactly: the data order is a function of (seed, epoch), the lr a function of the
step, and the checkpoint holds weights, optimizer state, RNG states and the data position.

Under torchrun (nanopost.plumbing.distributed) a step draws grad_accum micro-batches per process from
the same global order, rank r taking every world-th one; the token count is summed over ranks,
so N processes make the update one process makes with grad_accum * N micro-batches. The data
position counts global micro-batches, so a run may resume on a different number of processes
(it continues the same run when batch_rows * grad_accum * processes is unchanged).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .data import Batch, Example, fit_examples, pack_examples, tokenize_chat, tokenize_prompt, tokenize_text
from .eval import EvalItem, evaluate
from .model import Logprobs, Transformer
from .plumbing import distributed, interrupt
from .plumbing.data_files import check_prompts_fit, load_sft, load_text
from .plumbing.hf_io import load_config, load_model
from .plumbing.options import SFTConfig
from .plumbing.run import Run
from .plumbing.runtime import autocast
from .plumbing.tokenizer import Tokenizer
from .rewards import extract_answer
from .schedules import lr_at, set_lr


def loss_sum(model: Transformer, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropies over the loss tokens of a packed batch.

    The LM head runs at the loss tokens only: with the loss on replies alone, it and the softmax
    over the vocabulary would otherwise run for every prompt position too. The model returns the
    labels' log-probabilities (the fast path without holding their logits whole).
    """
    keep = batch.loss_mask.bool()
    logp = model(Logprobs(batch.input_ids, batch.labels[keep], positions=batch.positions,
                          segment_ids=batch.segment_ids, where=keep))
    return -logp.sum()


def accumulate_gradients(model, micro: list[Batch], device, precision: str = "auto",
                         dist: distributed.Dist = distributed.Dist()) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (step loss, loss tokens).

    Every micro-batch is divided by the token count of the whole step (over all ranks), so the
    accumulated gradient is that of the token-mean loss over the step, whatever the split.
    `model` may be the DDP wrapper: gradients are then all-reduced once, after the last backward.
    """
    n_tokens = int(dist.all_sum([sum(b.num_loss_tokens for b in micro)])[0])
    step_loss = 0.0
    for i, b in enumerate(micro):
        with distributed.sync_gradients(model, i == len(micro) - 1), autocast(device, precision):
            loss = loss_sum(model, b.to(device)) / max(n_tokens, 1)
        (loss * dist.world).backward()  # DDP averages over ranks; the global normaliser wants a sum
        step_loss += loss.item()
    return dist.all_sum([step_loss])[0], n_tokens


@torch.no_grad()
def held_out_loss(model: Transformer, batches: list[Batch], device, precision: str,
                  dist: distributed.Dist = distributed.Dist()) -> float:
    """Token-mean loss over `batches`; under torchrun each rank takes its share and the sums meet."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in distributed.shard(len(batches), dist):
        b = batches[i].to(device)
        with autocast(device, precision):
            total += loss_sum(model, b).item()
        n += b.num_loss_tokens
    model.train(was_training)
    total, n = dist.all_sum([total, n])
    return total / max(n, 1)


def accuracy_items(tokenizer: Tokenizer, conversations: list[list[dict]], limit: int) -> list[EvalItem]:
    """Held-out prompts whose reference reply contains an extractable answer. Each item's record
    holds the index of its conversation in the file, so that an error can name the line."""
    items = []
    for index, messages in enumerate(conversations):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        gold = extract_answer(messages[last]["content"])
        if gold is not None:
            items.append(EvalItem(tokenize_prompt(tokenizer, messages[:last]), gold, record={"index": index}))
        if len(items) == limit:
            break
    return items


def prepare(tokenizer: Tokenizer, path: str, cfg: SFTConfig, log) -> tuple[list[list[dict]], list[Example]]:
    """(conversations, examples that fit); conversations is empty for plain text."""
    if cfg.format == "text":
        conversations, tokenized = [], [tokenize_text(tokenizer, t) for t in load_text(path)]
    else:
        conversations = load_sft(path)
        tokenized = [tokenize_chat(tokenizer, m) for m in conversations]
    examples, affected = fit_examples(tokenized, cfg.max_len + 1, cfg.overflow)
    if affected:
        log(f"{path}: {affected} example(s) longer than {cfg.max_len + 1} tokens ({cfg.overflow})")
    if not examples:
        raise ValueError(f"{path}: no example left to train on")
    return conversations, examples


def load_data(cfg: SFTConfig, tokenizer: Tokenizer, log) -> tuple[list[Example], list[Batch], list[EvalItem], int]:
    """(training examples, held-out batches, held-out accuracy prompts, held-out examples).

    What must fit the model's context is checked before the model is loaded: packed rows, and the
    held-out prompts with the tokens generated after them (they would fail at the first eval).
    """
    context = load_config(cfg.model).max_position_embeddings
    if cfg.max_len > context:
        raise ValueError(f"--max-len {cfg.max_len} is more than the model's context of {context} positions "
                         f"(max_position_embeddings in {cfg.model}): use --max-len {context} or less")
    _, train_examples = prepare(tokenizer, cfg.train, cfg, log)
    if not cfg.val:
        return train_examples, [], [], 0
    val_convs, val_examples = prepare(tokenizer, cfg.val, cfg, log)
    val_batches = pack_examples(val_examples, cfg.max_len, cfg.batch_rows, pad_id=tokenizer.pad_token_id)
    acc_items = accuracy_items(tokenizer, val_convs, cfg.eval_accuracy_samples)
    if acc_items:
        check_prompts_fit(cfg.val, {item.record["index"]: len(item.prompt_ids) for item in acc_items},
                          cfg.max_new_tokens, context)
    return train_examples, val_batches, acc_items, len(val_examples)


class DataOrder:
    """The global order of packed micro-batches: epoch after epoch, each shuffled by (seed, epoch),
    so the data position (micro-batches consumed) is all a resumed run needs."""

    def __init__(self, examples: list[Example], cfg: SFTConfig, pad_id: int):
        self.examples, self.cfg, self.pad_id = examples, cfg, pad_id
        self.epoch, self.batches = 0, self.pack(0)
        self.per_epoch = len(self.batches)

    def pack(self, epoch: int) -> list[Batch]:
        return pack_examples(self.examples, self.cfg.max_len, self.cfg.batch_rows, pad_id=self.pad_id,
                             shuffle_seed=self.cfg.seed * 1000 + epoch)

    def take(self, consumed: int, n: int, dist: distributed.Dist) -> list[Batch]:
        """This rank's share of the n global micro-batches after `consumed`: every world-th one."""
        micro = []
        for j in range(n):
            epoch, index = divmod(consumed + j, self.per_epoch)
            if epoch != self.epoch:
                self.epoch, self.batches = epoch, self.pack(epoch)
            if j % dist.world == dist.rank:
                micro.append(self.batches[index])
        return micro


@dataclass
class SFTState:
    """What an SFT run builds before its first step (`start`), and what its steps carry on."""

    cfg: SFTConfig
    run: Run
    tokenizer: Tokenizer
    model: Transformer
    trained: torch.nn.Module  # what the backward runs through: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    order: DataOrder
    val_batches: list[Batch]
    acc_items: list[EvalItem]
    per_step: int  # global micro-batches per optimizer step
    total: int  # optimizer steps of the run; cut to the step it stops at early
    step: int = 0  # steps done
    consumed: int = 0  # global micro-batches drawn: the data position
    best: float = math.inf  # the best held-out loss so far
    last_eval: dict = field(default_factory=dict)


def start(cfg: SFTConfig, log, monitor) -> SFTState:
    """Everything before step 1: the data is read, tokenised and checked against the model's
    context before the model loads; a resumed run gets back its step, data position and best loss."""
    run = Run(cfg, log, monitor)
    tokenizer = run.load_tokenizer()
    train_examples, val_batches, acc_items, n_val = load_data(cfg, tokenizer, run.log)
    model = load_model(cfg.model, device=run.device, dtype=torch.float32).train()
    order = DataOrder(train_examples, cfg, tokenizer.pad_token_id)
    per_step = cfg.grad_accum * run.dist.world
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.per_epoch / per_step))
    trained, optimizer, saved = run.prepare(model)
    s = SFTState(cfg, run, tokenizer, model, trained, optimizer, order, val_batches, acc_items, per_step, total,
                 saved.get("step", 0), saved.get("consumed", 0), saved.get("best_val_loss", math.inf))
    held_out = f", {n_val:,} held-out" if cfg.val else ""
    run.begin(s.step, total, f"{len(train_examples):,} examples ({sum(map(len, train_examples)):,} tokens, "
              f"{sum(e.num_loss_tokens for e in train_examples):,} trained){held_out}; {total - s.step} steps to run, "
              f"{per_step} micro-batch(es) of {cfg.batch_rows} x {cfg.max_len} tokens each", model)
    return s


def save(s: SFTState, name: str) -> None:
    """Checkpoint `name`, with the data position and the last evaluation. Every process calls it."""
    s.run.save(name, s.model, s.optimizer, s.tokenizer, {
        "step": s.step, "consumed": s.consumed, "best_val_loss": s.best, "world": s.run.dist.world,
        "metrics": s.last_eval})


def held_out_eval(s: SFTState) -> dict:
    """Held-out loss (and accuracy, when the held-out replies hold answers), logged and recorded;
    `best` is saved when the loss beats every earlier evaluation."""
    cfg, dist = s.cfg, s.run.dist
    row: dict = {"kind": "eval", "step": s.step}
    with distributed.gathered(s.model):
        if s.val_batches:
            row["val_loss"] = held_out_loss(s.model, s.val_batches, s.run.device, cfg.precision, dist)
        if s.acc_items:
            res = evaluate(s.model, s.tokenizer, s.acc_items, max_new_tokens=cfg.max_new_tokens, dist=dist,
                           log=s.run.log)
            row.update(accuracy=res["accuracy"], accuracy_lo=res["accuracy_lo"], accuracy_hi=res["accuracy_hi"])
    s.run.record(row)
    s.last_eval = row
    if "val_loss" in row and row["val_loss"] < s.best:
        s.best = row["val_loss"]
        save(s, "best")
    s.run.log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return row


@interrupt.stop_on_signals()
def train_sft(cfg: SFTConfig, log=print, *, monitor=None) -> dict:
    """Run SFT as configured; returns the final metrics. Writes everything under cfg.out.

    Under torchrun every process runs this; rank 0 alone logs and writes (see module docstring).
    Ctrl-C or SIGTERM ends the run after the current step, with `last` saved (plumbing/interrupt.py).
    monitor: what watches the metrics as they come (plumbing/run.py; the script passes LiveMonitor).
    """
    s = start(cfg, log, monitor)
    dist, row = s.run.dist, {}
    t_last, tokens_since = time.perf_counter(), 0
    while s.step < s.total:
        lr = lr_at(s.step, base_lr=cfg.lr, total_steps=s.total, warmup_steps=min(cfg.warmup_steps, s.total),
                   kind=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
        set_lr(s.optimizer, lr)
        micro = s.order.take(s.consumed, s.per_step, dist)
        s.consumed += s.per_step
        step_loss, n_tokens = accumulate_gradients(s.trained, micro, s.run.device, cfg.precision, dist)
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.clip_grad).item()
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        tokens_since += sum(int(b.input_ids.numel()) for b in micro) * dist.world
        samples = int(dist.all_sum([sum(b.num_examples for b in micro)])[0])
        row = {"kind": "train", "step": s.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
               "loss_tokens": n_tokens, "samples": samples}
        if s.step % cfg.log_every == 0 or s.step == s.total:
            now = time.perf_counter()
            row["tok_per_s"] = tokens_since / (now - t_last)
            t_last, tokens_since = now, 0
            s.run.log(s.run.progress.line(s.step, loss=step_loss, lr=lr, tok_per_s=row["tok_per_s"]))
        s.run.record(row)
        eval_due = s.run.eval_due(s.step, s.total)
        if eval_due and cfg.val:
            held_out_eval(s)
        # Out of time between evaluations: evaluate the weights the run ends with.
        s.total = s.run.end_step(s.step, s.total, lambda name: save(s, name),
                               on_time_out=(lambda: held_out_eval(s)) if cfg.val and not eval_due else None)
    return {**s.last_eval, "step": s.step, "loss": row.get("loss", math.nan)}
