"""A tiny task, tokenizer and model checkpoint that train in seconds on a CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from nanopost.plumbing.hf_io import save_model
from nanopost.model import ModelConfig, Transformer
from nanopost.plumbing.tokenizer import train_bpe


def larger_records(pairs) -> list[dict]:
    """'Which is larger, a or b?' -> '<answer>max</answer>': learnable, with disjoint held-out pairs."""
    return [{"prompt": f"Which is larger, {a} or {b}?", "completion": f"<answer>{max(a, b)}</answer>"}
            for a, b in pairs]


def larger_rl_records(pairs) -> list[dict]:
    """The same task as prompt/answer records for GRPO."""
    return [{"prompt": r["prompt"], "answer": r["completion"][len("<answer>"):-len("</answer>")]}
            for r in larger_records(pairs)]


def sevens(completion: str, sample: dict) -> float:
    """A dense toy reward: how much of the text is the digit 7."""
    return 10 * completion.count("7") / max(len(completion), 1)


def split_pairs(seed: int = 0):
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    random.Random(seed).shuffle(pairs)
    return pairs[:70], pairs[70:]


def write_jsonl(records, path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_checkpoint(path: Path, texts: list[str], *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Train a byte-level BPE on texts, build a random Qwen2-style model with its vocab, save both."""
    tokenizer = train_bpe(texts, vocab_size=320)
    cfg = ModelConfig(model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    save_model(model, path)
    tokenizer.save(path)
    return path


def larger_task(tmp_path: Path):
    """(checkpoint dir, train.jsonl, val.jsonl) for the 'larger number' task."""
    train, val = split_pairs()
    train_file = write_jsonl(larger_records(train), tmp_path / "train.jsonl")
    val_file = write_jsonl(larger_records(val), tmp_path / "val.jsonl")
    texts = [r["prompt"] + " " + r["completion"] for r in larger_records(train + val)]
    return make_checkpoint(tmp_path / "base", texts), train_file, val_file
