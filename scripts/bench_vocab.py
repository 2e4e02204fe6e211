"""A real vocabulary: nanopost vs TRL with 151,936 output rows, peak memory and step time.

    python scripts/bench_vocab.py [--vocab 151936] [--lengths 128 256 512] [--steps 2] [--warmup 1]
                                  [--rounds 2] [--threads 2] [--no-trl]

The model is the "tiny" benchmark model (Qwen2-style, hidden 256, 4 layers, untied embeddings)
with its vocabulary grown to --vocab, as Qwen2/2.5/3 checkpoints have it; only the ordinary
vocabulary of its tokenizer is small (a 1024-token BPE padded with unused entries, which no
merge produces, up to the vocabulary size). Its LM head and the log-softmax over it then
dominate memory and time. Two steps, each exactly as scripts/bench_sft.py and
scripts/bench_grpo.py time them (their workers are reused here), fp32 on the CPU:

    SFT    8 chats of ~512 tokens a step (nanopost: one packed row each; TRL: padded to the longest)
    GRPO   4 prompts x 8 completions x 256 new tokens (the lengths of --lengths for the memory rows),
           beta 0.04 with a frozen reference, mu 1; the tokenizer's eos is one id past the model's
           last row, so every completion runs to the limit on both sides

Every measurement runs in a fresh process, so each peak resident memory (VmHWM) is that step's
own; the two frameworks take turns (--rounds) and the faster round of each is reported with
every round's ratio. nanopost is also measured with --vocab 1024 for the memory budget of a real
vocabulary: its own small-vocabulary peak plus the bytes the larger embedding and LM head add
(weights, gradients and the two AdamW moments, 16 bytes per entry each).

The head line times the chunked LM head alone (nanopost.fast.lm_head.head_logprobs, forward and
backward) on the SFT step's positions, against the fp32 matmul peak measured in the same run:
its matmuls alone (the forward tile and the three backward tiles, as shapes), and the whole
head with its softmax. A TRL length is skipped when its fp32 logits alone would not fit in the
available memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tokenizers
import torch

import bench_grpo
import bench_sft
from nanopost.fast import lm_head
from benchmark import (alternate_rounds, bench_config, matmul_peak_flops, random_chats, report_result,
                                run_isolated)
from nanopost.plumbing.hf_io import load_model, load_tokenizer, save_model
from nanopost.data import pack_examples, tokenize_chat, tokenize_prompt
from nanopost.model import Transformer
from nanopost.plumbing.tokenizer import Tokenizer

SFT_ROWS, SFT_TOKENS = 8, 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512], help="GRPO completion lengths")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    ap.add_argument("--rounds", type=int, default=2, help="turns each side takes at the main shapes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return report_result(WORKERS[args.worker](args))

    peak = matmul_peak_flops()
    print(f"fp32 matmul peak ({args.threads} threads): {peak / 1e9:.0f} GFLOP/s | "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {v: write_checkpoint(Path(tmp) / f"v{v}", v) for v in (args.vocab, 1024)}
        print(f"model: tiny (hidden 256, 4 layers) with vocabulary {args.vocab}: "
              f"{num_params(args.vocab) / 1e6:.1f}M parameters ({num_params(1024) / 1e6:.1f}M at 1024)")

        def side(worker, vocab, new_tokens=256):
            argv = [__file__, "--worker", worker, "--dir", str(dirs[vocab]), "--new-tokens", str(new_tokens),
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            return lambda: run_isolated(argv, {"TOKENIZERS_PARALLELISM": "false"})

        trl = not args.no_trl
        print(f"\nSFT step: {SFT_ROWS} chats of ~{SFT_TOKENS} tokens; GRPO step: {bench_grpo.PROMPTS} prompts x "
              f"{bench_grpo.GROUP} completions x 256 new tokens; {args.steps} timed steps after {args.warmup}")
        header = f"{'step':5s} | {'nanopost s':>10s} {'tok/s':>7s} {'peak RSS':>9s}"
        if trl:
            header += f" | {'TRL s':>7s} {'tok/s':>7s} {'peak RSS':>9s} | {'speed-up':>8s} {'memory':>6s}"
        print(header + f" | {'at 1024':>8s} {'budget':>8s}", flush=True)
        for step in ("sft", "grpo"):
            sides = {"nanopost": side(f"{step}-nanopost", args.vocab), "small": side(f"{step}-nanopost", 1024),
                     "peak": matmul_peak_flops}
            if trl:
                sides["trl"] = side(f"{step}-trl", args.vocab)
            runs = alternate_rounds(sides, args.rounds)
            peak = max(peak, *runs["peak"])
            ours, small = best(runs["nanopost"]), best(runs["small"])
            line = f"{step:5s} | {row(ours, 10)}"
            if trl:
                theirs = best(runs["trl"])
                rounds = " ".join(f"{seconds(t) / seconds(o):.2f}" for o, t in zip(runs["nanopost"], runs["trl"]))
                line += (f" | {row(theirs, 7)} | {seconds(theirs) / seconds(ours):7.2f}x "
                         f"{ours['peak_rss'] / theirs['peak_rss']:5.2f}x")
            budget = 1.5 * small["peak_rss"] + 16 * 2 * (args.vocab - 1024) * 256
            line += f" | {mib(small['peak_rss']):>8s} {mib(budget):>8s}"
            print(line + (f"  (speed-up by round: {rounds})" if trl else ""), flush=True)
        print("memory: nanopost's peak as a share of TRL's; budget: 1.5x nanopost's peak at vocabulary 1024 plus "
              "the larger embedding and head with their gradients and AdamW moments")

        print(f"\nGRPO peak RSS by completion length (one step after {args.warmup} warmup, a process each):")
        print(f"{'new tokens':>10s} | {'nanopost':>9s} | {'TRL':>9s}", flush=True)
        for n in args.lengths:
            ours = side("grpo-nanopost", args.vocab, n)()
            line = f"{n:10d} | {mib(ours['peak_rss']):>9s} | "
            if not trl:
                line += f"{'-':>9s}"
            elif not trl_fits(n, args.vocab):
                line += "not run: its logits alone would exceed the available memory"
            else:
                try:
                    line += f"{mib(side('grpo-trl', args.vocab, n)()['peak_rss']):>9s}"
                except RuntimeError as e:  # killed for memory, most likely
                    line += f"failed: {e}"
            print(line, flush=True)

    print(f"\nLM head alone ({SFT_ROWS * SFT_TOKENS} positions, vocabulary {args.vocab}, forward + backward):")
    print(head_line(SFT_ROWS * SFT_TOKENS, args.vocab, max(peak, matmul_peak_flops())))
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def num_params(vocab: int) -> int:
    cfg = bench_config("tiny")
    cfg.vocab_size = vocab
    with torch.device("meta"):
        return Transformer(cfg).num_params()


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def seconds(result: dict) -> float:
    return statistics.median(result["seconds"])


def best(results: list[dict]) -> dict:
    return min(results, key=seconds)


def row(result: dict, width: int) -> str:
    return f"{seconds(result):{width}.2f} {result['tokens'] / seconds(result):7.0f} {mib(result['peak_rss']):>9s}"


def trl_fits(new_tokens: int, vocab: int) -> bool:
    rows = bench_grpo.PROMPTS * bench_grpo.GROUP
    logits = 1.5 * rows * (new_tokens + 40) * vocab * 4  # fp32 logits, and half again while it uses them
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return logits < 0.8 * available


# ------------------------------------------------------------------ the checkpoint and its data


def write_checkpoint(d: Path, vocab: int) -> Path:
    """The tiny model with `vocab` rows, a padded tokenizer whose eos is id `vocab`, and GRPO's prompts."""
    tokenizer, questions = bench_grpo.make_tokenizer_and_questions()
    tokenizer = padded(tokenizer, vocab)
    cfg = bench_config("tiny")
    cfg.vocab_size = vocab
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, d)
    tokenizer.save(d)
    with open(d / bench_grpo.DATA, "w") as f:
        for i, q in enumerate(questions):
            n = len(tokenize_prompt(tokenizer, bench_grpo.TEMPLATE.messages(q)))
            f.write(json.dumps({"prompt": q, "answer": "0", "id": i, "prompt_tokens": n}) + "\n")
    return d


