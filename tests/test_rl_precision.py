"""Old logprobs in the learner's precision: under bf16 autocast the ratio starts at exactly 1, in
fp32 the sampler's logprobs serve as before (no extra forward), and the mismatch is logged."""

import pytest
import torch

import nanopost.grpo_loop as rl
from nanopost.plumbing.hf_io import load_model, load_tokenizer
from nanopost.generate import generate
from nanopost.plumbing.runtime import autocast
from tiny import larger_task

CPU = torch.device("cpu")
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return larger_task(tmp_path_factory.mktemp("precision"))[0]


def rollouts(ckpt) -> tuple[torch.nn.Module, rl.Rollouts]:
    """The policy (fp32) and 8 completions sampled from it: 2 prompts x 4."""
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    prompts = [tok.encode(f"Which is larger, {a} or {b}?") for a, b in [(3, 8), (1, 2)] for _ in range(4)]
    out = generate(model, prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(0),
                   pad_token_id=tok.pad_token_id)
    batch = rl.Rollouts(records=[{}, {}], prompts=prompts, tokens=out.tokens, old_logprobs=out.logprobs,
                        mask=out.mask, finished=out.finished, rewards=torch.zeros(8), per_function={},
                        texts=[""] * 8)
    return model.train(), batch


def update(ckpt, monkeypatch, **kw):
    """One update_policy call; returns (batch, the losses' (logp, old_logp, mask), forwards' grad modes, stats)."""
    policy, batch = rollouts(ckpt)
    losses, forwards = [], []
    real_loss = rl.policy_loss

    def spy(logp, old_logp, advantages, mask, **k):
        losses.append((logp.detach().clone(), old_logp.detach().clone(), mask.bool().clone()))
        return real_loss(logp, old_logp, advantages, mask, **k)

    monkeypatch.setattr(rl, "policy_loss", spy)
    policy.register_forward_pre_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
    cfg = rl.GRPOConfig(model=str(ckpt), train="unused", device="cpu", max_new_tokens=12, group_size=4, lr=0.05, **kw)
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    stats = rl.update_policy(policy, None, optimizer, batch, ADVANTAGES, cfg, 1.0, CPU)
    return batch, losses, forwards, stats


def row_indices(values: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> list[int]:
    """For each row of values: the row of table it equals exactly on its generated tokens (-1: none)."""
    return [next((j for j in range(len(table)) if torch.equal(values[i][mask[i]], table[j][mask[i]])), -1)
            for i in range(len(values))]


def test_bf16_on_policy_ratio_is_exactly_one(ckpt, monkeypatch):
    batch, losses, forwards, stats = update(ckpt, monkeypatch, precision="bf16", micro_batch=4)
    assert forwards == [True, True]  # two micro-batches, no extra forward
    for logp, old_logp, mask in losses:
        assert torch.equal(torch.exp(logp - old_logp)[mask], torch.ones(int(mask.sum())))
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac_low"] == 0.0 and stats["clip_frac_high"] == 0.0
    # bf16 rounding moves the learner's logprobs off the fp32 sampler's, and the stats say by how much
    assert 0.0 < stats["logp_mismatch_mean"] < 0.5 and stats["ratio_max_sampler"] > 1.0


def test_bf16_several_steps_take_old_logprobs_from_one_learner_pass(ckpt, monkeypatch):
    policy, batch = rollouts(ckpt)
    with torch.no_grad(), autocast(CPU, "bf16"):  # the learner before any update, in its precision
        learner = rl.sequence_logprobs(policy, batch.prompts, batch.tokens, 1.0)[0].float()
    _, losses, forwards, stats = update(ckpt, monkeypatch, precision="bf16", mu=2, minibatches=2)
    assert forwards == [False] + [True] * 4  # the old logprobs' pass once, then 2 passes x 2 steps
    seen = []
    for _, old_logp, mask in losses:
        rows = row_indices(old_logp, mask, learner)
        assert -1 not in rows  # every old logprob is the learner's, not the sampler's...
        seen += rows
    assert sorted(seen) == sorted(list(range(8)) * 2)  # ...the same for a row in both passes
    assert (learner - batch.old_logprobs)[batch.mask.bool()].abs().max() > 1e-3  # which differ here
    assert stats["logp_mismatch_mean"] > 0.0


@pytest.mark.parametrize("steps", [dict(), dict(mu=2, minibatches=2)])
def test_fp32_keeps_the_samplers_logprobs_without_an_extra_forward(ckpt, monkeypatch, steps):
    batch, losses, forwards, stats = update(ckpt, monkeypatch, precision="fp32", **steps)
    assert forwards == [True] * len(losses)  # one forward per loss, all of them for the update
    for _, old_logp, mask in losses:
        assert -1 not in row_indices(old_logp, mask, batch.old_logprobs)
    # the cached decode and the full forward agree up to fp32 rounding
    assert 0.0 <= stats["logp_mismatch_mean"] < 1e-4 and abs(stats["ratio_max_sampler"] - 1.0) < 1e-3
