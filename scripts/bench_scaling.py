"""Data-parallel scaling: SFT tokens/s and GRPO step time with 1, 2, ... processes under torchrun.

    python scripts/bench_scaling.py [--size small] [--procs 1 2] [--threads 2]

Every run has the same global batch (SFT: 16 packed rows of ~100-token chats a step; GRPO: 8
prompts x 8 completions of up to 64 tokens, beta 0.04) and the same total number of CPU threads,
split evenly over the processes (2 threads: 1 process x 2 threads against 2 processes x 1
thread). Numbers are the medians of the steps after the first, read from each run's
metrics.jsonl; the speed-up is against the first entry of --procs, measured in the same run.
On a GPU machine pass --device cuda and --procs 1 2 4 8: each process then owns one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmark import bench_config, random_chats
from nanopost.plumbing.hf_io import save_model
from nanopost.plumbing.metrics import read_metrics
from nanopost.model import Transformer
from nanopost.plumbing.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]


def make_run_inputs(d: Path, size: str) -> None:
    """A random model of the benchmark size, its tokenizer, SFT chats and RL prompts."""
    chats = random_chats(256, seed=0)
    tokenizer = train_bpe([m["content"] for chat in chats for m in chat], vocab_size=1024)
    cfg = bench_config(size)
    cfg.vocab_size = tokenizer.vocab_size
    cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, d / "model")
    tokenizer.save(d / "model")
    (d / "sft.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    (d / "rl.jsonl").write_text("".join(json.dumps({"prompt": c[0]["content"], "answer": "0"}) + "\n" for c in chats))


def launch(script: str, procs: int, threads: int, args: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs)), "PYTHONPATH": str(ROOT)}
    flags = []
    for k, v in args.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            table = "{" + ", ".join(f"{a} = {b}" for a, b in v.items()) + "}" if isinstance(v, dict) else v
            flags.append(f"{name}={table}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(ROOT / "scripts" / script), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def median_after_first(run: Path, key: str) -> float:
    return statistics.median(r[key] for r in read_metrics(run) if r["kind"] == "train" and key in r and r["step"] > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over the processes")
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--grpo-steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
    args = ap.parse_args()
    print(f"{args.size} model, {args.threads} CPU threads in all, device {args.device}"
          f"{', FSDP2' if args.fsdp else ', DDP'} | load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'procs':>5s} | {'SFT tok/s':>10s} {'speed-up':>8s} | {'GRPO s/step':>11s} {'speed-up':>8s}", flush=True)
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_run_inputs(d, args.size)
        for n in args.procs:
            if 16 % n or 8 % n:
                raise SystemExit(f"--procs {n}: the global batch (16 rows, 8 prompts) must split evenly")
            # SFT: 16 packed rows a step in all, one micro-batch per process.
            common = dict(model=d / "model", device=args.device, fsdp=args.fsdp, log_every=1, seed=0)
            launch("sft.py", n, args.threads, dict(common, train=d / "sft.jsonl", out=d / f"sft{n}", max_len=128,
                                                   batch_rows=16 // n, max_steps=args.sft_steps, eval_every=0, warmup_steps=0))
            launch("grpo.py", n, args.threads, dict(common, train=d / "rl.jsonl", out=d / f"grpo{n}",
                                                    rewards={"format": 1.0}, steps=args.grpo_steps,
                                                    prompts_per_step=8, group_size=8, max_new_tokens=64,
                                                    beta=0.04, dynamic_sampling="off", eval_every=0))
            sft = median_after_first(d / f"sft{n}", "tok_per_s")
            grpo = median_after_first(d / f"grpo{n}", "time_step")
            base = base or (sft, grpo)
            print(f"{n:5d} | {sft:10,.0f} {sft / base[0]:7.2f}x | {grpo:11.2f} {base[1] / grpo:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
