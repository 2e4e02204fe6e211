"""The GRPO loop: it learns, it resumes exactly, and its pieces mean what they say."""

import dataclasses

import pytest
import torch

import nanopost.grpo_loop as rl
from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.generate import generate
from nanopost.plumbing.metrics import read_metrics
from nanopost.grpo_loop import GRPOConfig, overlong_penalty, sequence_logprobs, train_grpo
from nanopost.plumbing.training_checkpoint import checkpoint_path
from nanopost.plumbing.user_rewards import model_rewards
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


def test_overwrite_starts_the_metrics_afresh(task, tmp_path):
    # The held-out evaluation before step 1 logs rows at step 0, which a resume would keep.
    cfg = config(task, tmp_path, steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, eval_every=1,
                 val=str(task[1]), eval_samples=4)
    for overwrite in (False, True):  # the same directory twice, the second time with --overwrite
        train_grpo(dataclasses.replace(cfg, overwrite=overwrite), extra_rewards={"sevens": sevens}, log=quiet)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 1]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1]


def test_group_size_one_is_refused(task, tmp_path):
    with pytest.raises(ValueError, match="--group-size must be >= 2"):
        config(task, tmp_path, group_size=1).validate()


def test_curriculum_stages_set_temperature_and_group_size(task, tmp_path):
    from nanopost.curriculum import CurriculumSampler, Stage
    from nanopost.plumbing.data_files import load_rl

    cfg = config(task, tmp_path, steps=4)
    stages = [Stage(until=0.5, temperature=0.7, group_size=4), Stage(until=1.0, temperature=1.3, group_size=6)]
    sampler = CurriculumSampler(load_rl(cfg.train), total_steps=4, stages=stages)
    train_grpo(cfg, sampler=sampler, extra_rewards={"sevens": sevens}, log=quiet)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [(r["temperature"], r["group_size"]) for r in rows] == [(0.7, 4), (0.7, 4), (1.3, 6), (1.3, 6)]


def two_reward_models(task, tmp_path) -> dict[str, str]:
    """Two reward models with differently seeded random heads on the task's backbone: name -> dir."""
    from nanopost.tools.reward_model import RewardModel, save_reward_model

    ckpt, _ = task
    tok = load_tokenizer(ckpt)
    for i, name in enumerate(["a", "b"]):
        rm = RewardModel(load_model(ckpt), generator=torch.Generator().manual_seed(i))
        save_reward_model(rm, tmp_path / name, tokenizer=tok)
    return {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}


def test_reward_models_and_their_ensemble_score_rollouts(task, tmp_path):
    rms = two_reward_models(task, tmp_path)
    train_grpo(config(task, tmp_path / "single", steps=2, rewards={"a": 1.0}, reward_models=rms), log=quiet)
    row = [r for r in read_metrics(tmp_path / "single") if r["kind"] == "train"][-1]
    assert row["reward_a_std"] > 0  # a random head still tells completions apart
    # Raw members (no per-prompt standardisation), so the min can be checked against their logs.
    train_grpo(config(task, tmp_path / "ens", steps=2, rewards={"rm": 1.0}, reward_models=rms, rm_ensemble="min",
                      rm_ensemble_normalize="none"), log=quiet)
    row = [r for r in read_metrics(tmp_path / "ens") if r["kind"] == "train"][-1]
    assert {"reward_rm_mean", "reward_rm.a_mean", "reward_rm.b_mean"} <= set(row)
    assert row["reward_rm_mean"] <= min(row["reward_rm.a_mean"], row["reward_rm.b_mean"]) + 1e-6


