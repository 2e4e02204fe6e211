"""Data parallel under torchrun (gloo, 2 CPU processes, also on a machine with one GPU): same update as one process, exact resume,
a crashing rank ends the job cleanly, only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker
from nanopost.plumbing import distributed
from nanopost.plumbing.hf_io import load_model
from nanopost.plumbing.metrics import read_metrics
from nanopost.grpo_loop import GRPOConfig
from nanopost.plumbing.training_checkpoint import checkpoint_path, read_summary
from nanopost.sft_loop import SFTConfig, train_sft
from tiny import larger_rl_records, larger_task, split_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(dist_worker.__file__)


def torchrun(nproc: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if Path("/sys/class/net/lo").exists():  # gloo on loopback: no need for the host name to resolve
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def assert_same(a: dict, b: dict, atol: float = 0.0, rtol: float = 0.0) -> None:
    worst = max(((a[k] - b[k]).abs() - rtol * b[k].abs()).max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.3g} beyond rtol {rtol}"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    ckpt, train, val = larger_task(d)
    rl_records = larger_rl_records(split_pairs()[0])
    return {"model": ckpt, "train": train, "val": val, "rl": write_jsonl(rl_records, d / "rl.jsonl")}


def write_config(path: Path, cfg) -> Path:
    path.write_text(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}))
    return path


# ---------------------------------------------------------------- SFT


def sft_args(task, out: Path, **kw) -> dict:
    return {"model": str(task["model"]), "train": str(task["train"]), "out": str(out), "max_len": 64,
            "batch_rows": 4, "lr": 3e-3, "warmup_steps": 0, "eval_every": 0, "log_every": 1, "device": "cpu", **kw}


def test_sft_two_processes_make_the_one_process_update(task, tmp_path):
    # Through the real script: 2 ranks x 1 micro-batch = 1 process x 2 micro-batches.
    args = sft_args(task, tmp_path / "two", max_steps=2, grad_accum=1, val=str(task["val"]),
                    eval_accuracy_samples=6, max_new_tokens=6)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    proc = torchrun(2, ROOT / "scripts" / "sft.py", *flags)
    train_sft(SFTConfig(**{**args, "out": str(tmp_path / "one"), "grad_accum": 2}), log=lambda *_: None)

    assert_same(weights(checkpoint_path(tmp_path / "one")), weights(checkpoint_path(tmp_path / "two")), atol=1e-6)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one]  # rank 0 alone writes
    for a, b in zip(one, two):
        for key in ("loss", "loss_tokens", "samples", "val_loss", "accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert proc.stdout.count("step 2/2") == 1  # one progress line per job, not per process


def test_sft_rank_failure_keeps_the_checkpoint_and_resume_is_exact(task, tmp_path):
    straight = write_config(tmp_path / "straight.json", sft_args(task, tmp_path / "straight", max_steps=4, save_every=2))
    torchrun(2, WORKER, "sft", straight)

    crash = write_config(tmp_path / "crash.json", sft_args(task, tmp_path / "crash", max_steps=4, save_every=2))
    proc = torchrun(2, WORKER, "sft", crash, "--fail-rank", 1, "--fail-step", 3, check=False)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stderr  # torchrun's summary names the cause
    assert read_summary(checkpoint_path(tmp_path / "crash"))["step"] == 2  # intact, and loadable
    load_model(checkpoint_path(tmp_path / "crash"))
    shutil.copytree(tmp_path / "crash", tmp_path / "crash_one")

    resumed = write_config(tmp_path / "resume.json",
                           sft_args(task, tmp_path / "crash", max_steps=4, save_every=2, resume=True))
    torchrun(2, WORKER, "sft", resumed)
    assert_same(weights(checkpoint_path(tmp_path / "straight")), weights(checkpoint_path(tmp_path / "crash")))
    assert [r["step"] for r in read_metrics(tmp_path / "crash")] == [1, 2, 3, 4]

    # The same run continued by one process with the same global batch (2 micro-batches a step).
    train_sft(SFTConfig(**sft_args(task, tmp_path / "crash_one", max_steps=4, save_every=2, resume=True,
                                   grad_accum=2)), log=lambda *_: None)
    assert_same(weights(checkpoint_path(tmp_path / "straight")), weights(checkpoint_path(tmp_path / "crash_one")),
                atol=1e-6)


def test_sft_fsdp_matches_one_process_and_its_checkpoints_resume_anywhere(task, tmp_path):
    args = sft_args(task, tmp_path / "fsdp", max_steps=4, save_every=2, fsdp=True)
    proc = torchrun(2, WORKER, "sft", write_config(tmp_path / "crash.json", args), "--fail-rank", 1,
                    "--fail-step", 3, check=False)
    assert proc.returncode != 0 and read_summary(checkpoint_path(tmp_path / "fsdp"))["step"] == 2
    shutil.copytree(tmp_path / "fsdp", tmp_path / "plain")
    torchrun(2, WORKER, "sft", write_config(tmp_path / "resume.json", {**args, "resume": True}))

    one = tmp_path / "one"
    train_sft(SFTConfig(**{**args, "out": str(one), "fsdp": False, "grad_accum": 2}), log=lambda *_: None)
    assert_same(weights(checkpoint_path(one)), weights(checkpoint_path(tmp_path / "fsdp")), atol=1e-5)
    # A sharded run's checkpoint is whole: one process without FSDP continues it.
    train_sft(SFTConfig(**{**args, "out": str(tmp_path / "plain"), "fsdp": False, "grad_accum": 2, "resume": True}),
              log=lambda *_: None)
    assert_same(weights(checkpoint_path(one)), weights(checkpoint_path(tmp_path / "plain")), atol=1e-5)


# ---------------------------------------------------------------- GRPO


UPDATES = {  # each a different way of splitting rows over 2 ranks
    "token-mean, kl, one step": dict(beta=0.04, prompts_per_step=3, group_size=4),
    "seq-mean, mu 2, mini-batches, micro-batches": dict(
        agg="seq-mean-token-mean", mu=2, minibatches=2, micro_batch=2, prompts_per_step=3, group_size=3),
    "a rank with no rows": dict(prompts_per_step=1, group_size=2, minibatches=2, agg="seq-mean-token-sum-norm"),
    "fsdp, kl, micro-batches": dict(fsdp=True, beta=0.04, micro_batch=4, prompts_per_step=3, group_size=3),
    "ddp, grad checkpointing": dict(grad_checkpointing=True, micro_batch=4, prompts_per_step=3, group_size=3),
    "fsdp, grad checkpointing": dict(fsdp=True, grad_checkpointing=True, micro_batch=4, prompts_per_step=3,
                                     group_size=3),
}


@pytest.mark.parametrize("name", list(UPDATES))
def test_grpo_update_two_processes_equal_one(task, tmp_path, name):
    cfg = dict(model=str(task["model"]), train=str(task["rl"]), rewards={"length": 1.0}, max_new_tokens=12,
               lr=0.1, temperature=1.0, device="cpu", **UPDATES[name])
    torchrun(2, WORKER, "update", write_config(tmp_path / "cfg.json", cfg), tmp_path / "two")
    dist_worker.one_update(GRPOConfig(**cfg), tmp_path / "one")

    base = weights(task["model"])
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((one[k] - base[k]).abs().max().item() for k in base) > 1e-4  # the update did something
    assert_same(one, two, atol=1e-7, rtol=1e-6)  # an ulp or so of weights near 1
    s1, s2 = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two"))
    for key in ("loss", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm") + (("kl",) if "beta" in cfg else ()):
        assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_grpo_two_processes_resume_exactly_after_a_crash(task, tmp_path, fsdp):
    def grpo_config(out: Path, **kw) -> Path:
        cfg = dict(model=str(task["model"]), train=str(task["rl"]), out=str(out), rewards={"sevens": 1.0},
                   steps=4, prompts_per_step=3, group_size=4, max_new_tokens=12, lr=3e-3, beta=0.04,
                   ref_reset_every=3, dynamic_sampling="refill", save_every=2, eval_every=2,
                   val=str(task["rl"]), eval_samples=5, fsdp=fsdp, device="cpu", **kw)
        return write_config(out.with_suffix(".json"), cfg)

    torchrun(2, WORKER, "grpo", grpo_config(tmp_path / "straight"))
    proc = torchrun(2, WORKER, "grpo", grpo_config(tmp_path / "crash"), "--fail-rank", 0, "--fail-step", 3,
                    check=False)
    assert proc.returncode != 0 and "injected failure on rank 0 at step 3" in proc.stderr
    torchrun(2, WORKER, "grpo", grpo_config(tmp_path / "crash", resume=True))

    assert_same(weights(checkpoint_path(tmp_path / "straight")), weights(checkpoint_path(tmp_path / "crash")))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "crash")
    train = [r for r in b if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in a if r["kind"] == "train"] == [r["reward_mean"] for r in train]
    assert [r["step"] for r in b if r["kind"] == "eval"] == [0, 2, 4]
    # Prompts are drawn globally: each step's groups come from both ranks' completions.
    assert all(r["groups_sampled"] >= 3 for r in a if r["kind"] == "train")
    assert all(r["samples"] == r["groups_sampled"] * r["group_size"] for r in a if r["kind"] == "train")


# ---------------------------------------------------------------- pieces


@pytest.mark.parametrize("n", [0, 1, 5, 8])
def test_shards_cover_everything_once_in_order(n):
    for world in (1, 2, 3):
        blocks = [distributed.shard(n, distributed.Dist(rank=r, world=world), r) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("n,micro", [(1, 0), (5, 0), (5, 2), (7, 3), (8, 1)])
def test_micro_batches_cover_every_row_once_and_match_in_count(n, micro):
    rows = [10 + i for i in range(n)]
    for world in (1, 2, 3):
        parts = [distributed.micro_batches(rows, distributed.Dist(rank=r, world=world), micro) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # as many backward passes on every rank
        real = [i for p in parts for chunk, is_real in p if is_real for i in chunk]
        assert real == rows
        assert all(chunk == rows[:1] for p in parts for chunk, is_real in p if not is_real)
        assert all(len(chunk) <= (micro or n) for p in parts for chunk, _ in p)


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.setup("cpu")
    assert (d.rank, d.world, d.main, d.active) == (0, 1, True, False)
    assert d.all_sum([1, 2.5]) == [1.0, 2.5] and d.gather("x") == ["x"] and d.broadcast(3) == 3
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, d) is model


def test_leaving_the_process_group_frees_the_run_first(tmp_path):
    # A model wrapped for FSDP2 sits in reference cycles and holds the group and gloo's pending
    # work. Left for the interpreter's shutdown, after the group is gone, freeing it can abort a
    # process whose run finished; so the cycles are collected before the group is destroyed.
    import gc
    import weakref

    import torch.distributed as dist

    from nanopost.plumbing.config import _leave_process_group

    class Wrapped:
        pass

    was_enabled = gc.isenabled()
    gc.disable()  # only the explicit collection may free the cycle
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        model = Wrapped()
        model.state = Wrapped()
        model.state.module = model  # a cycle, as fully_shard leaves one
        alive = weakref.ref(model)
        del model
        assert alive() is not None
        _leave_process_group(clean=True)
        assert not dist.is_initialized()
        assert alive() is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if was_enabled:
            gc.enable()
