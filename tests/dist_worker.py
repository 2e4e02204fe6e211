"""One training job for the multi-process tests, run under torchrun (or plain python for 1 process).

    dist_worker.py sft CONFIG.json            train_sft(SFTConfig(**config))
    dist_worker.py grpo CONFIG.json           train_grpo(GRPOConfig(**config)), toy 'sevens' reward, learnability curriculum
    dist_worker.py update CONFIG.json OUT     one GRPO update (SGD) on fixed rollouts; rank 0 saves the weights to OUT
    ... --fail-rank R --fail-step K           rank R raises at its K-th optimizer step (a crash mid-run)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import nanopost.grpo_loop as rl  # noqa: E402
import nanopost.sft_loop as sft  # noqa: E402
from nanopost.plumbing import distributed  # noqa: E402
from nanopost.plumbing.hf_io import load_model, load_tokenizer, save_model  # noqa: E402
from nanopost.plumbing.config import main_guard  # noqa: E402
from nanopost.curriculum import CurriculumSampler  # noqa: E402
from nanopost.data import tokenize_prompt  # noqa: E402
from nanopost.plumbing.data_files import load_rl  # noqa: E402
from nanopost.grpo import group_advantages  # noqa: E402
from nanopost.prompts import PromptTemplate  # noqa: E402
from tiny import sevens  # noqa: E402


def length(completion: str, sample: dict) -> float:
    """Dense on an untrained model (unlike sevens): every group has spread."""
    return len(completion) / 10


def inject_failure(module, name: str, rank: int, at_call: int) -> None:
    """Make module.name raise on `rank` at its at_call-th call (1-based)."""
    real, calls = getattr(module, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if distributed.setup("cpu").rank == rank and calls[0] == at_call:
            raise RuntimeError(f"injected failure on rank {rank} at step {at_call}")
        return real(*args, **kwargs)

    setattr(module, name, failing)


def one_update(cfg: rl.GRPOConfig, out: Path) -> None:
    """Every rank builds the same rollouts (same seed, whole batch), then the update is sharded."""
    dist = distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    policy = load_model(cfg.model).train()
    policy.grad_checkpointing = cfg.grad_checkpointing
    reference = load_model(cfg.model).eval().requires_grad_(False) if cfg.beta > 0 else None
    template = PromptTemplate(instruction=cfg.instruction, reasoning=cfg.reasoning)
    records = load_rl(cfg.train)[: cfg.prompts_per_step]
    prompt_ids = [tokenize_prompt(tokenizer, template.messages(r["prompt"])) for r in records]
    scorer = rl.RewardScorer(cfg.rewards, extra={"sevens": sevens, "length": length})
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = rl.collect(policy, tokenizer, records, prompt_ids, scorer, cfg, cfg.temperature, generator)
    adv = group_advantages(batch.rewards, cfg.group_size, scale=cfg.adv_scale)
    # SGD, so weights differ exactly as much as gradients do: Adam's first step is about
    # lr * sign(g), which turns rounding in near-zero gradients into whole lr-sized differences.
    wrapped = distributed.wrap(policy, dist, fsdp=cfg.fsdp)
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    stats = rl.update_policy(policy, reference, optimizer, batch, adv, cfg, cfg.temperature, dist.device,
                             dist=dist, wrapped=wrapped)
    weights = distributed.full_weights(policy)
    if dist.main:
        policy = load_model(cfg.model)
        policy.load_state_dict(weights)
        save_model(policy, out)
        (out / "stats.json").write_text(json.dumps(stats))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["sft", "grpo", "update"])
    p.add_argument("config")
    p.add_argument("out", nargs="?")
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-step", type=int)
    args = p.parse_args()
    config = json.loads(Path(args.config).read_text())
    if args.fail_rank is not None:
        target = (sft, "accumulate_gradients") if args.mode == "sft" else (rl, "update_policy")
        inject_failure(*target, args.fail_rank, args.fail_step)
    if args.mode == "sft":
        sft.train_sft(sft.SFTConfig(**config))
    elif args.mode == "grpo":
        cfg = rl.GRPOConfig(**config)
        # A learnability curriculum: its pass-rate statistics must stay the same on every rank.
        sampler = CurriculumSampler(load_rl(cfg.train), total_steps=cfg.steps, mode="learnability", seed=cfg.seed)
        rl.train_grpo(cfg, sampler=sampler, extra_rewards={"sevens": sevens})
        states = distributed.setup("cpu").gather(json.dumps(sampler.state_dict(), sort_keys=True))
        if len(set(states)) != 1:
            raise RuntimeError("curriculum statistics differ between ranks")
    else:
        one_update(rl.GRPOConfig(**config), Path(args.out))


if __name__ == "__main__":
    main_guard(main)
