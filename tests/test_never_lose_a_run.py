"""A run is never lost: a used --out is refused, Ctrl-C and SIGTERM save and say how to resume, and
--resume continues only the same run from a whole checkpoint. What a user meets through a script
(exit statuses, messages, files left behind) is tested through the script."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nanopost.plumbing.metrics import read_metrics
from nanopost.grpo_loop import GRPOConfig, train_grpo
from nanopost.plumbing.training_checkpoint import CheckpointError, checkpoint_path, read_summary
from nanopost.sft_loop import SFTConfig, train_sft
from tiny import larger_rl_records, larger_task, sevens, split_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    ckpt, train, val = larger_task(d)
    rl = write_jsonl(larger_rl_records(split_pairs()[0]), d / "rl.jsonl")
    return {"model": ckpt, "train": train, "val": val, "rl": rl}


def sft(task, out, **kw) -> SFTConfig:
    base = dict(model=str(task["model"]), train=str(task["train"]), out=str(out), max_len=64, batch_rows=16,
                lr=3e-3, warmup_steps=0, eval_every=0, max_new_tokens=8, log_every=1000, max_steps=2)
    return SFTConfig(**{**base, **kw})


def grpo(task, out, **kw) -> GRPOConfig:
    base = dict(model=str(task["model"]), train=str(task["rl"]), out=str(out), rewards={"sevens": 1.0}, steps=2,
                prompts_per_step=2, group_size=4, max_new_tokens=8, lr=3e-3, eval_every=0)
    return GRPOConfig(**{**base, **kw})


def script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def sft_flags(task, out) -> list:
    return ["--model", task["model"], "--train", task["train"], "--out", out, "--max-len", 64, "--batch-rows", 16,
            "--warmup-steps", 0, "--eval-every", 0]


# ---------------------------------------------------------------- a used or unusable --out


def test_a_new_run_into_a_used_out_is_refused_and_overwrite_replaces_it(task, tmp_path):
    out = tmp_path / "run"
    train_sft(sft(task, out, max_steps=3), log=quiet)
    rows, saved = read_metrics(out), (checkpoint_path(out) / "model.safetensors").read_bytes()

    again = script("sft.py", *sft_flags(task, out), "--max-steps", 2)  # the same command again
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.startswith(f"error: --out {out} already holds a run (metrics.jsonl (3 rows), checkpoints/last)")
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert read_metrics(out) == rows  # nothing written, nothing deleted
    assert (checkpoint_path(out) / "model.safetensors").read_bytes() == saved
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3

    lines = []
    train_sft(sft(task, out, max_steps=2, overwrite=True), log=lines.append)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert read_summary(checkpoint_path(out))["step"] == 2
    assert any(line.startswith(f"--overwrite: removed the earlier run in {out}") for line in lines)
    with pytest.raises(ValueError, match="--resume continues the run in --out and --overwrite replaces it"):
        train_sft(sft(task, out, resume=True, overwrite=True), log=quiet)


def test_an_out_that_cannot_be_written_is_refused_before_step_1(task, tmp_path):
    # The tests run as root, whom chmod does not stop; a path through a regular file fails for everyone.
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    is_file = script("sft.py", *sft_flags(task, a_file))
    assert is_file.returncode == 2 and "Traceback" not in is_file.stderr
    assert is_file.stderr.strip() == f"error: --out {a_file}: {a_file} is a file, not a directory"

    under = script("sft.py", *sft_flags(task, a_file / "sub"))
    assert under.returncode == 2 and "Traceback" not in under.stderr
    assert under.stderr.strip() == f"error: --out {a_file / 'sub'}: cannot write in {a_file / 'sub'} (Not a directory)"

    # checkpoints/ unusable: found at the start, not at the first save after all the training
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("")
    lines = []
    with pytest.raises(ValueError, match=re.escape(f"--out {out}: {out / 'checkpoints'} is a file, not a directory")):
        train_sft(sft(task, out, max_steps=50), log=lines.append)
    assert not (out / "metrics.jsonl").exists() and not lines


# ---------------------------------------------------------------- Ctrl-C and SIGTERM


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def wait_for_step(proc: subprocess.Popen, out: Path, log: Path, after: int = 0, timeout: float = 90) -> None:
    """Until metrics.jsonl has a train row past step `after` (the run is in its loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text()}"
        path = out / "metrics.jsonl"
        if path.is_file() and any(r["kind"] == "train" and r["step"] > after for r in read_metrics(path)):
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no train row past step {after} in {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen, signum: int, log: Path) -> str:
    proc.send_signal(signum)
    proc.wait(timeout=60)
    return log.read_text()


