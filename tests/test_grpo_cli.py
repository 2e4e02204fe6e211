"""scripts/grpo.py from the command line: a curriculum, the task's own verifier as the accuracy
reward, and reward functions of the user's own, each refused before step 1 when it cannot work."""

import subprocess
import sys
from pathlib import Path

import pytest

from nanopost.plumbing.config import ConfigError, parse_config
from nanopost.curriculum import Stage
from nanopost.plumbing.metrics import read_metrics
from nanopost.grpo_loop import GRPOConfig, RewardScorer, train_grpo
from nanopost.plumbing.tokenizer import Tokenizer
from tiny import larger_rl_records, larger_task, split_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
STAGES = "[{until = 0.5, levels = [1, 3], temperature = 0.7}, {until = 1.0, temperature = 1.3, group_size = 3}]"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_cli")
    ckpt, _, _ = larger_task(d)
    # difficulty = how close the two numbers are (1: far apart .. 9: neighbours)
    records = [{**r, "difficulty": 10 - abs(a - b)} for r, (a, b) in zip(larger_rl_records(split_pairs()[0]),
                                                                          split_pairs()[0])]
    return {"model": str(ckpt), "train": str(write_jsonl(records, d / "rl.jsonl")), "dir": d}


def grpo(task, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "grpo.py"), "--model", task["model"], "--train", task["train"],
           "--out", str(out), "--steps", "4", "--prompts-per-step", "2", "--group-size", "2",
           "--max-new-tokens", "8", "--eval-every", "0", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=300)


