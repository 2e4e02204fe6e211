"""SFT training throughput: nanopost vs TRL's SFTTrainer on the same random model and data.

    python scripts/bench_sft.py [--sizes tiny small] [--steps 8] [--warmup 2] [--rounds 3] [--threads 2]
                                [--no-trl] [--no-memory]

Both sides train in fp32 on the CPU, from the same weights, on the same ~100-token chats (a
1024-token byte-level BPE, ChatML), with the loss on the assistant reply only, and AdamW with
lr 3e-4, weight decay 0.1, betas (0.9, 0.95), gradient clipping at 1.0, 8 examples a step:

    nanopost  pack_examples with rows as long as the longest example and 8 rows a batch (the
              model computes their real positions only), then accumulate_gradients +
              clip_grad_norm_ + AdamW step + zero_grad, as train_sft does.
    TRL       SFTTrainer on conversational prompt-completion records (tokenised by TRL with the
              transformers tokenizer of the same files), per_device_train_batch_size=8, each
              batch padded to its longest example, completion_only_loss=True, no packing and no
              padding-free. Gradient checkpointing is off: TRL turns it on by default, and it
              would recompute the forward pass, work nanopost does only with
              --grad-checkpointing. TRL's token ids are checked equal to tokenize_chat's; its
              loss also covers the newline after <|im_end|>, one target more per example at the
              same compute.

A token is a position that predicts a next token, padding excluded: an example of n ids counts
n - 1 in both (TRL also feeds the n-th id, whose prediction trains nothing). A step is timed from
the end of the previous one, so TRL's data collation and callbacks are inside it; the first
`warmup` steps are left out, and tok/s and FLOP/s are those of the fastest timed step over all
rounds: the two sides take turns (--rounds), so a slow spell of the machine cannot fall on one
side only, and each round's ratio of fastest steps is printed as well. Model FLOPs
are 3x the forward FLOPs of every position (see benchmark.training_flops), credited
alike to both sides. nanopost runs fewer: the LM head, and the last layer's output projection
and MLP that only it reads, run at the loss tokens alone. So the line under each size also
gives the fraction counting only that needed work, nanopost's hardware use. Fractions are of
the best fp32 matmul peak measured before each size and in every round, since other processes
can only lower a measurement.

The ceiling column times, for each timed batch, the matmuls of its linear layers alone
(benchmark.training_matmul_floor: forward, input gradient and weight gradient of every
linear, the LM head and the last layer's output projection and MLP at the loss tokens only),
taking turns with the two sides like a third one.
No attention, norm, loss or optimizer is in it, so no implementation on these kernels can train
faster; 'reached' is nanopost's tokens/s as a share of it.

Each side keeps its own AdamW implementation, as a user of either would get it: make_optimizer's
for nanopost, the Trainer's default `optim` for TRL (adamw_torch_fused with torch >= 2.8).

The memory line under each size gives nanopost's peak resident memory (VmHWM) over the same
steps without and with --grad-checkpointing, each in a fresh process of its own (a process's
peak never goes down), beside the resident memory before its first step; --no-memory skips it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmark import (alternate_rounds, bench_config, document_lengths, matmul_peak_flops, peak_rss,
                                random_chats, training_flops, training_matmul_floor)
from nanopost.plumbing.hf_io import save_model
from nanopost.data import Batch, Example, pack_examples, tokenize_chat
from nanopost.model import Transformer
from nanopost.plumbing.runtime import make_optimizer
from nanopost.sft_loop import accumulate_gradients
from nanopost.plumbing.tokenizer import train_bpe

BATCH = 8
LR, WEIGHT_DECAY, BETAS, CLIP = 3e-4, 0.1, (0.9, 0.95), 1.0
Step = tuple[float, list[int], int]  # (seconds, lengths in positions of its documents, loss tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    ap.add_argument("--rounds", type=int, default=3, help="turns each side takes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory line")
    ap.add_argument("--memory-worker", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args)
    run_trl = not args.no_trl
    if run_trl and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install -e '.[bench]'): timing nanopost alone")
        run_trl = False

    print(f"{args.threads} threads, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tokenizer, chats, examples, row, batches = bench_data(args)
    lengths = [len(e) for e in examples]
    per_step = statistics.mean(len(document_lengths(b.segment_ids)) for b in batches)
    print(f"data: {len(examples)} chats of {min(lengths)}-{max(lengths)} ids (mean {statistics.mean(lengths):.0f}), "
          f"{statistics.mean(e.num_loss_tokens for e in examples):.0f} loss tokens each on average")
    print(f"nanopost step: {BATCH} packed rows of <= {row} positions = {per_step:.1f} examples "
          f"(the layers skip the padding); accumulate_gradients + clip + AdamW step")
    if run_trl:
        print(f"TRL step: {BATCH} examples padded to the batch's longest; Trainer.training_step + clip + AdamW step")
    print(f"timed: {args.steps} steps after {args.warmup} warmup; tokens: non-padding positions with a target")
    print("peak: fp32 matmul GFLOP/s, the best measured so far (other processes only ever lower it)")
    print()
    print("ceiling: the linear layers' matmuls of each timed batch alone, back to back (no attention, norms,")
    print("         loss or optimizer): what no step built on these kernels can pass; 'reached' is nanopost's share")
    print()
    header = f"{'size':6s} {'params':>7s} {'peak':>5s} | {'nanopost tok/s':>14s} {'of peak':>7s}"
    header += f" | {'ceiling':>7s} {'reached':>7s}"
    if run_trl:
        header += f" | {'TRL tok/s':>9s} {'of peak':>7s} | speed-up"
    print(header, flush=True)

    peak = 0.0
    for size in args.sizes:
        peak = max(peak, matmul_peak_flops())
        model = Transformer(bench_config(size))
        model.init_weights(generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory() as d:
            if run_trl:  # saved before nanopost trains it, so that both start from the same weights
                save_model(model, d)
                tokenizer.save(d)
            sides = {"nanopost": lambda: time_nanopost(model, batches, args.warmup),
                     "ceiling": lambda: matmul_ceiling(model, batches[args.warmup:]),
                     "peak": matmul_peak_flops}
            if run_trl:
                sides["trl"] = lambda: time_trl(d, chats, examples, args.warmup)
            runs = alternate_rounds(sides, args.rounds)
            peak = max(peak, *runs["peak"])
            ours = [step for steps in runs["nanopost"] for step in steps]
            line = f"{size:6s} {model.num_params() / 1e6:6.1f}M {peak / 1e9:5.0f} | " + rates(model, ours, peak, 14)
            ceiling = best_step([step for steps in runs["ceiling"] for step in steps])
            line += f" | {sum(ceiling[1]) / ceiling[0]:7.0f} {speed_up(ours, [ceiling]):7.0%}"
            if run_trl:
                if not all(same for _, same in runs["trl"]):
                    print(f"{size}: TRL tokenised the chats differently from tokenize_chat; the data differ")
                theirs = [step for steps, _ in runs["trl"] for step in steps]
                line += " | " + rates(model, theirs, peak, 9)
                rounds = " ".join(f"{speed_up(o, t):.2f}" for o, (t, _) in zip(runs["nanopost"], runs["trl"]))
                line += f" | {speed_up(ours, theirs):7.2f}x (rounds: {rounds})"
            needed = f"nanopost {needed_share(model, ours, peak)}"
            if run_trl:
                needed += f", TRL {needed_share(model, theirs, peak)}"
        print(line, flush=True)
        print(f"{'':6s} of peak counting only the FLOPs the loss needs: {needed}", flush=True)
        if not args.no_memory:
            print(f"{'':6s} {memory_line(args, size)}", flush=True)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def bench_data(args):
    """(tokenizer, chats, their examples, row length, packed batches): the same in every process."""
    tokenizer = train_bpe([m["content"] for chat in random_chats(200, seed=0) for m in chat], vocab_size=1024)
    chats = random_chats(BATCH * (args.warmup + args.steps), seed=1)
    examples = [tokenize_chat(tokenizer, chat) for chat in chats]
    row = max(map(len, examples)) - 1  # positions of the longest example: one example per row at most
    batches = pack_examples(examples, row, BATCH, pad_id=tokenizer.pad_token_id, shuffle_seed=0)
    return tokenizer, chats, examples, row, batches


def memory_worker(args) -> None:
    """nanopost's steps of one size in this fresh process; prints its resident memory as JSON."""
    *_, batches = bench_data(args)
    model = Transformer(bench_config(args.sizes[0]))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.grad_checkpointing = args.memory_worker == "checkpointing"
    before = peak_rss()
    time_nanopost(model, batches, args.warmup)
    print(json.dumps({"before": before, "peak": peak_rss()}))


