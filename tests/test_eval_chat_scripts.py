"""scripts/eval.py and scripts/chat.py from the command line, on a tiny checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanopost.tools.chat import Conversation
from nanopost.plumbing.hf_io import load_config, load_model, load_tokenizer
from tiny import larger_rl_records, larger_task, split_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{script}", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripts")
    ckpt, _, _ = larger_task(d)
    records = [{**r, "difficulty": 1 + i % 2} for i, r in enumerate(larger_rl_records(split_pairs()[1]))]
    return ckpt, write_jsonl(records, d / "val.jsonl")


def test_eval_writes_accuracy_pass_at_k_and_levels_as_json_and_prints_a_table(task, tmp_path):
    ckpt, data = task
    out = tmp_path / "res" / "eval.json"
    proc = run("eval.py", "--model", str(ckpt), "--data", str(data), "--k", "2", "--temperature", "1.0",
               "--max-new-tokens", "6", "--samples", "12", "--out", str(out), "--device", "cpu",
               "--instruction", "Compare.", "--no-reasoning", "--task", "arithmetic")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["n"] == 12 and res["k"] == 2 and res["task"] == "arithmetic"
    assert 0 <= res["accuracy_lo"] <= res["accuracy"] <= res["accuracy_hi"] <= 1
    assert {"avg@2", "pass@2", "sample_completion"} <= set(res)
    assert {lvl: v["n"] for lvl, v in res["per_difficulty"].items()} == {"1": 6, "2": 6}
    table = proc.stdout.splitlines()
    assert table[0].startswith(f"accuracy    {res['accuracy']:.3f}  [") and table[0].endswith("greedy, 12 prompts")
    assert table[1].startswith("avg@2") and table[2].startswith("pass@2")
    assert table[3:] == ["difficulty  accuracy  prompts", f"1           {res['per_difficulty']['1']['accuracy']:.3f}     6",
                         f"2           {res['per_difficulty']['2']['accuracy']:.3f}     6"]


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "error: missing.jsonl: file not found"),
    (["--data", "{data}", "--kk", "2"], "error: unknown option --kk; did you mean --k?"),
    (["--data", "{data}", "--task", "chess"], "error: --task must be one of arithmetic, countdown, gsm8k"),
    (["--data", "{data}", "--k", "-1"], "error: --k must be >= 0"),
])
def test_eval_refuses_bad_input_in_one_line(task, args, message):
    ckpt, data = task
    proc = run("eval.py", "--model", str(ckpt), *[a.format(data=data) for a in args])
    assert proc.returncode == 2 and proc.stderr.startswith(message) and "Traceback" not in proc.stderr


def conversation(ckpt, *lines: str) -> list[str]:
    """The greedy replies to `lines`, one conversation, in process."""
    chat = Conversation(load_model(ckpt), load_tokenizer(ckpt), context=load_config(ckpt).max_position_embeddings,
                        system="Be brief.", temperature=0.0, max_new_tokens=8)
    replies = [chat.reply(line) for line in lines]
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * len(lines)
    return replies


def test_chat_one_shot_prints_the_reply(task):
    ckpt, _ = task
    proc = run("chat.py", "--model", str(ckpt), "--message", "Which is larger, 3 or 4?", "--system", "Be brief.",
               "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == conversation(ckpt, "Which is larger, 3 or 4?")[0] + "\n"


def test_chat_reads_turns_from_stdin_keeps_the_history_and_ends_at_eof(task):
    ckpt, _ = task
    lines = ["Which is larger, 3 or 4?", "And 5 or 2?"]
    proc = run("chat.py", "--model", str(ckpt), "--system", "Be brief.", "--temperature", "0",
               "--max-new-tokens", "8", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(r + "\n" for r in conversation(ckpt, *lines))
    quit_early = run("chat.py", "--model", str(ckpt), "--temperature", "0", "--max-new-tokens", "8",
                     stdin="/quit\nnever read\n")
    assert quit_early.returncode == 0 and quit_early.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--model", "missing"], "error: missing/tokenizer.json: not found"),
    (["--model", "{ckpt}", "--temperature", "-1"], "error: --temperature must be a finite number >= 0"),
    (["--model", "{ckpt}", "--mesage", "hi"], "error: unknown option --mesage; did you mean --message?"),
])
def test_chat_refuses_bad_input_in_one_line(task, args, message):
    ckpt, _ = task
    proc = run("chat.py", *[a.format(ckpt=ckpt) for a in args])
    assert proc.returncode == 2 and proc.stderr.startswith(message) and "Traceback" not in proc.stderr
