"""Checkpoints shaped like the real releases, through the scripts: SFT teaches each reply to end
with the chat format's end-of-turn token, and every later sampler stops there, though a base
release's eos_token is another token (<|endoftext|>, <|end_of_text|>)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanopost.plumbing.hf_io import load_model
from nanopost.data import tokenize_chat
from nanopost.eval import completions
from nanopost.prompts import PromptTemplate
from nanopost.plumbing.tokenizer import load_tokenizer
from chat_templates import QWEN2
from releases import END_OF_TURN, RELEASES, make_release
from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = PromptTemplate(instruction="Solve the problem.")  # what scripts/grpo.py renders by default
QUESTIONS = [f"{a} + {7 - a}" for a in range(8)]


def sft_records() -> list[dict]:
    return [{"messages": TEMPLATE.messages(q) + [{"role": "assistant", "content": TEMPLATE.target("7", "7")}]}
            for q in QUESTIONS]


def texts() -> list[str]:
    # The templates' default system text too, so that prompts are a few dozen tokens.
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant. Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024"
    return [system + TEMPLATE.user_message(q) + " " + TEMPLATE.target("7", "7") for q in QUESTIONS] * 4


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.mark.parametrize("name", list(RELEASES))
def test_stop_tokens_come_from_everything_the_checkpoint_declares(tmp_path, name):
    spec = RELEASES[name]
    tok = load_tokenizer(make_release(name, tmp_path / name, texts()))
    stops = [tok.id_to_token(i) for i in tok.stop_token_ids]
    assert stops[0] == END_OF_TURN[name] == tok.end_of_turn
    assert spec["tokenizer"]["eos_token"] in stops
    declared = spec["generation"]["eos_token_id"]
    assert set(declared if isinstance(declared, list) else [declared]) <= set(tok.stop_token_ids)
    # The token SFT trains every reply to end with is one the sampler stops on.
    example = tokenize_chat(tok, sft_records()[0]["messages"])
    last_target = max(i for i, m in enumerate(example.mask) if m)
    assert example.ids[last_target] == tok.stop_token_ids[0]


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_goes_through_sft_then_grpo_and_stops_at_the_end_of_turn(tmp_path, name):
    base = make_release(name, tmp_path / "base", texts())
    train = write_jsonl(sft_records(), tmp_path / "sft.jsonl")
    rl = write_jsonl([{"prompt": q, "answer": "7"} for q in QUESTIONS], tmp_path / "rl.jsonl")
    sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
    # 90 steps: at 60 the loss is still ~0.16, and whether greedy decoding is exact then turns
    # on rounding; by 90 it is below 0.01 whatever the summation order.
    out = run("sft.py", "--model", str(base), "--train", str(train), "--out", str(sft_dir),
              "--max-steps", "90", "--lr", "1e-2", "--warmup-steps", "0", "--schedule", "constant",
              "--weight-decay", "0", "--batch-rows", "8", "--max-len", "128", "--log-every", "90")
    assert f"stop tokens: {END_OF_TURN[name]}" in out.stdout
    tuned = sft_dir / "checkpoints" / "last"

    # transformers and vLLM read the stop tokens from generation_config.json: the end of turn first.
    tok = load_tokenizer(tuned)
    generation = json.loads((tuned / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tok.token_to_id(END_OF_TURN[name])

    # Greedy completions end at the end of the real turn, and say nothing after it.
    model = load_model(tuned)
    prompts = [tok.encode_chat(TEMPLATE.messages(q), add_generation_prompt=True) for q in QUESTIONS[:4]]
    for text in completions(model, tok, prompts, max_new_tokens=40):
        assert text.rstrip().endswith("<answer>7</answer>"), text

    run("grpo.py", "--model", str(tuned), "--train", str(rl), "--val", str(rl), "--out", str(grpo_dir),
        "--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "40",
        "--temperature", "0.7", "--eval-every", "2", "--eval-samples", "8", "--lr", "1e-6")
    train_rows, eval_rows = rows(grpo_dir, "train"), rows(grpo_dir, "eval")
    assert max(r["truncated_frac"] for r in train_rows) <= 0.25, train_rows
    assert min(r["reward_accuracy_mean"] for r in train_rows) >= 0.5, train_rows
    assert eval_rows[-1]["accuracy"] >= 0.75, eval_rows



# An edited template: a fine-tuned checkpoint's ChatML with one more statement than any release has.
EDITED_CHATML = "{% set greeting = 'hi' %}" + QWEN2


def test_an_edited_template_is_refused_with_the_override_named_then_trained_with_it(tmp_path):
    from tiny import larger_records, make_checkpoint, split_pairs

    train_pairs, _ = split_pairs()
    records = larger_records(train_pairs)
    base = make_checkpoint(tmp_path / "base", [r["prompt"] + " " + r["completion"] for r in records])
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = EDITED_CHATML
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    train = write_jsonl(records, tmp_path / "train.jsonl")
    args = ["--model", str(base), "--train", str(train), "--max-steps", "2", "--batch-rows", "4", "--max-len", "64"]

    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "sft.py"), *args, "--out", str(tmp_path / "a")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "unrecognised chat template" in refused.stderr and "--chat-format chatml|qwen3|llama3|llama3.1" in refused.stderr
    assert "Traceback" not in refused.stderr

    run("sft.py", *args, "--out", str(tmp_path / "b"), "--chat-format", "chatml")
    tuned = tmp_path / "b" / "checkpoints" / "last"
    # Kept with the checkpoint: the next stage loads it as it was trained, without the flag.
    tok = load_tokenizer(tuned)
    assert tok.chat_format.family == "chatml" and tok.chat_template == EDITED_CHATML
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_generation_ends_at_the_first_of_several_stop_tokens():
    from hf_reference import random_nano_model
    from nanopost.generate import generate

    model = random_nano_model("llama-gqa-untied")
    prompts = [[1, 5, 9], [3, 4], [7, 7, 2, 8]]
    greedy = generate(model, prompts, max_new_tokens=12, temperature=0)
    stops = [int(greedy.tokens[0, 5]), int(greedy.tokens[2, 2])]  # tokens rows really produce
    out = generate(model, prompts, max_new_tokens=12, temperature=0, stop_token_ids=stops)
    for i in range(len(prompts)):
        row = greedy.tokens[i].tolist()
        first = min((row.index(s) for s in stops if s in row), default=None)
        if first is None:
            assert not out.finished[i] and out.lengths[i] == 12
        else:
            assert out.finished[i] and out.lengths[i] == first + 1
            assert out.completion(i) == row[: first + 1]


@pytest.mark.parametrize("value", ["<|im_end|>", [151645, 10**7], True])
def test_a_bad_generation_config_eos_is_named(tmp_path, value):
    base = make_release("qwen2.5-instruct", tmp_path / "base", texts())
    generation = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": value}))
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be a token id"):
        load_tokenizer(base)