def memory_line(args, size: str) -> str:
    mib = {}
    for mode in ("plain", "checkpointing"):
        cmd = [sys.executable, __file__, "--sizes", size, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--memory-worker", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        mib[mode] = {k: v / 2**20 for k, v in json.loads(out.splitlines()[-1]).items()}
    plain, ckpt = mib["plain"], mib["checkpointing"]
    return (f"nanopost peak RSS: {plain['peak']:.0f} MiB, {ckpt['peak']:.0f} MiB with --grad-checkpointing "
            f"({plain['before']:.0f} / {ckpt['before']:.0f} MiB before the first step; a fresh process each)")


def best_step(steps: list[Step]) -> Step:
    """The step of highest tokens/s: like best_time, the least noisy estimate on a shared machine."""
    return max(steps, key=lambda step: sum(step[1]) / step[0])


def rates(model: Transformer, steps: list[Step], peak: float, width: int) -> str:
    seconds, lengths, _ = best_step(steps)
    return f"{sum(lengths) / seconds:{width}.0f} {training_flops(model, lengths) / seconds / peak:7.1%}"


def needed_share(model: Transformer, steps: list[Step], peak: float) -> str:
    """The best step's FLOP/s as a share of the peak, counting only the work its loss needs."""
    seconds, lengths, loss_tokens = best_step(steps)
    return f"{training_flops(model, lengths, loss_tokens) / seconds / peak:.1%}"


def speed_up(ours: list[Step], theirs: list[Step]) -> float:
    (t_ours, n_ours, _), (t_theirs, n_theirs, _) = best_step(ours), best_step(theirs)
    return (sum(n_ours) / t_ours) / (sum(n_theirs) / t_theirs)


def time_nanopost(model: Transformer, batches: list[Batch], warmup: int) -> list[Step]:
    device = torch.device("cpu")
    model.train()
    optimizer = make_optimizer(model, LR, WEIGHT_DECAY, BETAS)
    steps = []
    for batch in batches:
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch], device, "fp32")
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()  # train_sft logs the norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append((time.perf_counter() - t0, document_lengths(batch.segment_ids), batch.num_loss_tokens))
    return steps[warmup:]