def padded(tokenizer: Tokenizer, vocab: int) -> Tokenizer:
    """The same tokenizer with unused entries up to `vocab` and its eos moved to id `vocab`."""
    data = json.loads(tokenizer.backend.to_str())
    entries = data["model"]["vocab"]
    eos = next(t for t in data["added_tokens"] if t["content"] == bench_grpo.EOS)
    if eos["id"] != len(entries) or eos["id"] > vocab:
        raise RuntimeError(f"the eos is id {eos['id']} after {len(entries)} entries; cannot pad to {vocab}")
    for i in range(len(entries), vocab):
        entries[f"unused{i}"] = i
    eos["id"] = vocab
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    return Tokenizer(backend, eos_token=bench_grpo.EOS, pad_token=tokenizer.pad_token,
                     chat_template=tokenizer.chat_template)


def sft_data(d: Path, steps: int):
    """(chats, examples, packed batches) of ~SFT_TOKENS-token chats, SFT_ROWS a step."""
    tokenizer = load_tokenizer(d)
    chats = random_chats(SFT_ROWS * steps, seed=1, prompt_sentences=(20, 22), reply_sentences=(36, 40))
    examples = [tokenize_chat(tokenizer, chat) for chat in chats]
    rows = max(map(len, examples)) - 1
    return chats, examples, pack_examples(examples, rows, SFT_ROWS, pad_id=tokenizer.pad_token_id)