def test_ctrl_c_then_sigterm_during_grpo_with_default_saves(task, tmp_path):
    out, log = tmp_path / "grpo", tmp_path / "log.txt"
    command = [str(ROOT / "scripts" / "grpo.py"), "--model", str(task["model"]), "--train", str(task["rl"]),
               "--out", str(out), "--steps", "1000", "--prompts-per-step", "2", "--group-size", "4",
               "--max-new-tokens", "8"]
    proc = start(command, log)
    wait_for_step(proc, out, log)
    text = stop(proc, signal.SIGINT, log)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    step = read_summary(checkpoint_path(out))["step"]
    assert f"stopped by SIGINT after step {step}; saved {checkpoint_path(out)}" in text
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))

    # The printed command continues the run, and SIGTERM stops it the same way.
    hint = next(line for line in text.splitlines() if line.startswith("continue with: "))
    again = shlex.split(hint[len("continue with: "):])
    assert again[0] == "python" and again[-1] == "--resume" and again[1:-1] == command
    proc = start(again[1:], log)
    wait_for_step(proc, out, log, after=step)
    text = stop(proc, signal.SIGTERM, log)
    assert proc.returncode == 143, text
    assert "Traceback" not in text
    assert f"resumed from {checkpoint_path(out)} at step {step}" in text
    later = read_summary(checkpoint_path(out))["step"]
    assert later > step and f"stopped by SIGTERM after step {later}" in text
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == list(range(1, later + 1))


def test_ctrl_c_during_sft_saves_last_without_a_traceback(task, tmp_path):
    out, log = tmp_path / "sft", tmp_path / "log.txt"
    args = [str(ROOT / "scripts" / "sft.py"), *map(str, sft_flags(task, out)), "--max-steps", "100000",
            "--log-every", "1"]
    proc = start(args, log)
    wait_for_step(proc, out, log)
    text = stop(proc, signal.SIGINT, log)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    step = read_summary(checkpoint_path(out))["step"]
    assert step >= 1 and f"stopped by SIGINT after step {step}; saved {checkpoint_path(out)}" in text
    assert f"continue with: python {shlex.join(args)} --resume" in text


