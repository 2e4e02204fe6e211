"""SFT: gradient accumulation, exact resume, learning a small task, and bad inputs."""

import math

import pytest
import torch

from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.data import make_batch, tokenize_chat
from nanopost.plumbing.data_files import load_sft
from nanopost.plumbing.metrics import read_metrics
from nanopost.plumbing.training_checkpoint import CheckpointError, checkpoint_path
from nanopost.sft_loop import SFTConfig, accumulate_gradients, train_sft
from tiny import larger_records, larger_task, make_checkpoint, split_pairs, write_jsonl


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return larger_task(tmp_path_factory.mktemp("larger"))


def config(task, out, **kw) -> SFTConfig:
    ckpt, train, val = task
    base = dict(model=str(ckpt), train=str(train), val=str(val), out=str(out), max_len=64, batch_rows=16,
                lr=3e-3, warmup_steps=5, eval_every=0, max_new_tokens=8, log_every=1000)
    return SFTConfig(**{**base, **kw})


def test_accumulated_gradients_equal_one_big_batch(tmp_path):
    # Very different lengths: one short reply and long ones, so per-micro-batch means would differ.
    records = [{"prompt": "hi " * (1 + 7 * (i % 3)), "completion": "ok " * (1 + 11 * (i % 4))} for i in range(8)]
    ckpt = make_checkpoint(tmp_path, [r["prompt"] + r["completion"] for r in records])
    tok = load_tokenizer(ckpt)
    examples = [tokenize_chat(tok, m) for m in load_sft(write_jsonl(records, tmp_path / "d.jsonl"))]
    assert len({e.num_loss_tokens for e in examples}) >= 3

    def grads(micro):
        model = load_model(ckpt)
        loss, n = accumulate_gradients(model, micro, torch.device("cpu"))
        return loss, n, [p.grad.clone() for p in model.parameters()]

    one = grads([make_batch(examples)])
    four = grads([make_batch(examples[i : i + 2]) for i in range(0, 8, 2)])
    assert one[1] == four[1]
    assert math.isclose(one[0], four[0], rel_tol=1e-5)
    for a, b in zip(one[2], four[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_lowers_held_out_loss_and_raises_accuracy(task, tmp_path):
    result = train_sft(config(task, tmp_path, max_steps=300, eval_every=150), log=lambda *_: None)
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [150, 300]
    assert result["val_loss"] < 0.05 and result["accuracy"] >= 0.8  # chance is ~0.5 for "which is larger"
    assert load_model(checkpoint_path(tmp_path, "best"))  # best and last checkpoints are loadable models
    assert load_model(checkpoint_path(tmp_path, "last"))


class Killed(Exception):
    pass


def test_resume_after_kill_gives_bitwise_identical_weights(task, tmp_path):
    straight = tmp_path / "straight"
    train_sft(config(task, straight, max_steps=8, save_every=4, grad_accum=2), log=lambda *_: None)

    def die_after_step_5(line):
        if line.startswith("step 5/"):
            raise Killed  # as if the process were killed after step 5, before its next checkpoint

    broken = tmp_path / "broken"
    with pytest.raises(Killed):
        train_sft(config(task, broken, max_steps=8, save_every=4, grad_accum=2, log_every=1), log=die_after_step_5)
    train_sft(config(task, broken, max_steps=8, save_every=4, grad_accum=2, resume=True), log=lambda *_: None)

    a = load_model(checkpoint_path(straight, "last")).state_dict()
    b = load_model(checkpoint_path(broken, "last")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(broken) if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # the rows of the lost step 5 were replaced, not duplicated


def test_corrupt_checkpoint_is_named_on_resume(task, tmp_path):
    train_sft(config(task, tmp_path, max_steps=2), log=lambda *_: None)
    state = checkpoint_path(tmp_path, "last") / "trainer_state" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt checkpoint.*state.pt"):
        train_sft(config(task, tmp_path, max_steps=4, resume=True), log=lambda *_: None)


def test_bad_training_file_names_file_and_line(task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*completion"):
        train_sft(config(task, tmp_path / "run", train=str(bad), max_steps=1), log=lambda *_: None)


def test_over_long_examples_are_reported(task, tmp_path):
    records = larger_records(split_pairs()[0]) + [{"prompt": "Which is larger? " * 5, "completion": "<answer>1</answer>"}]
    train = write_jsonl(records, tmp_path / "train.jsonl")  # every example has 33 tokens but the last
    lines = []
    train_sft(config(task, tmp_path / "run", train=str(train), max_len=40, max_steps=1, overflow="drop"),
              log=lines.append)
    assert any("train.jsonl: 1 example(s) longer than 41 tokens (drop)" in line for line in lines)


def test_script_reports_a_mistyped_option_without_traceback():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/sft.py", "--model", "m", "--train", "t", "--lrr", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown option --lrr; did you mean --lr?"


def test_an_epoch_logs_every_example_once_as_samples(task, tmp_path):
    train_sft(config(task, tmp_path, val=None, epochs=1.0, batch_rows=4), log=lambda *_: None)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(rows) > 1 and sum(r["samples"] for r in rows) == len(load_sft(task[1]))