# ------------------------------------------------------------------ workers (one process each)


def sft_nanopost(args) -> dict:
    _, _, batches = sft_data(Path(args.dir), args.warmup + args.steps)
    model = load_model(args.dir, dtype=torch.float32)
    steps = bench_sft.time_nanopost(model, batches, args.warmup)
    return {"seconds": [s for s, _, _ in steps], "tokens": statistics.mean(sum(n) for _, n, _ in steps)}


def sft_trl(args) -> dict:
    chats, examples, _ = sft_data(Path(args.dir), args.warmup + args.steps)
    steps, same = bench_sft.time_trl(args.dir, chats, examples, args.warmup)
    if not same:
        raise RuntimeError("TRL tokenised the chats differently from tokenize_chat")
    return {"seconds": [s for s, _, _ in steps], "tokens": statistics.mean(sum(n) for _, n, _ in steps)}


def grpo(side):
    def run(args) -> dict:
        bench_grpo.NEW_TOKENS = args.new_tokens  # read by its workers when they run
        out = side(Path(args.dir), args.warmup, args.steps, args.threads)
        return {"seconds": out["seconds"], "tokens": statistics.mean(sum(n) for n in out["lengths"])}
    return run


WORKERS = {"sft-nanopost": sft_nanopost, "sft-trl": sft_trl,
           "grpo-nanopost": grpo(bench_grpo.time_nanopost), "grpo-trl": grpo(bench_grpo.time_trl)}


# ------------------------------------------------------------------ the head alone


def head_line(n: int, vocab: int, peak: float) -> str:
    d = bench_config("tiny").hidden_size
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (0.02 * torch.randn(vocab, d, generator=g)).requires_grad_()
    tokens = torch.randint(0, vocab, (n,), generator=g)

    def head():
        lm_head.head_logprobs(h, w, tokens)[0].sum().backward()
        h.grad = w.grad = None

    rows = max(1, min(n, lm_head._TILE_ELEMENTS // vocab))
    tile_rows = min(n, lm_head._TILE_ROWS)
    cols = max(1, min(vocab, lm_head._BACKWARD_TILE_ELEMENTS // tile_rows))
    fwd_out = torch.empty(rows, vocab)
    a, wt = torch.randn(tile_rows, d), torch.randn(cols, d)
    G, bwd_out, dh = torch.randn(tile_rows, cols), torch.empty(tile_rows, cols), torch.empty(tile_rows, d)
    dw = torch.empty(cols, d)

    def matmuls():  # the head's matmuls at the tiles' shapes, as many as one forward + backward runs
        for _ in range(-(-n // rows)):
            torch.mm(h[:rows].detach(), w.detach().T, out=fwd_out)
        for _ in range(-(-n // tile_rows) * -(-vocab // cols)):
            torch.mm(a, wt.T, out=bwd_out)
            dh.addmm_(G, wt)
            dw.addmm_(G.T, a)

    flops = 4 * 2 * n * d * vocab
    t_mm, t_head = (min(timed(f) for _ in range(3)) for f in (matmuls, head))
    return (f"matmuls alone {flops / t_mm / 1e9:.0f} GFLOP/s ({flops / t_mm / peak:.0%} of peak), "
            f"whole head {t_head:.2f} s = {flops / t_head / 1e9:.0f} GFLOP/s ({flops / t_head / peak:.0%}), "
            f"peak {peak / 1e9:.0f} GFLOP/s")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
