"""Supervised fine-tuning of an HF checkpoint on JSONL conversations.

    python scripts/sft.py --model CKPT_DIR --train data.jsonl --val val.jsonl --out runs/sft [--lr 3e-4 ...]
    python scripts/sft.py --help        # every option with its default
"""

from nanopost.plumbing.config import main_guard, parse_config
from nanopost.sft_loop import SFTConfig, train_sft
from nanopost.tools.monitor import LiveMonitor


def main() -> None:
    train_sft(parse_config(SFTConfig, description=__doc__), monitor=LiveMonitor)


if __name__ == "__main__":
    main_guard(main)
