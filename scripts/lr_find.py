"""Learning-rate range test: a short SFT run with an exponentially growing lr; suggests an lr.

    python scripts/lr_find.py --model CKPT_DIR --train data.jsonl [--start-lr 1e-7 --end-lr 1 --steps 100]
    python scripts/lr_find.py --help        # every option with its default

Writes OUT/lr_find.csv (lr, loss per step), OUT/lr_find.json (the suggestion) and, with
matplotlib installed, OUT/lr_find.png. Use the same --max-len / --batch-rows / --grad-accum as the
SFT run the lr is for.
"""

from nanopost.plumbing.config import main_guard, parse_config
from nanopost.tools.lr_find import LRFindConfig, lr_range_test


def main() -> None:
    lr_range_test(parse_config(LRFindConfig, description=__doc__))


if __name__ == "__main__":
    main_guard(main)
