"""N-shot exemplar bias of a checkpoint on a binary (or any) classification task.

    python scripts/shots.py --model CKPT_DIR [--shots 0,1,2 --draws 2 --calibrate --out shots.json]
    python scripts/shots.py --model CKPT_DIR --data my_test.jsonl --exemplars my_pool.jsonl --instruction "..."

For 0, 1 and 2 exemplars, over every combination of exemplar labels and every order, reports
accuracy, how often the answer copies the last exemplar's label, and how much the order alone
moves accuracy; --calibrate adds contextual calibration with a content-free input ("N/A").
Labels are scored by the model's log-probabilities, not generated. Default data: data/shots/
(short synthetic reviews, positive / negative: 200 test questions, 20 exemplars).
"""

from nanopost.plumbing.config import main_guard, parse_config
from nanopost.tools.shots import ShotsConfig, run_shots


def main() -> None:
    run_shots(parse_config(ShotsConfig, description=__doc__))


if __name__ == "__main__":
    main_guard(main)
