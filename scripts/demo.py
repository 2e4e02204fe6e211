"""The end-to-end demo: base model -> SFT -> GRPO (+ control arm) on multi-step arithmetic.

    python scripts/demo.py                 # the full demo, about 11 minutes on 2 CPU cores
    python scripts/demo.py --toy           # the same pipeline at toy scale, seconds
    python scripts/demo.py --help          # every option
"""

import sys

from nanopost.config import main_guard, parse_config
from nanopost.demo import TOY, DemoConfig, run_demo


def main() -> None:
    argv = sys.argv[1:]
    if "--toy" in argv:
        argv = [a for a in argv if a != "--toy"] + [x for k, v in TOY.items() for x in (f"--{k}", str(v))]
    run_demo(parse_config(DemoConfig, argv, description=__doc__))


if __name__ == "__main__":
    main_guard(main)
