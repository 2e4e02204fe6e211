"""Memory a training step gives back: one embedding gradient, and freed pages returned before
the optimizer step (what peak resident memory is made of with a real vocabulary)."""

import subprocess
import sys
import textwrap

import pytest
import torch

import nanopost.plumbing.runtime as runtime
from hf_reference import random_nano_model
from nanopost.grpo_loop import GRPOConfig, sequence_logprobs, train_grpo
from nanopost.model import Logprobs
from nanopost.sft_loop import SFTConfig, train_sft
from tiny import larger_records, larger_rl_records, larger_task, sevens, split_pairs, write_jsonl


def test_shared_prefix_pass_looks_up_the_embedding_once():
    # Each lookup's gradient is a dense [vocab, hidden] tensor: prompts and completions looked up
    # separately would hold two of them at once in the backward.
    model = random_nano_model("llama-gqa-untied").train()
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, model.config.vocab_size, (4, 6))
    logp, _ = sequence_logprobs(model, [[1, 2, 3]] * 2 + [[4, 5]] * 2, tokens, 1.0)
    logp.sum().backward()
    assert len(calls) == 1
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


GLIBC = runtime._MALLOC_TRIM is not None


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; elsewhere release_freed_memory does nothing")
def test_release_freed_memory_returns_the_heaps_free_pages():
    # In its own process: the mmap threshold is raised so that the tensors live on the heap, as
    # tensors below 32 MiB do once glibc's threshold has adapted, and the trim threshold so that
    # free() itself gives nothing back, as it cannot when the heap's top is in use.
    script = textwrap.dedent("""
        import ctypes, torch
        from nanopost.plumbing.runtime import release_freed_memory
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        def rss():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) >> 10
        blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB
        del blocks
        before = rss()
        released = release_freed_memory(torch.device("cpu"))
        print(released, before - rss())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) >= 200, f"only {out[1]} MiB returned of 256 freed"
    assert not runtime.release_freed_memory(torch.device("meta"))  # only the CPU's heap


@pytest.fixture
def trims(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_MALLOC_TRIM", lambda pad: calls.append(pad))
    monkeypatch.setattr(runtime, "RELEASE_MIN_BYTES", 0)  # the tests' embeddings are small
    return calls


def test_a_small_embedding_releases_nothing(monkeypatch):
    # Its gradient fits among the heap's freed pages, and returning them would cost page faults.
    calls = []
    monkeypatch.setattr(runtime, "_MALLOC_TRIM", lambda pad: calls.append(pad))
    model = random_nano_model("llama-gqa-untied").train()
    embedding = model.model.embed_tokens.weight
    assert embedding.numel() * embedding.element_size() < runtime.RELEASE_MIN_BYTES
    assert runtime.release_memory_in_backward(model, torch.device("cpu")) == []
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    model(Logprobs(ids, ids)).sum().backward()
    assert calls == []
    monkeypatch.setattr(runtime, "RELEASE_MIN_BYTES", embedding.numel() * embedding.element_size())
    assert len(runtime.release_memory_in_backward(model, torch.device("cpu"))) == 2


def test_backward_releases_memory_after_the_head_and_before_the_embedding_gradient(trims):
    model = random_nano_model("llama-gqa-untied").train()
    runtime.release_memory_in_backward(model, torch.device("cpu"))
    embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
    seen = []
    runtime._MALLOC_TRIM = lambda pad: seen.append((head.grad is not None, embedding.grad is not None))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    model(Logprobs(ids, ids)).sum().backward()
    assert seen == [(True, False), (True, False)]  # at the final norm, then at the embedding
    with torch.no_grad():
        model(ids)
    assert len(seen) == 2  # a forward alone releases nothing


def test_grpo_releases_memory_in_every_backward(tmp_path, trims):
    ckpt, _, _ = larger_task(tmp_path)
    train = write_jsonl(larger_rl_records(split_pairs()[0]), tmp_path / "rl.jsonl")
    cfg = GRPOConfig(model=str(ckpt), train=str(train), out=str(tmp_path / "grpo"), rewards={"sevens": 1.0},
                     steps=3, prompts_per_step=2, group_size=2, max_new_tokens=4, minibatches=2, eval_every=0,
                     dynamic_sampling="off")
    train_grpo(cfg, extra_rewards={"sevens": sevens}, log=lambda *_: None)
    # 3 steps x 2 mini-batches, each backward through the final norm twice (after the shared
    # prompts and after the completions) and through the embedding once
    assert len(trims) == 3 * 2 * 3


def test_sft_releases_memory_in_every_backward(tmp_path, trims):
    ckpt, _, _ = larger_task(tmp_path)
    train = write_jsonl(larger_records(split_pairs()[0]), tmp_path / "sft.jsonl")
    cfg = SFTConfig(model=str(ckpt), train=str(train), out=str(tmp_path / "sft"), max_steps=3, batch_rows=2,
                    grad_accum=2, max_len=256, eval_every=0)
    train_sft(cfg, log=lambda *_: None)
    assert len(trims) == 3 * 2 * 2  # 3 steps x 2 micro-batches x (final norm, embedding)