def matmul_ceiling(model: Transformer, batches: list[Batch]) -> list[Step]:
    steps = []
    for batch in batches:
        lengths = document_lengths(batch.segment_ids)
        seconds = training_matmul_floor(model, sum(lengths), batch.num_loss_tokens, repeats=2)
        steps.append((seconds, lengths, batch.num_loss_tokens))
    return steps


def time_trl(model_dir: str, chats: list[list[dict]], examples: list[Example], warmup: int) -> tuple[list[Step], bool]:
    """Steps of SFTTrainer on the checkpoint in model_dir, and whether TRL's token ids equal ours."""
    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = datasets.Dataset.from_list([{"prompt": chat[:-1], "completion": chat[-1:]} for chat in chats])
    ends: list[float] = []
    threads = torch.get_num_threads()

    class StepEnds(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            if torch.get_num_threads() != threads:  # the comparison holds only at equal threads
                raise RuntimeError(f"the trainer changed torch threads from {threads} to {torch.get_num_threads()}")

    # TRL's default for gradient_checkpointing is True; transformers 5 renamed it activation_checkpointing.
    names = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    no_checkpointing = {checkpointing: False}
    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(
            output_dir=out, max_steps=len(chats) // BATCH, per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1, learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
            adam_beta2=BETAS[1], max_grad_norm=CLIP, lr_scheduler_type="constant", warmup_steps=0,
            completion_only_loss=True, packing=False, padding_free=False, **no_checkpointing,
            bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, logging_strategy="no",
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        )
        trainer = trl.SFTTrainer(model=hf_model, args=config, train_dataset=records, processing_class=hf_tokenizer,
                                 callbacks=[StepEnds()])
        trainer.remove_callback(transformers.PrinterCallback)  # it prints the end-of-training summary
        if getattr(trainer.model, "is_" + checkpointing):
            raise RuntimeError("SFTTrainer kept gradient checkpointing on; the comparison needs it off")
        same_ids = sorted(map(tuple, trainer.train_dataset["input_ids"])) == sorted(tuple(e.ids) for e in examples)

        # The trainer's own collator, wrapped to note what each step trains; batches are collated
        # in step order. Loss tokens are credited as tokenize_chat counts them, the same for both.
        lengths: list[list[int]] = []
        loss_tokens: list[int] = []
        collate = trainer.data_collator
        ours = {tuple(e.ids): e.num_loss_tokens for e in examples}

        def recording_collate(features):
            batch = collate(features)
            lengths.append((batch["attention_mask"].sum(1) - 1).tolist())  # n ids: n - 1 targets
            loss_tokens.append(sum(ours.get(tuple(f["input_ids"]), 0) for f in features))
            return batch

        trainer.data_collator = recording_collate
        start = time.perf_counter()
        trainer.train()
    seconds = [b - a for a, b in zip([start] + ends, ends)]
    assert len(lengths) == len(seconds), f"{len(lengths)} batches collated for {len(seconds)} steps"
    return list(zip(seconds, lengths, loss_tokens))[warmup:], same_ids


if __name__ == "__main__":
    main()
