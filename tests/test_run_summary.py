"""A run says what it is about to do before its first step, and a long evaluation says how far it is."""

import re

import pytest

from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.data import tokenize_prompt
from nanopost.eval import EvalItem, evaluate
from nanopost.grpo_loop import GRPOConfig, train_grpo
from nanopost.plumbing.run_summary import count_parameters
from nanopost.sft_loop import SFTConfig, train_sft
from tiny import larger_rl_records, larger_task, split_pairs, write_jsonl


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("summary")
    ckpt, train, val = larger_task(d)
    return ckpt, train, val, write_jsonl(larger_rl_records(split_pairs()[0]), d / "rl.jsonl")


def summary(lines: list[str]) -> dict[str, str]:
    """The summary lines by subject, taken from before the first step's progress line."""
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    return {m[1]: m[2] for line in lines[:first_step] if (m := re.match(r"(run|data|model): (.*)", line))}


def test_sft_prints_its_data_model_and_run_directory_before_the_first_step(task, tmp_path):
    ckpt, train, val, _ = task
    lines: list[str] = []
    train_sft(SFTConfig(model=str(ckpt), train=str(train), val=str(val), out=str(tmp_path / "sft"), max_len=64,
                        batch_rows=16, max_steps=3, eval_every=0, max_new_tokens=4, log_every=1, device="cpu"),
              log=lines.append)
    s = summary(lines)
    total, _ = count_parameters(load_model(ckpt))
    assert s["run"] == f"{tmp_path / 'sft'} (new)"
    assert re.fullmatch(r"70 examples \([\d,]+ tokens, [\d,]+ trained\), 20 held-out; 3 steps to run, .*", s["data"])
    assert s["model"] == f"{total:,} parameters ({total:,} trainable), cpu, fp32"
    assert sum(line.startswith("step ") for line in lines) == 3  # what scripts/bench_grpo.py times by


def test_grpo_prints_its_prompts_steps_and_model_before_the_first_step(task, tmp_path):
    ckpt, _, _, rl = task
    lines: list[str] = []
    train_grpo(GRPOConfig(model=str(ckpt), train=str(rl), out=str(tmp_path / "grpo"), steps=2, prompts_per_step=2,
                          group_size=2, max_new_tokens=4, eval_every=0, device="cpu"), log=lines.append)
    s = summary(lines)
    assert s["run"] == f"{tmp_path / 'grpo'} (new)"
    assert re.fullmatch(r"70 prompts \([\d,]+ prompt tokens\), 0 held-out; 2 steps to run, "
                        r"2 prompts x 2 samples of up to 4 tokens each", s["data"])
    assert re.fullmatch(r"[\d,]+ parameters \([\d,]+ trainable\), cpu, fp32", s["model"])


def test_evaluation_reports_its_progress_through_the_log(task):
    ckpt = task[0]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    items = [EvalItem(tokenize_prompt(tok, [{"role": "user", "content": f"Which is larger, {i} or 3?"}]), "3")
             for i in range(5)]
    lines: list[str] = []
    evaluate(model, tok, items, max_new_tokens=2, k=2, batch_size=2, log=lines.append, log_every_s=0)
    assert lines == ["eval: 2/5 prompts", "eval: 4/5 prompts", "eval: 5/5 prompts",
                     "eval: 2/10 samples", "eval: 4/10 samples", "eval: 6/10 samples", "eval: 8/10 samples",
                     "eval: 10/10 samples"]
    quiet: list[str] = []
    evaluate(model, tok, items, max_new_tokens=2, batch_size=2, log=quiet.append)  # quicker than 5 s: no line
    assert quiet == []
