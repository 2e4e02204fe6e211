"""GRPO step time: nanopost's train_grpo vs TRL's GRPOTrainer on the same random model and prompts.

    python scripts/bench_grpo.py [--sizes tiny small] [--steps 5] [--warmup 1] [--rounds 3] [--threads 2] [--no-trl]

A step is 4 prompts x 8 completions of exactly 64 new tokens sampled at temperature 1 (no top-k,
no top-p), scored by a seeded random reward (so no group's rewards all agree and nothing is
dropped), then one pass over them (mu = 1) and one AdamW step: the clipped token-mean loss with
clip range 0.2 / 0.28 and beta = 0.04 times the k3 KL to a frozen copy of the starting weights.
fp32 on the CPU, lr 1e-6, betas (0.9, 0.99), no weight decay, gradients clipped at 1.0. Both
draw from the same 64 prompts of 29-33 tokens (ChatML, a 1024-token byte-level BPE), each in
its own order; the reward function records each step's prompt lengths for the FLOP count.

    nanopost  train_grpo on an RL JSONL of the prompts, dynamic sampling off, reading the
              generation / scoring / update timers of its metrics.jsonl.
    TRL       GRPOTrainer on the same chat messages, num_generations=8,
              per_device_train_batch_size=32, gradient_accumulation_steps=1,
              steps_per_generation=1 (each optimizer step trains on exactly the 32 completions
              sampled for it, so TRL computes no separate old logprobs), num_iterations=1,
              max_completion_length=64, beta=0.04, epsilon=0.2, epsilon_high=0.28,
              loss_type="dapo" (token mean), scale_rewards="group", transformers' generate (no
              vLLM), bf16 off and gradient checkpointing off (TRL's defaults turn both on; the
              checkpointing would recompute the forward pass, work nanopost does only with
              --grad-checkpointing).

Fixed length: the tokenizer's eos is an added token whose id (1024) is one past the model's last
output row, so neither sampler can draw it, and both still run their usual stop-token checks.
It is the only id the model has no row for, and no prompt contains it. Both sides assert that
every completion has 64 tokens.

Each framework runs in a process of its own, so their peak resident memory (VmHWM) does not mix;
"imports" is that peak once the framework is imported, before any model is loaded. A step is
timed from the end of the previous one; the first `warmup` steps are left out and medians are
taken over the rest. The two take turns (--rounds, a fresh process each), each side's report is
its round of lowest median, and every round's ratio of medians is printed as well, so a slow
spell of the machine cannot fall on one side only and the noise is visible. Model FLOPs of a
step are sampling + reference forward + 3x forward for the update, over prompt + completion
positions (benchmark.grpo_step_flops); the fraction is of the best fp32 matmul peak
measured at the start of the run and in every round (other processes can only lower a
measurement). nanopost computes each group's shared prompt once (SharedPrefix), so it runs fewer
FLOPs than this count: its fraction measures the same work as TRL's, not its hardware use.
nanopost's step is split with its own timers (time_generate, time_score, time_update in
metrics.jsonl), the reference logprob pass inside `update_policy` timed by a stopwatch around
its `sequence_logprobs` call.

Run it on an idle machine. With other processes busy, every multi-threaded op can wait a whole
scheduler time slice for its slowest thread, and steps become many times slower at random;
--threads 1 is then the fairer comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmark import (SIZES, alternate_rounds, bench_config, grpo_step_flops, matmul_peak_flops, peak_rss,
                                random_chats, report_result, run_isolated)
from nanopost.plumbing.hf_io import load_tokenizer, save_model
from nanopost.data import tokenize_prompt
from nanopost.plumbing.data_files import load_rl
from nanopost.model import Transformer
from nanopost.prompts import PromptTemplate
from nanopost.plumbing.tokenizer import Tokenizer, train_bpe

PROMPTS, GROUP, NEW_TOKENS = 4, 8, 64
BETA, LR, BETAS, CLIP_LOW, CLIP_HIGH, CLIP_GRAD = 0.04, 1e-6, (0.9, 0.99), 0.2, 0.28, 1.0
TEMPLATE = PromptTemplate(instruction="Reply.", reasoning=False)
EOS = "<|eos|>"
DATA = "prompts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    ap.add_argument("--rounds", type=int, default=3, help="turns each side takes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    ap.add_argument("--worker", choices=["nanopost", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        run = time_nanopost if args.worker == "nanopost" else time_trl
        report_result(run(Path(args.dir), args.warmup, args.steps, args.threads))
        return

    run_trl = not args.no_trl
    if run_trl and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install -e '.[bench]'): timing nanopost alone")
        run_trl = False
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak ({args.threads} threads): {peak / 1e9:.0f} GFLOP/s | "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    tokenizer, questions = make_tokenizer_and_questions()
    prompt_lengths = [len(tokenize_prompt(tokenizer, TEMPLATE.messages(q))) for q in questions]
    print(f"step: {PROMPTS} prompts ({min(prompt_lengths)}-{max(prompt_lengths)} tokens) x {GROUP} completions "
          f"x {NEW_TOKENS} new tokens, beta {BETA} (k3), mu 1, fp32")
    print(f"timed: {args.steps} steps after {args.warmup} warmup, medians; each framework in its own process")
    print()
    header = f"{'size':6s} {'params':>7s} | {'nanopost s/step':>15s} {'of peak':>7s} {'peak RSS':>9s} {'imports':>8s}"
    if run_trl:
        header += f" | {'TRL s/step':>10s} {'of peak':>7s} {'peak RSS':>9s} {'imports':>8s} | speed-up"
    print(header, flush=True)

    splits = []
    worker = [__file__, "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {"TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model = Transformer(bench_config(size))
            model.init_weights(generator=torch.Generator().manual_seed(0))
            if tokenizer.eos_token_id < model.config.vocab_size:
                raise RuntimeError(f"eos id {tokenizer.eos_token_id} is one the model can sample")
            d = Path(tmp) / size
            save_model(model, d)
            tokenizer.save(d)
            with open(d / DATA, "w") as f:
                for i, (q, n) in enumerate(zip(questions, prompt_lengths)):
                    f.write(json.dumps({"prompt": q, "answer": "0", "id": i, "prompt_tokens": n}) + "\n")

            sides = {"nanopost": lambda: run_isolated(worker + ["--worker", "nanopost", "--dir", str(d)], env),
                     "peak": matmul_peak_flops}
            if run_trl:
                sides["trl"] = lambda: run_isolated(worker + ["--worker", "trl", "--dir", str(d)], env)
            runs = alternate_rounds(sides, args.rounds)
            peak = max(peak, *runs["peak"])
            ours = min(runs["nanopost"], key=lambda r: statistics.median(r["seconds"]))
            line = f"{size:6s} {model.num_params() / 1e6:6.1f}M | " + summary(model, ours, peak, 15)
            if run_trl:
                if not all(r["same_prompt_ids"] for r in runs["trl"]):
                    print(f"{size}: TRL's chat template gave other prompt ids than nanopost's; the data differ")
                theirs = min(runs["trl"], key=lambda r: statistics.median(r["seconds"]))
                speed_up = statistics.median(theirs["seconds"]) / statistics.median(ours["seconds"])
                rounds = " ".join(f"{statistics.median(t['seconds']) / statistics.median(o['seconds']):.2f}"
                                  for o, t in zip(runs["nanopost"], runs["trl"]))
                line += " | " + summary(model, theirs, peak, 10) + f" | {speed_up:7.2f}x (rounds: {rounds})"
            print(line, flush=True)
            print(f"{'':6s} (of the best peak measured so far, {peak / 1e9:.0f} GFLOP/s)", flush=True)
            splits.append((size, ours))

    print("\nnanopost's median step (by its time_step), split by the library's own timers, in seconds:")
    print(f"{'size':6s} | {'step':>6s} | {'sample':>14s} {'score':>14s} {'reference':>14s} {'update':>14s} "
          f"{'other':>14s}")
    for size, r in splits:
        i = sorted(range(len(r["step"])), key=r["step"].__getitem__)[(len(r["step"]) - 1) // 2]
        step = r["step"][i]
        parts = [r["generate"][i], r["score"][i], r["reference"][i],
                 r["update"][i] - r["reference"][i],  # update_policy's timer covers the reference pass
                 step - r["generate"][i] - r["score"][i] - r["update"][i]]  # prompts, sampler, metrics
        print(f"{size:6s} | {step:6.3f} | " + " ".join(f"{v:7.3f} ({v / step:4.0%})" for v in parts))
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def summary(model: Transformer, result: dict, peak: float, width: int) -> str:
    seconds = statistics.median(result["seconds"])
    flops = statistics.median(grpo_step_flops(model, lengths, reference=True) / s
                              for s, lengths in zip(result["seconds"], result["lengths"]))
    return (f"{seconds:{width}.3f} {flops / peak:7.1%} {result['peak_rss'] / 2**20:5.0f} MiB "
            f"{result['imports_rss'] / 2**20:4.0f} MiB")


def make_tokenizer_and_questions(n: int = 64) -> tuple[Tokenizer, list[str]]:
    """A ChatML BPE whose eos can never be sampled, and n questions of 2-5 pseudo-words."""
    rng = random.Random(1)
    questions = [" ".join(chat[0]["content"].rstrip(".").split()[: rng.randint(2, 5)]) + "?"
                 for chat in random_chats(n, seed=1, prompt_sentences=(1, 1))]
    # The rendered user turns, role names included, are in the training text so that the template's
    # words are whole tokens, as they are in a real tokenizer.
    texts = [m["content"] for chat in random_chats(200, seed=0) for m in chat]
    texts += [f"user\n{TEMPLATE.user_message(q)}\nassistant\n" for q in questions]
    base = train_bpe(texts, vocab_size=1024)
    backend = base.backend
    backend.add_special_tokens([EOS])  # id 1024: one past the last row of the models' 1024-row LM head
    tokenizer = Tokenizer(backend, eos_token=EOS, pad_token=base.pad_token, chat_template=base.chat_template)
    return tokenizer, questions


def timed_steps(start: float, ends: list[float], prompt_tokens: list[int], warmup: int, steps: int) -> dict:
    """Seconds of each step after warmup, timed from the end of the previous one, and the
    positions (prompt + completion) of its rollouts, from the prompt lengths the reward saw."""
    per_step = PROMPTS * GROUP
    if len(ends) != warmup + steps or len(prompt_tokens) != len(ends) * per_step:
        raise RuntimeError(f"{len(ends)} steps scored {len(prompt_tokens)} completions; "
                           f"expected {warmup + steps} steps of {per_step}")
    seconds = [b - a for a, b in zip([start] + ends, ends)]
    lengths = [[n + NEW_TOKENS for n in prompt_tokens[i : i + per_step]]
               for i in range(0, len(prompt_tokens), per_step)]
    return {"seconds": seconds[warmup:], "lengths": lengths[warmup:]}


# ---------------------------------------------------------------- nanopost


def time_nanopost(d: Path, warmup: int, steps: int, threads: int) -> dict:
    from nanopost import grpo_loop as rl
    from nanopost.plumbing.metrics import read_metrics

    imports_rss = peak_rss()
    run = d / "run"
    cfg = rl.GRPOConfig(
        model=str(d), train=str(d / DATA), out=str(run), instruction=TEMPLATE.instruction, reasoning=False,
        rewards={"random": 1.0}, steps=warmup + steps, prompts_per_step=PROMPTS, group_size=GROUP,
        max_new_tokens=NEW_TOKENS, temperature=1.0, dynamic_sampling="off", beta=BETA, kl="k3", mu=1, minibatches=1,
        clip_low=CLIP_LOW, clip_high=CLIP_HIGH, lr=LR, betas=BETAS, weight_decay=0.0, clip_grad=CLIP_GRAD,
        device="cpu", precision="fp32", seed=0, overwrite=True,  # each round times a fresh run in the same place
    )

    rng = random.Random(0)
    prompt_tokens: list[int] = []

    def random_reward(completion: str, sample: dict) -> float:
        prompt_tokens.append(sample["prompt_tokens"])
        return rng.random()

    # update_policy's timer covers the reference pass too. That pass is its one call of
    # sequence_logprobs without gradients, so a stopwatch around those calls splits it out.
    reference_seconds: list[float] = []
    logprobs = rl.sequence_logprobs

    def timed_logprobs(*args, **kwargs):
        if torch.is_grad_enabled():
            return logprobs(*args, **kwargs)
        t0 = time.perf_counter()
        out = logprobs(*args, **kwargs)
        reference_seconds.append(time.perf_counter() - t0)
        return out

    rl.sequence_logprobs = timed_logprobs
    # nanopost stops on the chat format's end of turn too, which the model can draw; TRL stops on
    # eos alone, which it cannot. The same stop set on both sides keeps every completion at the limit.
    stop_token_ids = Tokenizer.stop_token_ids
    Tokenizer.stop_token_ids = property(lambda self: [self.eos_token_id])
    ends: list[float] = []

    def log(line: str) -> None:  # a step ends when its progress line is printed
        if line.startswith("step "):
            ends.append(time.perf_counter())

    start = time.perf_counter()
    try:
        rl.train_grpo(cfg, extra_rewards={"random": random_reward}, log=log)
    finally:
        rl.sequence_logprobs = logprobs
        Tokenizer.stop_token_ids = stop_token_ids
    if torch.get_num_threads() != threads:  # the comparison holds only at equal threads
        raise RuntimeError(f"torch threads changed from {threads} to {torch.get_num_threads()}")
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    for r in rows:  # mean and max both 64: every completion ran to the limit
        if r["len_mean"] != NEW_TOKENS or r["len_max"] != NEW_TOKENS or r["groups_kept"] != PROMPTS:
            raise RuntimeError(f"step {r['step']}: completions of {r['len_mean']} tokens on average, "
                               f"{r['groups_kept']} groups trained; not the step this benchmark times")
    if len(reference_seconds) != len(rows):
        raise RuntimeError(f"{len(reference_seconds)} reference passes in {len(rows)} steps, expected one a step")
    rows = rows[warmup:]
    return {
        **timed_steps(start, ends, prompt_tokens, warmup, steps),
        **{key: [r[f"time_{key}"] for r in rows] for key in ("step", "generate", "score", "update")},
        "reference": reference_seconds[warmup:], "imports_rss": imports_rss,
    }


# ---------------------------------------------------------------- TRL


def time_trl(d: Path, warmup: int, steps: int, threads: int) -> dict:
    import datasets
    import transformers
    import trl

    imports_rss = peak_rss()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # renamed options, some set inside TRL
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(d)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ours = load_tokenizer(d)
    records = [{"prompt": TEMPLATE.messages(r["prompt"]), "prompt_tokens": r["prompt_tokens"]}
               for r in load_rl(d / DATA)]
    same_ids = all(
        list(hf_tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
        == tokenize_prompt(ours, r["prompt"]) for r in records)

    rng = random.Random(0)
    seen: list[int] = []

    def random_reward(completions, completion_ids, prompt_tokens, **kwargs) -> list[float]:
        lengths = sorted({len(c) for c in completion_ids})
        if lengths != [NEW_TOKENS]:
            raise RuntimeError(f"TRL sampled completions of {lengths} tokens; the benchmark needs {NEW_TOKENS}")
        seen.extend(prompt_tokens)
        return [rng.random() for _ in completions]

    ends: list[float] = []

    class StepEnds(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            if torch.get_num_threads() != threads:  # the comparison holds only at equal threads
                raise RuntimeError(f"the trainer changed torch threads from {threads} to {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=PROMPTS * GROUP,
            gradient_accumulation_steps=1, steps_per_generation=1, num_generations=GROUP,
            max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, num_iterations=1,
            epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo", scale_rewards="group",
            learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0, max_grad_norm=CLIP_GRAD,
            lr_scheduler_type="constant", warmup_steps=0, use_vllm=False, gradient_checkpointing=False,
            bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, logging_strategy="no",
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        )
        trainer = trl.GRPOTrainer(model=hf_model, reward_funcs=random_reward, args=config,
                                  train_dataset=datasets.Dataset.from_list(records), processing_class=hf_tokenizer,
                                  callbacks=[StepEnds()])
        trainer.remove_callback(transformers.PrinterCallback)  # it prints the end-of-training summary
        if trainer.ref_model is None or trainer.ref_model.dtype != torch.float32:
            raise RuntimeError("TRL did not load an fp32 reference model")
        start = time.perf_counter()
        trainer.train()
    return {**timed_steps(start, ends, seen, warmup, steps), "same_prompt_ids": same_ids, "imports_rss": imports_rss}


if __name__ == "__main__":
    main()