def test_a_second_signal_stops_at_once_and_handlers_are_restored(tmp_path):
    program = textwrap.dedent("""
        import os, signal, time
        from nanopost.plumbing.interrupt import requested, stop_on_signals

        before = signal.getsignal(signal.SIGTERM)
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            print("recorded", requested(), flush=True)
        print("restored", signal.getsignal(signal.SIGTERM) is before, requested(), flush=True)
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=30)
    assert proc.stdout.split("\n")[:2] == [f"recorded {int(signal.SIGTERM)}", "restored True 0"]
    assert proc.returncode == 130 and "not reached" not in proc.stdout
    assert "SIGINT again: stopping now" in proc.stderr and "Traceback" not in proc.stderr


def test_grpo_saves_at_evals_by_default_and_best_when_accuracy_improves(task, tmp_path):
    evals = []

    def log(line):
        if line.startswith("eval step"):
            evals.append(line)
        if line.startswith("step 3/"):  # by default a checkpoint at every --eval-every step, as in SFT
            assert read_summary(checkpoint_path(tmp_path))["step"] == 2

    # Held-out accuracy 0 (step 0, the starting model), then 1 (step 2), then 0 (step 4).
    train_grpo(grpo(task, tmp_path, steps=4, eval_every=2, val=str(task["rl"]), eval_samples=2, log_every=1),
               extra_rewards={"sevens": sevens}, check=lambda completion, item: len(evals) == 1, log=log)
    assert len(evals) == 3
    best = read_summary(checkpoint_path(tmp_path, "best"))
    assert (best["step"], best["best_accuracy"]) == (2, 1.0)
    assert read_summary(checkpoint_path(tmp_path))["step"] == 4


# ---------------------------------------------------------------- --resume


def test_resume_refuses_options_that_change_the_run(task, tmp_path):
    out = tmp_path / "sft"
    train_sft(sft(task, out, max_steps=2), log=quiet)
    saved = (out / "config.json").read_text()
    changed = dict(train=str(task["val"]), lr=1e-3, max_steps=1, batch_rows=8, schedule="constant")
    with pytest.raises(ValueError, match="--resume would change what the run in") as e:
        train_sft(sft(task, out, resume=True, **changed), log=quiet)
    message = str(e.value)
    for line in (f"--train: {task['train']} → {task['val']}", "--lr: 0.003 → 0.001", "--max-steps: 2 → 1",
                 "--batch-rows: 16 → 8", "--schedule: cosine → constant",
                 "--resume-override train,batch-rows,max-steps,lr,schedule"):
        assert line in message
    assert (out / "config.json").read_text() == saved  # the saved options stay until a resume is accepted

    # Safe changes are logged; named ones are allowed; a longer run continues the same one.
    lines = []
    train_sft(sft(task, out, resume=True, max_steps=3, eval_every=5, lr=1e-3, resume_override=["lr"]),
              log=lines.append)
    assert "resuming with a changed option: --max-steps: 2 → 3" in lines
    assert "resuming with a changed option: --eval-every: 0 → 5" in lines
    assert "resuming with a changed option: --lr: 0.003 → 0.001 (--resume-override)" in lines
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    with pytest.raises(ValueError, match="--resume-override: no option --lrr"):
        train_sft(sft(task, out, resume=True, max_steps=3, lr=1e-3, resume_override=["lrr"]), log=quiet)


def test_grpo_resume_with_other_data_or_groups_is_refused_not_an_index_error(task, tmp_path):
    out, train = tmp_path / "grpo", tmp_path / "train.jsonl"
    train.write_text(Path(task["rl"]).read_text())
    train_grpo(grpo(task, out, train=str(train), steps=3, save_every=1), extra_rewards={"sevens": sevens}, log=quiet)
    small = write_jsonl(larger_rl_records(split_pairs()[0][:3]), tmp_path / "small.jsonl")
    with pytest.raises(ValueError, match="--resume would change") as e:
        train_grpo(grpo(task, out, steps=6, resume=True, train=str(small), group_size=2, prompts_per_step=3,
                        beta=0.1), extra_rewards={"sevens": sevens}, log=quiet)
    for line in (f"--train: {train} → {small}", "--group-size: 4 → 2", "--prompts-per-step: 2 → 3",
                 "--beta: 0.0 → 0.1"):
        assert line in str(e.value)
    # The same file name with other contents: the sampler's saved state does not fit it.
    train.write_text(small.read_text())
    with pytest.raises(ValueError, match="sampler state was saved over 70 prompts and the training data has 3"):
        train_grpo(grpo(task, out, train=str(train), steps=6, resume=True), extra_rewards={"sevens": sevens},
                   log=quiet)


def test_resume_over_a_broken_checkpoint_says_what_to_do(task, tmp_path):
    out = tmp_path / "run"
    train_sft(sft(task, out, max_steps=2), log=quiet)
    summary = checkpoint_path(out) / "trainer_state" / "state.json"
    summary.write_text('{"step": 2, "saved_at": ')  # cut short
    proc = script("sft.py", *sft_flags(task, out), "--max-steps", 4, "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert message.startswith(f"error: {checkpoint_path(out)}: corrupt checkpoint: {summary} cannot be read")
    assert "delete it or resume from another checkpoint" in message and "--overwrite" in message
    assert read_metrics(out)[-1]["step"] == 2  # nothing trained over it

    # A checkpoint without its trainer state (a copy cut short) is reported too, not skipped.
    summary.write_text(json.dumps({"step": 2}))
    (checkpoint_path(out) / "trainer_state" / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="state.pt is missing.*delete it or resume from another checkpoint"):
        train_sft(sft(task, out, max_steps=4, resume=True), log=quiet)
    # Rows but no checkpoint at all: --resume does not quietly start afresh.
    (out / "checkpoints" / "last").rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"holds no checkpoint to resume from, only metrics.jsonl \(2 rows\)"):
        train_sft(sft(task, out, max_steps=4, resume=True), log=quiet)
