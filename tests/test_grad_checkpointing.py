"""Gradient checkpointing: the same loss and gradients as the plain forward, at one more block forward each."""

import random

import pytest
import torch

from hf_reference import CONFIGS, random_nano_model
from nanopost.plumbing.config import format_help, parse_config
from nanopost.data import Example, pack_examples
from nanopost.grpo import policy_loss
from nanopost.plumbing.metrics import read_metrics
from nanopost.model import Block
from nanopost.grpo_loop import GRPOConfig, sequence_logprobs, train_grpo
from nanopost.sft_loop import SFTConfig, accumulate_gradients, train_sft
from tiny import larger_rl_records, larger_task, sevens, split_pairs, write_jsonl

CPU = torch.device("cpu")


def examples(vocab: int, lengths, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example([rng.randrange(vocab) for _ in range(n)], [0] * (n // 2) + [1] * (n - n // 2)) for n in lengths]


def count_block_forwards(model, run) -> int:
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def grads_of(model, backward, checkpointing: bool):
    """(loss, every parameter's gradient, block forwards) of one backward, checkpointed or not."""
    model.zero_grad(set_to_none=True)
    model.grad_checkpointing = checkpointing
    out = []
    calls = count_block_forwards(model, lambda: out.append(backward()))
    return out[0], [p.grad.clone() for p in model.parameters()], calls


def assert_same(plain, checkpointed):
    # Recomputation repeats the same kernels on the same inputs, so the results are bitwise equal.
    assert plain[0] == checkpointed[0]
    assert all(torch.equal(a, b) for a, b in zip(plain[1], checkpointed[1]))
    assert checkpointed[2] == 2 * plain[2]  # every block ran again in the backward


# Lengths giving several documents per packed row: the documents' grid path; a few long among
# many short: the block-diagonal mask path (see fast.transformer.Documents.of).
LAYOUTS = {"grid": [9, 14, 5, 20, 11, 7, 16, 3], "mask": [60] + [3] * 12}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fused autograd nodes / autocast's composites
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sft_packed_batch_gradients_equal_plain(name, precision, layout):
    model = random_nano_model(name).train()
    batches = pack_examples(examples(model.config.vocab_size, LAYOUTS[layout]), 64, 4)

    def backward():
        return accumulate_gradients(model, batches, CPU, precision)[0]

    assert_same(grads_of(model, backward, False), grads_of(model, backward, True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grpo_shared_prefix_gradients_equal_plain(name, precision):
    model = random_nano_model(name).train()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    distinct = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9)]
    prompts = [distinct[i // 3] for i in range(6)]  # two groups of three rows, each sharing its prompt
    tokens = torch.randint(0, vocab, (6, 7), generator=g)
    mask = torch.ones(6, 7)
    mask[1, 4:] = 0
    old = -torch.rand(6, 7, generator=g)
    advantages = torch.randn(6, generator=g)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def backward():
        with autocast:
            logp, entropy = sequence_logprobs(model, prompts, tokens, temperature=0.7, want_entropy=True)
        loss, _ = policy_loss(logp.float(), old, advantages, mask, ref_logp=old + 0.1, beta=0.04)
        loss.backward()
        return loss.item()

    assert_same(grads_of(model, backward, False), grads_of(model, backward, True))


def test_blocks_are_recomputed_in_the_backward_only_when_gradients_are_recorded():
    model = random_nano_model("qwen2-bias-tied").train()
    layers = model.config.num_hidden_layers
    batch = pack_examples(examples(model.config.vocab_size, LAYOUTS["grid"]), 64, 4)
    step = lambda: accumulate_gradients(model, batch, CPU, "fp32")  # noqa: E731
    assert count_block_forwards(model, step) == layers
    model.grad_checkpointing = True
    assert count_block_forwards(model, step) == 2 * layers  # the forward, then once more in the backward
    with torch.no_grad():  # sampling, evaluation, reference passes: one forward, nothing kept
        assert count_block_forwards(model, lambda: model(batch[0].input_ids)) == layers


def test_command_line_option():
    required = ["--model", "ckpt", "--train", "data.jsonl", "--grad-checkpointing"]
    assert parse_config(SFTConfig, required).grad_checkpointing is True
    assert parse_config(GRPOConfig, required).grad_checkpointing is True
    assert SFTConfig().grad_checkpointing is False and GRPOConfig().grad_checkpointing is False
    for cls in (SFTConfig, GRPOConfig):
        assert "--grad-checkpointing" in format_help(cls) and "one more forward per block" in format_help(cls)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("gc")
    ckpt, train, val = larger_task(d)
    return ckpt, train, val, write_jsonl(larger_rl_records(split_pairs()[0]), d / "rl.jsonl")


def train_rows(out) -> list[dict]:
    return [r for r in read_metrics(out) if r["kind"] == "train"]


def run_counting_blocks(monkeypatch, train) -> int:
    """Block forwards of a whole run (sampling and evaluation included)."""
    calls = []
    forward = Block.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Block, "forward", counted)
        train()
    return len(calls)


def test_train_sft_with_checkpointing_matches_plain(task, tmp_path, monkeypatch):
    ckpt, train, _, _ = task
    counts = {}
    for on in (False, True):
        cfg = SFTConfig(model=str(ckpt), train=str(train), out=str(tmp_path / str(on)), max_len=48, batch_rows=4,
                        grad_accum=2, lr=3e-3, max_steps=2, eval_every=0, grad_checkpointing=on)
        counts[on] = run_counting_blocks(monkeypatch, lambda: train_sft(cfg, log=lambda *_: None))
    plain, checkpointed = train_rows(tmp_path / "False"), train_rows(tmp_path / "True")
    assert [r["loss"] for r in plain] == [r["loss"] for r in checkpointed]
    assert [r["grad_norm"] for r in plain] == [r["grad_norm"] for r in checkpointed]
    assert counts[True] > counts[False]  # the loop turned it on


def test_train_grpo_with_checkpointing_matches_plain(task, tmp_path, monkeypatch):
    ckpt, _, _, rl = task
    counts = {}
    for on in (False, True):
        cfg = GRPOConfig(model=str(ckpt), train=str(rl), out=str(tmp_path / str(on)), rewards={"sevens": 1.0}, steps=2,
                         prompts_per_step=2, group_size=4, max_new_tokens=6, lr=3e-3, beta=0.04,
                         dynamic_sampling="off", eval_every=0, log_every=1, grad_checkpointing=on)
        counts[on] = run_counting_blocks(
            monkeypatch, lambda: train_grpo(cfg, extra_rewards={"sevens": sevens}, log=lambda *_: None))
    plain, checkpointed = train_rows(tmp_path / "False"), train_rows(tmp_path / "True")
    assert len(plain) == 2 and all("loss" in r for r in plain)  # every step updated the policy
    for key in ("loss", "grad_norm", "reward_mean", "kl"):
        assert [r.get(key) for r in plain] == [r.get(key) for r in checkpointed], key
    assert counts[True] > counts[False]
