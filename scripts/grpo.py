"""GRPO training of an HF checkpoint on prompts with verifiable answers.

    python scripts/grpo.py --model CKPT_DIR --train data/gsm8k/train.jsonl --val data/gsm8k/test.jsonl --task gsm8k \\
        --out runs/grpo [--group-size 8 --temperature 1.0 --beta 0.0 ...]
    python scripts/grpo.py --help        # every option with its default
"""

from nanopost.plumbing.config import main_guard, parse_config
from nanopost.grpo_loop import GRPOConfig, train_grpo
from nanopost.tools.monitor import LiveMonitor


def main() -> None:
    train_grpo(parse_config(GRPOConfig, description=__doc__), monitor=LiveMonitor)


if __name__ == "__main__":
    main_guard(main)
