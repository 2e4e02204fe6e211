"""Sampling throughput: nanopost.generate vs transformers' generate() on the same random model.

    python scripts/bench_generate.py [--sizes tiny small] [--batch 64] [--new 128] [--threads 2]

Fixed-length decoding (no stop token), temperature 1, the same weights in both, one process.
The two samplers take turns (--rounds, each the best of --repeats runs) and each keeps its
fastest time; every round's ratio is printed too, so the machine's noise is visible.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Callable

import torch

from benchmark import (alternate_rounds, bench_config, best_time, decode_kernel_floor, flops_per_token,
                       matmul_peak_flops)
from nanopost.plumbing.hf_io import save_model
from nanopost.generate import generate
from nanopost.model import Transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=34)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side per round (the best counts)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each side takes")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peak = matmul_peak_flops()
    print(f"fp32 matmul peak ({args.threads} threads): {peak / 1e9:.0f} GFLOP/s")
    g = torch.Generator().manual_seed(0)
    # Prompt lengths vary around prompt_len so padding is exercised as in real use.
    prompts = [
        torch.randint(0, 1024, (args.prompt_len + int(torch.randint(-4, 5, (1,), generator=g)),), generator=g).tolist()
        for _ in range(args.batch)
    ]
    n_tokens = args.batch * args.new
    for size in args.sizes:
        model = Transformer(bench_config(size)).eval()
        model.init_weights(generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(0)
        sides = {"nanopost": lambda: best_time(
            lambda: generate(model, prompts, max_new_tokens=args.new, temperature=1.0, generator=gen),
            repeats=args.repeats)}
        # Timed in every round too: a millisecond-long measurement taken once can land in a slow spell.
        sides["ceiling"] = lambda: decode_kernel_floor(model, args.batch, context=args.prompt_len + args.new // 2)
        if not args.no_hf:
            sides["transformers"] = transformers_timer(model, prompts, args)
        times = alternate_rounds(sides, args.rounds)
        t_ours = min(times["nanopost"])
        flops = n_tokens * flops_per_token(model, context=args.prompt_len + args.new // 2)
        floor = args.new * min(times["ceiling"])
        line = (f"{size:6s} nanopost {n_tokens / t_ours:9.0f} tok/s  "
                f"({flops / t_ours / peak:5.1%} of matmul peak; kernel-only ceiling {n_tokens / floor:6.0f} tok/s, "
                f"reached {floor / t_ours:4.0%})")
        if not args.no_hf:
            t_hf = min(times["transformers"])
            rounds = " ".join(f"{h / o:.2f}" for o, h in zip(times["nanopost"], times["transformers"]))
            line += (f" | transformers {n_tokens / t_hf:9.0f} tok/s | speed-up {t_hf / t_ours:4.2f}x "
                     f"(rounds: {rounds})")
        print(line, flush=True)


def transformers_timer(model: Transformer, prompts: list[list[int]], args) -> Callable[[], float]:
    """A function timing transformers' generate() on a copy of model (best of args.repeats)."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def run():
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0, eos_token_id=None)

    return lambda: best_time(run, repeats=args.repeats)


if __name__ == "__main__":
    main()
