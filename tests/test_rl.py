"""The GRPO loop: it learns, it resumes exactly, and its pieces mean what they say."""

import pytest
import torch

import nanopost.rl as rl
from nanopost.checkpoint import load_model, load_tokenizer
from nanopost.generate import generate
from nanopost.metrics import read_metrics
from nanopost.rl import GRPOConfig, overlong_penalty, sequence_logprobs, train_grpo
from nanopost.run_state import checkpoint_path
from tiny import larger_rl_records, larger_task, sevens, split_pairs, write_jsonl


def has_seven(completion: str, sample: dict) -> float:
    return float("7" in completion)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    ckpt, _, _ = larger_task(d)
    return ckpt, write_jsonl(larger_rl_records(split_pairs()[0]), d / "rl.jsonl")


def config(task, out, **kw) -> GRPOConfig:
    ckpt, train = task
    base = dict(model=str(ckpt), train=str(train), out=str(out), rewards={"sevens": 1.0}, steps=20,
                prompts_per_step=4, group_size=8, max_new_tokens=16, lr=3e-3, eval_every=0, log_every=1)
    return GRPOConfig(**{**base, **kw})


def quiet(*_):
    pass


def test_seeded_run_raises_the_reward(task, tmp_path):
    train_grpo(config(task, tmp_path), extra_rewards={"sevens": sevens}, log=quiet)
    rewards = [r["reward_mean"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(rewards) == 20
    assert sum(rewards[-5:]) / 5 > 3 * sum(rewards[:5]) / 5


class Killed(Exception):
    pass


def test_resume_after_kill_is_exact(task, tmp_path):
    kw = dict(steps=6, save_every=3, beta=0.04, mu=2, minibatches=2, temperature_schedule="linear",
              temperature_end=0.6, dynamic_sampling="refill")
    train_grpo(config(task, tmp_path / "a", **kw), extra_rewards={"sevens": sevens}, log=quiet)

    def die_at_step_4(line):
        if line.startswith("step 4/"):
            raise Killed

    with pytest.raises(Killed):
        train_grpo(config(task, tmp_path / "b", **kw), extra_rewards={"sevens": sevens}, log=die_at_step_4)
    train_grpo(config(task, tmp_path / "b", resume=True, **kw), extra_rewards={"sevens": sevens}, log=quiet)
    a = load_model(checkpoint_path(tmp_path / "a", "last")).state_dict()
    b = load_model(checkpoint_path(tmp_path / "b", "last")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
    rows_b = [r for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    assert [r["reward_mean"] for r in rows_a] == [r["reward_mean"] for r in rows_b]


def test_dynamic_sampling_keeps_all_equal_groups_out_of_the_loss(task, tmp_path, monkeypatch):
    seen = []
    real_update = rl.update_policy

    def spy(policy, reference, optimizer, batch, advantages, cfg, temperature, device, **kw):
        seen.append(batch.rewards.view(-1, cfg.group_size))
        return real_update(policy, reference, optimizer, batch, advantages, cfg, temperature, device, **kw)

    monkeypatch.setattr(rl, "update_policy", spy)
    train_grpo(config(task, tmp_path, steps=6, rewards={"has_seven": 1.0}, max_new_tokens=4,
                      dynamic_sampling="drop"), extra_rewards={"has_seven": has_seven}, log=quiet)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert any(r["zero_std_frac"] > 0 for r in rows)  # the setting does produce all-equal groups...
    for groups in seen:  # ...and none of them reached the update
        assert (groups.max(1).values > groups.min(1).values).all()
    assert sum(r["groups_kept"] for r in rows) == sum(g.shape[0] for g in seen)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("group", [1, 3])  # 3: rows share their prompt, computed once
def test_loss_logprobs_equal_the_samplers(task, temperature, group):
    ckpt, _ = task
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    prompts = [tok.encode("Which is larger, 3 or 8?"), tok.encode("Which is larger, 1 or 2? Think.")]
    prompts = [p for p in prompts for _ in range(group)]
    out = generate(model, prompts, max_new_tokens=12, temperature=temperature,
                   generator=torch.Generator().manual_seed(0), stop_token_ids=[tok.eos_token_id],
                   pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, prompts, out.tokens, temperature)
    assert torch.allclose(logp * out.mask, out.logprobs * out.mask, atol=1e-5)


def test_overlong_penalty_is_linear_over_the_buffer():
    lengths = torch.tensor([10, 12, 14, 15, 16])
    # max 16, buffer 4: free up to 12 tokens, then -penalty * (len - 12) / 4
    assert overlong_penalty(lengths, 16, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -0.75, -1.0]
    assert overlong_penalty(lengths, 16, 0, 1.0).tolist() == [0.0] * 5


def test_a_new_run_in_a_used_directory_starts_its_metrics_afresh(task, tmp_path):
    # The held-out evaluation before step 1 logs rows at step 0, which a resume would keep.
    cfg = config(task, tmp_path, steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, eval_every=1,
                 val=str(task[1]), eval_samples=4)
    for _ in range(2):  # the same directory twice, without --resume
        train_grpo(cfg, extra_rewards={"sevens": sevens}, log=quiet)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 1]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1]


def test_group_size_one_is_refused(task, tmp_path):
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        config(task, tmp_path, group_size=1).validate()


def test_curriculum_stages_set_temperature_and_group_size(task, tmp_path):
    from nanopost.curriculum import CurriculumSampler, Stage
    from nanopost.data import load_rl

    cfg = config(task, tmp_path, steps=4)
    stages = [Stage(until=0.5, temperature=0.7, group_size=4), Stage(until=1.0, temperature=1.3, group_size=6)]
    sampler = CurriculumSampler(load_rl(cfg.train), total_steps=4, stages=stages)
    train_grpo(cfg, sampler=sampler, extra_rewards={"sevens": sevens}, log=quiet)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [(r["temperature"], r["group_size"]) for r in rows] == [(0.7, 4), (0.7, 4), (1.3, 6), (1.3, 6)]


def test_reward_models_and_their_ensemble_score_rollouts(task, tmp_path):
    from nanopost.reward_model import RewardModel, save_reward_model

    ckpt, _ = task
    tok = load_tokenizer(ckpt)
    for i, name in enumerate(["a", "b"]):
        rm = RewardModel(load_model(ckpt), generator=torch.Generator().manual_seed(i))
        save_reward_model(rm, tmp_path / name, tokenizer=tok)
    rms = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    train_grpo(config(task, tmp_path / "single", steps=2, rewards={"a": 1.0}, reward_models=rms), log=quiet)
    row = [r for r in read_metrics(tmp_path / "single") if r["kind"] == "train"][-1]
    assert row["reward_a_std"] > 0  # a random head still tells completions apart
    train_grpo(config(task, tmp_path / "ens", steps=2, rewards={"rm": 1.0}, reward_models=rms, rm_ensemble="min"),
               log=quiet)
    row = [r for r in read_metrics(tmp_path / "ens") if r["kind"] == "train"][-1]
    assert {"reward_rm_mean", "reward_rm.a_mean", "reward_rm.b_mean"} <= set(row)
    assert row["reward_rm_mean"] <= min(row["reward_rm.a_mean"], row["reward_rm.b_mean"]) + 1e-6
