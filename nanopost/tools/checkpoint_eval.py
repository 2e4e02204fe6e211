"""Held-out accuracy of a checkpoint on an RL JSONL file, the command behind scripts/eval.py.

The prompts are rendered exactly as GRPO renders them (the same PromptTemplate options and
defaults, `rl.tokenize_prompts`, conversational records as written), and scored by the same
`eval.evaluate`, so a number printed here means what the training loop's eval rows mean.
The result is a dict (written as JSON with --out) and a short table:

    accuracy    0.433  [0.270, 0.611]  greedy, 30 prompts
    avg@8       0.388  T=1.0
    pass@8      0.700
    difficulty  accuracy  prompts
    1           0.600     10
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..eval import EvalItem, default_check, evaluate
from ..grpo_loop import GRPOConfig, prompt_key, tokenize_prompts
from ..plumbing.chat_template import CHAT_FORMAT_HELP, ChatFormatName
from ..plumbing.config import is_finite, require
from ..plumbing.data_files import load_rl
from ..plumbing.hf_io import load_config, load_model, load_tokenizer
from ..plumbing.runtime import pick_device
from ..prompts import PromptTemplate
from ..tasks import TASKS, get_task


@dataclass
class EvalConfig:
    """The options of scripts/eval.py; the prompt options and their defaults are GRPOConfig's."""

    model: str = field(default="", metadata={"help": "HF checkpoint directory"})
    data: str = field(default="", metadata={"help": "RL JSONL: {prompt|question, answer, difficulty?, id?}"})
    task: str | None = field(default=None, metadata={
        "help": "arithmetic | countdown | gsm8k: the task's answer check (none: the accuracy reward)"})
    chat_format: ChatFormatName | None = field(default=None, metadata={"help": CHAT_FORMAT_HELP})
    instruction: str = GRPOConfig.instruction
    system: str | None = GRPOConfig.system
    reasoning: bool = field(default=GRPOConfig.reasoning, metadata={
        "help": "ask for <think>...</think> before <answer>...</answer>"})
    max_new_tokens: int = GRPOConfig.max_new_tokens
    samples: int = field(default=0, metadata={"help": "evaluate the first N records (0: all)"})
    k: int = field(default=0, metadata={"help": "samples per prompt for avg@k and pass@k (0: greedy only)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of avg@k / pass@k"})
    batch_size: int = 64
    seed: int = 0
    out: str | None = field(default=None, metadata={"help": "write the result here as JSON"})
    device: str = "auto"

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ValueError("--model and --data are required")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(sorted(TASKS))}, got {self.task!r}")
        require(
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("--samples", self.samples, self.samples >= 0, ">= 0 (0: all)"),
            ("--k", self.k, self.k >= 0, ">= 0 (0: greedy only)"),
            ("--temperature", self.temperature, is_finite(self.temperature) and self.temperature >= 0,
             "a finite number >= 0"),
            ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
        )


def evaluate_checkpoint(cfg: EvalConfig, log: Callable[[str], None] = print) -> dict:
    """Evaluate cfg.model on cfg.data; returns the result (and writes it to cfg.out as JSON)."""
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, chat_format=cfg.chat_format)
    template = PromptTemplate(instruction=cfg.instruction, system=cfg.system, reasoning=cfg.reasoning)
    records = load_rl(cfg.data)
    records = records[: cfg.samples] if cfg.samples else records
    context = load_config(cfg.model).max_position_embeddings
    prompts = tokenize_prompts(tokenizer, template, cfg.data, records, cfg.max_new_tokens, context)
    items = [EvalItem(prompts[prompt_key(r)], r["answer"], r["difficulty"], r) for r in records]
    check = default_check
    if cfg.task:
        task = get_task(cfg.task)
        check = lambda completion, item: task.check(completion, item.record)  # noqa: E731
    model = load_model(cfg.model, device=device, dtype=torch.float32)
    res = evaluate(model, tokenizer, items, max_new_tokens=cfg.max_new_tokens, k=cfg.k, temperature=cfg.temperature,
                   check=check, batch_size=cfg.batch_size, seed=cfg.seed, log=log)
    counts = Counter(r["difficulty"] for r in records)
    # JSON keys are strings: a level is written as in the data ("1", "2.5"), no level as "none".
    res["per_difficulty"] = {_level(lvl): {"accuracy": acc, "n": counts[lvl]}
                             for lvl, acc in res["per_difficulty"].items()}
    result = {"model": str(cfg.model), "data": str(cfg.data), "task": cfg.task, "k": cfg.k,
              "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, **res}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _level(difficulty: float | None) -> str:
    return "none" if difficulty is None else f"{difficulty:g}"


def format_table(result: dict) -> str:
    """The result as a few aligned lines (see the module docstring)."""
    k = result["k"]
    lines = [f"accuracy    {result['accuracy']:.3f}  [{result['accuracy_lo']:.3f}, {result['accuracy_hi']:.3f}]"
             f"  greedy, {result['n']} prompts"]
    if k:
        lines += [f"{f'avg@{k}':<12}{result[f'avg@{k}']:.3f}  T={result['temperature']:g}",
                  f"{f'pass@{k}':<12}{result[f'pass@{k}']:.3f}"]
    levels = result["per_difficulty"]
    if list(levels) != ["none"]:  # a file without difficulties has one level: the whole
        lines.append("difficulty  accuracy  prompts")
        lines += [f"{lvl:<12}{v['accuracy']:<10.3f}{v['n']}" for lvl, v in levels.items()]
    return "\n".join(lines)
