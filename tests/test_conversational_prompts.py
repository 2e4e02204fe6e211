"""GRPO prompts given as conversations (TRL's conversational format) beside plain strings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanopost.plumbing.data_files import DataError, load_rl
from nanopost.prompts import PromptTemplate
from tiny import larger_rl_records, larger_task, split_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "Answer with the larger number."}


def conversational(records: list[dict]) -> list[dict]:
    return [{**r, "prompt": [SYSTEM, {"role": "user", "content": r["prompt"]}]} for r in records]


def test_load_rl_keeps_the_conversation_and_reads_the_question_from_the_last_user_turn(tmp_path):
    turns = [SYSTEM, {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3 + 3?"}]
    path = write_jsonl([{"prompt": turns, "answer": 6}, {"prompt": "1 + 1?", "answer": 2}], tmp_path / "rl.jsonl")
    conv, plain = load_rl(path)
    assert conv["messages"] == turns and conv["prompt"] == "And 3 + 3?" and conv["answer"] == "6"
    assert "messages" not in plain and plain["prompt"] == "1 + 1?"
    template = PromptTemplate(instruction="Solve the problem.")
    assert template.record_messages(conv) == turns  # as written: no instruction, no format request
    assert template.record_messages(plain) == template.messages("1 + 1?")


@pytest.mark.parametrize("prompt, message", [
    ([], 'field "prompt" is an empty list of messages'),
    ([SYSTEM, "hi"], 'field "prompt"[1] must be an object, got a string'),
    ([SYSTEM, {"role": "robot", "content": "hi"}], 'field "prompt"[1].role must be one of system/user/assistant'),
    ([{"role": "user"}], 'missing field "prompt"[0].content'),
    ([{"role": "user", "content": 3}], 'field "prompt"[0].content must be a string'),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "4"}],
     'field "prompt"[1] is a assistant message; a conversational prompt ends with the user message'),
    ([{"role": "assistant", "content": "4"}, {"role": "user", "content": "hi"}],
     'field "prompt"[0] is an assistant turn'),
    ([SYSTEM, {"role": "user", "content": "  "}], 'field "prompt"[1].content is empty'),
    (3, 'field "prompt" must be a string, got a number (a conversation is a list of'),
])
def test_load_rl_refuses_bad_conversations_naming_line_and_message(tmp_path, prompt, message):
    path = write_jsonl([{"prompt": "1 + 1?", "answer": 2}, {"prompt": prompt, "answer": 2}], tmp_path / "rl.jsonl")
    with pytest.raises(DataError) as e:
        load_rl(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_load_rl_refuses_a_messages_field_that_would_pass_for_a_conversation(tmp_path):
    path = write_jsonl([{"prompt": "1 + 1?", "answer": 2, "messages": []}], tmp_path / "rl.jsonl")
    with pytest.raises(DataError, match=r':1: field "messages" belongs to SFT records'):
        load_rl(path)


def test_grpo_script_trains_on_conversational_prompts(tmp_path):
    ckpt, _, _ = larger_task(tmp_path)
    train, val = split_pairs()
    train_file = write_jsonl(conversational(larger_rl_records(train)), tmp_path / "train.jsonl")
    val_file = write_jsonl(conversational(larger_rl_records(val)), tmp_path / "val.jsonl")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "scripts/grpo.py", "--model", str(ckpt), "--train", str(train_file), "--val", str(val_file),
         "--out", str(out), "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
         "--eval-samples", "4", "--eval-every", "0", "--device", "cpu", "--rewards", "{accuracy = 1.0, thinking = 0.1}"],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert any(r["kind"] == "eval" for r in rows)
