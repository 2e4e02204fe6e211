"""Repeated and controlled experiments: K seeds of one config, an A/B pair, or a control arm.

    python scripts/experiment.py --kind sft --seeds 3 --model M --train T --val V --lr 1e-3
    python scripts/experiment.py --kind grpo --seeds 5 --ab "lr=1e-6" "lr=3e-6" --model M --train T --val V
    python scripts/experiment.py --kind grpo --seeds 5 --control --model M --train T --val V --jobs 2

Options the experiment does not know go to every run's training config (scripts/sft.py or
scripts/grpo.py --help lists them). Prints and writes OUT/summary.md and OUT/summary.json:
final metrics per arm as mean ± std with a 95% t-interval, and whether arms differ by more than
the seed-to-seed spread (Welch's t-test). See nanopost/experiment.py for the details.
"""

from nanopost.plumbing.config import main_guard
from nanopost.tools.experiment import main

if __name__ == "__main__":  # the guard also keeps --jobs worker processes from rerunning the experiment
    main_guard(main)