def refused(proc: subprocess.CompletedProcess) -> str:
    """The one-line error of a run refused before it started."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr


# ---------------------------------------------------------------- 1. the curriculum


def test_staged_curriculum_sets_each_stages_prompts_and_temperature(task, tmp_path):
    proc = grpo(task, tmp_path, "--curriculum", "staged", "--curriculum-stages", STAGES, "--curriculum-retire", "0.9")
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [(r["temperature"], r["group_size"]) for r in rows] == [(0.7, 2), (0.7, 2), (1.3, 3), (1.3, 3)]
    assert [r["sampler_stage"] for r in rows] == [0, 0, 1, 1]
    # Stage 0 draws only levels 1-3; later steps mix in earlier-stage prompts but reach the hard ones too.
    assert all(r["sampler_batch_difficulty"] <= 3 for r in rows[:2])


def test_stage_list_reads_the_same_from_an_option_and_a_toml_file(tmp_path):
    from nanopost.plumbing.options import stages_from_tables

    toml = tmp_path / "run.toml"
    toml.write_text('curriculum = "staged"\n\n'
                    '[[curriculum_stages]]\nuntil = 0.5\nlevels = [1, 3]\ntemperature = 0.7\n\n'
                    '[[curriculum_stages]]\nuntil = 1.0\ntemperature = 1.3\ngroup_size = 3\n')
    base = ["--model", "m", "--train", "t"]
    from_option = parse_config(GRPOConfig, [*base, "--curriculum", "staged", "--curriculum-stages", STAGES])
    from_file = parse_config(GRPOConfig, [*base, "--config", str(toml)])
    assert from_option.curriculum_stages == from_file.curriculum_stages
    assert stages_from_tables(from_file.curriculum_stages) == [
        Stage(until=0.5, min_difficulty=1, max_difficulty=3, temperature=0.7), Stage(until=1.0, temperature=1.3,
                                                                                     group_size=3)]


@pytest.mark.parametrize("args, message", [
    (["--curriculum", "staged", "--curriculum-stages", "[{until = 0.5}, {until = 1.0, temperature = 0}]"],
     "--curriculum-stages: stage 1: Stage(until=1.0): temperature must be > 0"),
    (["--curriculum", "staged", "--curriculum-stages", "[{until = 0.5, levels = [1, 3], temprature = 0.7}]"],
     "--curriculum-stages: stage 0: unknown key 'temprature'"),
    (["--curriculum", "staged"], "--curriculum staged needs --curriculum-stages"),
])
def test_a_bad_stage_is_refused_naming_the_option(task, tmp_path, args, message):
    assert message in refused(grpo(task, tmp_path, *args))


def test_a_stage_filtering_by_difficulty_needs_records_that_have_one(task, tmp_path):
    plain = write_jsonl(larger_rl_records(split_pairs()[0]), tmp_path / "plain.jsonl")
    proc = grpo({**task, "train": str(plain)}, tmp_path / "run", "--curriculum", "staged",
                "--curriculum-stages", STAGES)
    assert "--curriculum-stages: stage 0 filters by difficulty" in refused(proc)


# ---------------------------------------------------------------- 2. the task's verifier


COUNTDOWN = [{"prompt": "Make 63 from the numbers 7, 3, 6 using + - * / and each number once.",
              "answer": "(3 + 6) * 7", "numbers": [7, 3, 6], "target": 63},
             {"prompt": "Make 10 from the numbers 2, 3, 4 using + - * / and each number once.",
              "answer": "2 * 3 + 4", "numbers": [2, 3, 4], "target": 10}]


def test_task_countdown_scores_any_expression_that_reaches_the_target(task, tmp_path, monkeypatch):
    # Every completion is a right expression spelled unlike the reference: Countdown's check counts
    # it, a comparison of strings would not.
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids, **kw: "<answer>7 * (3 + 6)</answer>")
    train = write_jsonl(COUNTDOWN[:1], tmp_path / "countdown.jsonl")
    lines = []
    cfg = GRPOConfig(model=task["model"], train=str(train), out=str(tmp_path / "run"), task="countdown", steps=1,
                     prompts_per_step=1, group_size=2, max_new_tokens=4, eval_every=0,
                     rewards={"accuracy": 1.0, "format": 0.1, "countdown": 0.5})
    cfg.validate()
    train_grpo(cfg, log=lines.append)
    row = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][0]
    assert row["reward_accuracy_mean"] == 1.0 and row["reward_countdown_mean"] == 1.0
    assert any(line.startswith("reward accuracy: the countdown task's check") for line in lines)


def test_rewards_that_cannot_apply_to_the_task_are_refused(task, tmp_path):
    base = ["--model", "m", "--train", "t"]
    with pytest.raises(ConfigError, match="--rewards names 'countdown'.* --task is gsm8k"):
        parse_config(GRPOConfig, [*base, "--task", "gsm8k", "--rewards", "{accuracy = 1.0, countdown = 1.0}"])
    # Countdown puzzles scored by comparing strings, without --task: refused before the model loads.
    train = str(write_jsonl(COUNTDOWN, tmp_path / "countdown.jsonl"))
    assert "add --task countdown" in refused(grpo({**task, "train": train}, tmp_path / "a"))
    # --task countdown on records without the puzzle's numbers and target.
    assert "has no 'numbers', which --task countdown's check needs" in refused(
        grpo(task, tmp_path / "b", "--task", "countdown"))


def test_rewards_countdown_is_the_tasks_check_where_a_record_has_the_puzzle():
    # --rewards countdown without --task: records without numbers and target are not scored (None).
    texts = ["<answer>2 + 3</answer>", "<answer>2 + 3</answer>", "<answer>2 * 3</answer>", "<answer>3 + 2</answer>"]
    samples = [{"numbers": [2, 3], "target": 5}, {"answer": "5"}, {"numbers": [2, 3], "target": 5}, {"numbers": [2, 3]}]
    total, per = RewardScorer({"countdown": 1.0})(texts, samples, 1)
    assert per["countdown"] == [1.0, None, 0.0, None] and total.tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match='unknown reward .length.; expected .*"countdown"'):
        RewardScorer({"length": 1.0})


# ---------------------------------------------------------------- 3. the user's reward functions


REWARDS = '''
import math

def brevity(completion, record):
    return 1.0 / (1 + len(completion))

def boom(completion, record):
    return record["no such field"]

def not_a_number(completion, record):
    return math.nan
'''


def test_reward_fn_from_a_file_is_logged_under_its_name(task, tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    proc = grpo(task, tmp_path / "run", "--rewards", "{accuracy = 1.0}",
                "--reward-fn", f"{tmp_path / 'my_rewards.py'}:brevity=0.5",
                "--reward-fn", "scripts.demo:worked_out")
    assert proc.returncode == 0, proc.stderr
    assert "reward brevity: " in proc.stdout and "weight 0.5" in proc.stdout
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert all(0 < r["reward_brevity_mean"] <= 1 and "reward_worked_out_mean" in r for r in rows)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("{dir}/my_rewards.py:missing", "has no function 'missing'"),
    ("{dir}/my_rewards.py:boom", "boom(completion, record) raised KeyError"),
    ("{dir}/my_rewards.py:not_a_number", "not_a_number(completion, record) returned nan"),
])
def test_a_reward_fn_that_cannot_work_is_refused_before_step_1(task, tmp_path, spec, message):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    err = refused(grpo(task, tmp_path / "run", "--reward-fn", spec.format(dir=tmp_path)))
    assert err.startswith(f"error: --reward-fn {spec.format(dir=tmp_path)}: ") and message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
