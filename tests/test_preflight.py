"""What can be known before the first step is refused before it, naming the option or file:line;
and a run whose loss turns NaN stops without writing NaN weights over its checkpoints."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanopost.grpo_loop as rl
import nanopost.sft_loop as sft
from nanopost.plumbing.hf_io import load_model
from nanopost.plumbing.config import ConfigError, parse_config
from nanopost.plumbing.metrics import MetricsLogger, read_metrics
from nanopost.plumbing.run import Diverged
from nanopost.tools.monitor import LiveMonitor, format_report
from nanopost.grpo_loop import GRPOConfig, train_grpo
from nanopost.plumbing.training_checkpoint import CheckpointError, checkpoint_path, save_checkpoint
from nanopost.plumbing.runtime import pick_device
from nanopost.sft_loop import SFTConfig, train_sft
from tiny import larger_rl_records, larger_task, sevens, split_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT)}, timeout=300)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("preflight")
    ckpt, train, val = larger_task(d)  # the model's context is 256 positions
    rl_file = write_jsonl(larger_rl_records(split_pairs()[0]), d / "rl.jsonl")
    return {"model": ckpt, "train": train, "val": val, "rl": rl_file}


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: the checks must come before it."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(sft, "load_model", refuse)
    monkeypatch.setattr(rl, "load_model", refuse)


def quiet(*_):
    pass


# ---------------------------------------------------------------- option ranges, at parse time

BASE = ["--model", "m", "--train", "t"]


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "-5"], "--max-steps must be >= 0"),
    (["--epochs", "0"], r"--epochs must be a finite number > 0 \(or give --max-steps\), got 0.0"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr", "-1e-4"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--betas", "0.9,1.0"], r"--betas must be two numbers in \[0, 1\)"),
    (["--clip-grad", "0"], "--clip-grad must be > 0"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--max-len", "1"], "--max-len must be >= 2"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--val", "v", "--eval-accuracy-samples", "0"], "--eval-accuracy-samples must be >= 1 with --val"),
])
def test_sft_options_out_of_range_are_refused_by_name(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(SFTConfig, BASE + argv)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--clip-low", "2"], r"--clip-low must be in \[0, 1\)"),
    (["--clip-high", "-0.1"], "--clip-high must be a finite number >= 0"),
    (["--minibatches", "100"], r"--minibatches must be in \[1, 64\]: a step has --prompts-per-step 8 x --group-size 8"),
    (["--temperature-end", "0.5"], "--temperature-end is used only by --temperature-schedule linear or cosine, and "
                                   "this run's is constant"),
    (["--temperature-schedule", "cosine"], "--temperature-schedule cosine needs --temperature-end"),
    (["--temperature-stages", "[[0.5, 0.7]]"], "--temperature-stages is used only by --temperature-schedule stages"),
    (["--temperature-schedule", "stages", "--temperature-stages", "[[0.5, 0.7], [0.2, 1.0]]"],
     "--temperature-stages: stage boundaries must be in increasing order"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be >= 1"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--beta", "-0.01"], "--beta must be a finite number >= 0"),
    (["--dual-clip", "0.5"], "--dual-clip must be > 1"),
    (["--mu", "0"], "--mu must be >= 1"),
    (["--overlong-buffer", "200"], r"--overlong-buffer must be in \[0, --max-new-tokens 128\]"),
    (["--val", "v", "--eval-samples", "0"], "--eval-samples must be >= 1 with --val"),
])
def test_grpo_options_out_of_range_are_refused_by_name(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(GRPOConfig, BASE + argv)


def test_settings_in_range_still_parse():
    assert parse_config(SFTConfig, BASE + ["--epochs", "0", "--max-steps", "5"]).max_steps == 5
    # a warmup longer than a short trial run is capped by the schedule, not refused
    assert parse_config(SFTConfig, BASE + ["--max-steps", "2"]).warmup_steps == 10
    cfg = parse_config(GRPOConfig, BASE + ["--temperature-schedule", "linear", "--temperature-end", "0.6",
                                           "--minibatches", "64", "--clip-grad", "inf"])
    assert (cfg.temperature_end, cfg.minibatches, cfg.clip_grad) == (0.6, 64, math.inf)


def test_script_refuses_a_negative_step_count_in_one_line():
    out = script("sft.py", *BASE, "--max-steps", "-5")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --max-steps must be >= 0 (0: as many as --epochs take), got -5"


# ---------------------------------------------------------------- the device


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_cuda_on_a_machine_without_it_is_refused_naming_device():
    with pytest.raises(ValueError, match="--device cuda: .*; use --device cpu"):
        pick_device("cuda")
    out = script("grpo.py", *BASE, "--device", "cuda")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: --device cuda: ")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_unknown_or_missing_devices_are_refused_naming_device():
    with pytest.raises(ValueError, match="--device: unknown device 'gpu'"):
        pick_device("gpu")
    with pytest.raises(ValueError, match="--device mps: MPS"):
        pick_device("mps")
    with pytest.raises(ConfigError, match="--device: unknown device 'cuda:x'"):
        parse_config(SFTConfig, BASE + ["--device", "cuda:x"])
    assert pick_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------- data against the model's context


def grpo_config(task, out, **kw) -> GRPOConfig:
    base = dict(model=str(task["model"]), train=str(task["rl"]), out=str(out), rewards={"sevens": 1.0}, steps=1,
                prompts_per_step=2, group_size=2, max_new_tokens=16, lr=1e-3, eval_every=0, log_every=1)
    return GRPOConfig(**{**base, **kw})


def with_long_prompt(path: Path, line: int) -> Path:
    records = larger_rl_records(split_pairs()[0])
    records.insert(line - 1, {"prompt": "Which is larger, 3 or 4? " * 30, "answer": "4"})
    return write_jsonl(records, path)


def test_an_over_long_rl_prompt_is_refused_at_its_line_before_the_model_loads(task, tmp_path, no_model):
    train = with_long_prompt(tmp_path / "long.jsonl", line=5)
    with pytest.raises(ValueError, match=r"long.jsonl:5: the prompt is \d+ tokens with the chat template; with "
                                         r"--max-new-tokens 16 it needs \d+ positions, but the model's context is 256 "
                                         r".* 1 of 71 prompt\(s\) checked in .*long.jsonl are too long"):
        train_grpo(grpo_config(task, tmp_path / "run", train=str(train)), extra_rewards={"sevens": sevens}, log=quiet)
    # the held-out file too, whose prompts are sampled at the first evaluation
    with pytest.raises(ValueError, match=r"long.jsonl:5: the prompt is"):
        train_grpo(grpo_config(task, tmp_path / "run2", val=str(train)), extra_rewards={"sevens": sevens}, log=quiet)


def test_script_names_the_over_long_line(task, tmp_path):
    train = with_long_prompt(tmp_path / "long.jsonl", line=3)
    out = script("grpo.py", "--model", str(task["model"]), "--train", str(train), "--out", str(tmp_path / "run"),
                 "--max-new-tokens", "16", "--rewards", "{accuracy = 1.0}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {train}:3: the prompt is ")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_max_new_tokens_above_the_context_is_refused_by_name(task, tmp_path, no_model):
    with pytest.raises(ValueError, match="--max-new-tokens 300 does not fit the model's context of 256 positions"):
        train_grpo(grpo_config(task, tmp_path / "run", max_new_tokens=300), extra_rewards={"sevens": sevens}, log=quiet)
    sft_cfg = SFTConfig(model=str(task["model"]), train=str(task["train"]), val=str(task["val"]),
                        out=str(tmp_path / "s"), max_len=64, max_steps=1, max_new_tokens=300)
    with pytest.raises(ValueError, match="--max-new-tokens 300 does not fit"):
        train_sft(sft_cfg, log=quiet)


def test_more_prompts_per_step_than_the_file_holds_is_refused_with_both_numbers(task, tmp_path, no_model):
    train = write_jsonl(larger_rl_records(split_pairs()[0])[:64], tmp_path / "64.jsonl")
    with pytest.raises(ValueError, match=r"--prompts-per-step 1000 is more than the 64 prompt\(s\) in .*64.jsonl"):
        train_grpo(grpo_config(task, tmp_path / "run", train=str(train), prompts_per_step=1000),
                   extra_rewards={"sevens": sevens}, log=quiet)


def test_sft_max_len_above_the_context_is_refused(task, tmp_path, no_model):
    cfg = SFTConfig(model=str(task["model"]), train=str(task["train"]), out=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ValueError, match="--max-len 512 is more than the model's context of 256 positions"):
        train_sft(cfg, log=quiet)


def test_sft_held_out_prompt_too_long_to_answer_is_refused_at_its_line(task, tmp_path, no_model):
    val = [json.loads(line) for line in Path(task["val"]).read_text().splitlines()][:4]
    val.insert(2, {"prompt": "Which is larger, 3 or 4? " * 30, "completion": "<answer>4</answer>"})
    val_file = write_jsonl(val, tmp_path / "val.jsonl")
    cfg = SFTConfig(model=str(task["model"]), train=str(task["train"]), val=str(val_file), out=str(tmp_path / "run"),
                    max_len=64, max_steps=1, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"val.jsonl:3: the prompt is \d+ tokens .* 1 of 5 prompt\(s\)"):
        train_sft(cfg, log=quiet)


# ---------------------------------------------------------------- non-finite losses


def test_the_live_monitor_sees_a_logged_nan_as_a_number(tmp_path):
    monitor = LiveMonitor(stop_on=["lr_too_high"], log=None)
    row = MetricsLogger(tmp_path).log({"kind": "train", "step": 2, "loss": math.nan, "grad_norm": math.inf})
    assert math.isnan(row["loss"]) and row["grad_norm"] == math.inf
    assert [f.code for f in monitor.observe(row)] == ["lr_too_high"]
    assert monitor.should_stop
    assert '"loss": "nan"' in (tmp_path / "metrics.jsonl").read_text()  # the file still holds plain JSON


def test_script_stops_a_diverging_run_without_saving_nan_weights(task, tmp_path):
    run = tmp_path / "run"
    out = script("sft.py", "--model", str(task["model"]), "--train", str(task["train"]), "--out", str(run),
                 "--max-len", "64", "--batch-rows", "16", "--max-steps", "4", "--warmup-steps", "0", "--lr", "1e38",
                 "--stop-on", "lr_too_high")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "monitor at step 2: [error] lr_too_high" in out.stdout
    assert out.stderr.startswith("error: training diverged at step 2: loss nan")
    assert "Lower the learning rate (--lr 1e+38" in out.stderr
    assert not checkpoint_path(run, "last").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_grpo_stops_at_the_first_non_finite_loss(task, tmp_path):
    rng = random.Random(0)  # rewards that differ within every group, so every step updates the weights
    cfg = grpo_config(task, tmp_path, steps=4, lr=1e38, max_new_tokens=4, rewards={"noise": 1.0})
    with pytest.raises(Diverged, match="training diverged at step 2: loss nan, grad_norm nan"):
        train_grpo(cfg, extra_rewards={"noise": lambda completion, sample: rng.random()}, log=quiet)
    assert not checkpoint_path(tmp_path, "last").exists()


def test_non_finite_weights_never_replace_a_checkpoint(task, tmp_path):
    model = load_model(task["model"])
    path = checkpoint_path(tmp_path, "last")
    save_checkpoint(path, model=model, extra={"step": 1})
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    with pytest.raises(CheckpointError, match="not written: 1 weight tensor.* hold NaN or inf .* is kept"):
        save_checkpoint(path, model=model, extra={"step": 2})
    assert all(t.isfinite().all() for t in load_model(path).state_dict().values())


# ---------------------------------------------------------------- diagnose.py


def test_diagnose_says_too_few_rows_to_judge_an_empty_or_short_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    out = script("diagnose.py", str(tmp_path))
    assert out.returncode == 1
    assert out.stdout.startswith("Too few rows to judge: 0 train row(s), and the checks need at least 20.")
    rows = [{"kind": "train", "step": s, "loss": 1.0} for s in range(1, 4)]
    assert format_report([], rows=rows).startswith("Too few rows to judge: 3 train row(s)")
    assert format_report([], rows=rows * 10).startswith("No problems found.")
    missing = script("diagnose.py", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "nothing: not found; give a run directory" in missing.stderr