def test_sequence_mean_normaliser_counts_only_rows_with_loss_tokens(task, tmp_path, monkeypatch):
    # Truncated rows masked out by the overlong filter must not count in the seq-mean normaliser,
    # which is the same in every micro-batch of a mini-batch.
    calls = []
    real = rl.policy_loss

    def spy(logp, old_logp, advantages, mask, **kw):
        calls.append((int((mask.sum(1) > 0).sum()), float(kw["num_seqs"])))
        return real(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setattr(rl, "policy_loss", spy)
    train_grpo(config(task, tmp_path, steps=1, overlong_filter=True, agg="seq-mean-token-mean", micro_batch=4,
                      dynamic_sampling="off"), extra_rewards={"sevens": sevens}, log=quiet)
    with_tokens = sum(n for n, _ in calls)
    assert len(calls) == 8 and 0 < with_tokens < 32  # 32 rows, some of them truncated
    assert [num for _, num in calls] == [with_tokens] * 8


def test_sequence_importance_gets_gspo_clip_range_and_aggregation_unless_set(tmp_path):
    from nanopost.plumbing.config import format_help, load_config_file, parse_config, save_config

    base = ["--model", "m", "--train", "t"]
    token = parse_config(GRPOConfig, base)
    assert (token.clip_low, token.clip_high, token.agg) == (0.2, 0.28, "token-mean")
    gspo = parse_config(GRPOConfig, base + ["--importance", "sequence"])
    assert (gspo.clip_low, gspo.clip_high, gspo.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    # what is set explicitly is kept, the rest still follows the importance level
    mixed = parse_config(GRPOConfig, base + ["--importance", "sequence", "--clip-high", "1e-3", "--agg", "token-mean"])
    assert (mixed.clip_low, mixed.clip_high, mixed.agg) == (3e-4, 1e-3, "token-mean")
    assert parse_config(GRPOConfig, base + ["--clip-low", "0.1"]).clip_low == 0.1
    # the constructor resolves the same way, and a saved config reads back as run
    assert (GRPOConfig(importance="sequence").clip_high, GRPOConfig().clip_high) == (4e-4, 0.28)
    assert load_config_file(GRPOConfig, save_config(gspo, tmp_path / "config.json")) == gspo
    assert "3e-4 with --importance sequence" in format_help(GRPOConfig)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=0.0), "--temperature must be > 0"),
    (dict(temperature_schedule="linear", temperature_end=0.0), "--temperature-end must be > 0"),
    (dict(temperature_schedule="stages", temperature_stages=[(0.0, 1.0), (0.5, 0.0)]), "--temperature-stages must be > 0"),
    (dict(overlong_buffer=4, rewards={"overlong": 1.0}), "may not name 'overlong'"),
])
def test_settings_that_would_fail_mid_run_are_refused_before_it(task, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        config(task, tmp_path, **kw).validate()


def test_ensemble_from_the_config_standardises_its_members(task, tmp_path):
    rms = two_reward_models(task, tmp_path)
    prompts = ["Which is larger, 3 or 8?"] * 3 + ["Which is larger, 1 or 2?"] * 3
    completions = ["<answer>8</answer>", "<answer>3</answer>", "8", "<answer>2</answer>", "1", "two"]
    ensemble = model_rewards(config(task, tmp_path, reward_models=rms, rm_ensemble="mean"), "cpu")["rm"]
    combined, members = ensemble.score(prompts, completions)
    # each member is a z-score within each prompt's completions, so each prompt's mean is 0...
    assert sum(combined[:3]) == pytest.approx(0.0, abs=1e-6) and sum(combined[3:]) == pytest.approx(0.0, abs=1e-6)
    assert max(abs(x) for x in combined) > 0.1
    # ...while the members are logged as they scored
    assert members["a"] != pytest.approx(combined)
    raw = model_rewards(config(task, tmp_path, reward_models=rms, rm_ensemble="mean", rm_ensemble_normalize="none"),
                        "cpu")["rm"]
    assert raw.score(prompts, completions)[0] == pytest.approx([(x + y) / 2 for x, y in zip(members["a"], members["b"])])


def running_rewards(ckpt):
    """A model reward and a one-member ensemble, both with running statistics, built afresh as a
    new process would."""
    from nanopost.tools.reward_model import ModelReward, RewardEnsemble, RewardModel

    tok = load_tokenizer(ckpt)

    def member(seed):
        rm = RewardModel(load_model(ckpt), generator=torch.Generator().manual_seed(seed))
        return ModelReward(rm, tok, normalize="running")

    return {"rm": member(0), "ens": RewardEnsemble({"a": member(1)})}


def test_running_reward_statistics_resume_exactly(task, tmp_path):
    kw = dict(steps=3, save_every=1, rewards={"rm": 1.0, "ens": 0.5}, prompts_per_step=2, group_size=4,
              max_new_tokens=8)
    whole = running_rewards(task[0])
    train_grpo(config(task, tmp_path / "a", **kw), extra_rewards=whole, log=quiet)

    def die_at_step_2(line):
        if line.startswith("step 2/"):
            raise Killed

    with pytest.raises(Killed):
        train_grpo(config(task, tmp_path / "b", **kw), extra_rewards=running_rewards(task[0]), log=die_at_step_2)
    resumed = running_rewards(task[0])
    train_grpo(config(task, tmp_path / "b", resume=True, **kw), extra_rewards=resumed, log=quiet)
    assert resumed["rm"].state_dict() == whole["rm"].state_dict()
    assert resumed["ens"].state_dict() == whole["ens"].state_dict()
    rows_a = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
    rows_b = [r for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    for key in ("reward_rm_mean", "reward_ens.a_mean", "reward_mean"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key


def test_overlong_penalty_is_combined_like_the_other_rewards(task, tmp_path):
    # normalize_each standardises every term within its group, so each group's total sums to 0;
    # a penalty added raw after that would pull the mean below 0. Here every completion of more
    # than 0 tokens is in the buffer.
    train_grpo(config(task, tmp_path, steps=1, reward_mode="normalize_each", overlong_buffer=8, max_new_tokens=8,
                      dynamic_sampling="off"), extra_rewards={"sevens": sevens}, log=quiet)
    row = [r for r in read_metrics(tmp_path) if r["kind"] == "train"][-1]
    assert row["reward_overlong_mean"] < -0.1  # the term is logged raw, in [-1, 0]
    assert row["reward_mean"] == pytest.approx(0.0, abs=1e-5)
