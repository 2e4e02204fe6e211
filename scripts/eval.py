"""Held-out accuracy of a checkpoint on an RL JSONL file: greedy accuracy with its 95% interval,
avg@k and pass@k, per difficulty; the prompts rendered as scripts/grpo.py renders them.

    python scripts/eval.py --model runs/grpo/checkpoints/best --data data/gsm8k/test.jsonl --task gsm8k \\
        [--k 8 --temperature 1.0 --samples 200 --out eval.json]
    python scripts/eval.py --help        # every option with its default
"""

from nanopost.tools.checkpoint_eval import EvalConfig, evaluate_checkpoint, format_table
from nanopost.plumbing.config import main_guard, parse_config


def main() -> None:
    print(format_table(evaluate_checkpoint(parse_config(EvalConfig, description=__doc__))))


if __name__ == "__main__":
    main_guard(main)
