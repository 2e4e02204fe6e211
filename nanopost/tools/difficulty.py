"""How hard each prompt is for a model, and held-out accuracy per difficulty level.

    rates = estimate_pass_rates(model, tokenizer, records, render, check, k=4)   # {id: pass rate}
    save_pass_rates(path, rates); load_pass_rates(path)   # a cache: the pre-pass costs k samples a prompt
    make_sampler(cfg, records, pass_rates=rates)          # curriculum difficulty = 1 - pass rate
    per_difficulty_table(result) / write_report_table(run_dir)   # markdown, one row per level
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..curriculum import unique_keys
from ..generate import generate
from ..model import Transformer
from ..plumbing.files import read_json, write_atomic
from ..plumbing.metrics import read_metrics
from ..plumbing.tokenizer import Tokenizer


@torch.no_grad()
def estimate_pass_rates(
    model: Transformer,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    render: Callable[[dict], list[int]],
    check: Callable[[str, dict], float],
    *,
    k: int = 4,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Each record's fraction of k sampled completions that `check` scores correct (score >= 0.5).

    `render` turns a record into prompt token ids (the training prompt template, so the rates are
    those the loop will see); `check(completion, record)` is the task's answer check.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keys = unique_keys(records)
    prompts = [render(r) for r in records]
    rows = [i for i in range(len(records)) for _ in range(k)]  # k consecutive rows per record
    generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    correct = [0] * len(records)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            out = generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                           temperature=temperature, stop_token_ids=tokenizer.stop_token_ids,
                           generator=generator, pad_token_id=tokenizer.pad_token_id)
            for j, i in enumerate(chunk):
                text = tokenizer.decode(out.completion(j), skip_special_tokens=True)
                correct[i] += check(text, records[i]) >= 0.5
    finally:
        model.train(was_training)
    return {key: c / k for key, c in zip(keys, correct)}


def save_pass_rates(path: str | os.PathLike, rates: Mapping[str, float]) -> Path:
    """Write {id: pass rate} as JSON (atomically, so an interrupted run never leaves half a cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({str(k): float(v) for k, v in rates.items()}, indent=0, sort_keys=True) + "\n"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path


def load_pass_rates(path: str | os.PathLike) -> dict[str, float]:
    """{id: pass rate} from `save_pass_rates`; every value checked to be in [0, 1]."""
    data = read_json(Path(path))
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{path}: pass rate of {key!r} must be a number in [0, 1], got {value!r}")
    return {str(k): float(v) for k, v in data.items()}


def per_difficulty_table(result: Mapping | Sequence[Mapping], counts: Mapping | None = None) -> str:
    """Markdown table of held-out accuracy per difficulty level.

    `result` is an `evaluate` result ({"per_difficulty": {level: accuracy}}), an eval row of
    metrics.jsonl ({"accuracy_level_<level>": accuracy}), or scored rows
    [{"difficulty": level, "correct": score}, ...] (which also give the counts). `counts` maps
    level -> number of held-out prompts, e.g. Counter(r["difficulty"] for r in val_records).
    """
    if isinstance(result, Mapping):
        if "per_difficulty" in result:
            accuracy = {_level(k): float(v) for k, v in result["per_difficulty"].items()}
        else:
            prefix = "accuracy_level_"
            accuracy = {_level(k[len(prefix):]): float(v) for k, v in result.items() if k.startswith(prefix)}
        n = {_level(k): int(v) for k, v in (counts or {}).items()}
    else:
        scores: dict = defaultdict(list)
        for row in result:
            scores[_level(row.get("difficulty"))].append(float(row["correct"]))
        accuracy = {k: sum(v) / len(v) for k, v in scores.items()}
        n = {k: len(v) for k, v in scores.items()}
    if not accuracy:
        raise ValueError("per_difficulty_table: the result holds no per-difficulty accuracy")
    levels = sorted(accuracy, key=lambda x: (x is None, x if x is not None else 0.0))
    lines = ["| difficulty | n | accuracy |", "|---|---:|---:|"]
    for lvl in levels:
        lines.append(f"| {_fmt_level(lvl)} | {n.get(lvl, '')} | {accuracy[lvl]:.3f} |")
    if n and all(lvl in n for lvl in levels):
        total = sum(n[lvl] for lvl in levels)
        overall = sum(accuracy[lvl] * n[lvl] for lvl in levels) / max(total, 1)
        lines.append(f"| all | {total} | {overall:.3f} |")
    return "\n".join(lines) + "\n"


def write_report_table(
    run_dir: str | os.PathLike,
    result: Mapping | Sequence[Mapping] | None = None,
    *,
    counts: Mapping | None = None,
    title: str = "Held-out accuracy per difficulty",
    name: str = "per_difficulty.md",
) -> Path:
    """Write `per_difficulty_table` to run_dir/name; without a result, the run's last eval row."""
    run_dir = Path(run_dir)
    if result is None:
        evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
        if not evals:
            raise ValueError(f"{run_dir}: metrics.jsonl has no eval row to report")
        result = evals[-1]
        title = f"{title} (step {result['step']})"
    text = f"# {title}\n\n" + per_difficulty_table(result, counts)
    path = run_dir / name
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _level(value: Any) -> float | None:
    if value is None or value == "None":
        return None
    return float(value)


def _fmt_level(level: float | None) -> str:
    if level is None:
        return "unknown"
    return str(int(level)) if float(level).is_integer() else f"{level:g}"
