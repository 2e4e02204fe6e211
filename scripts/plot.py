"""A PNG dashboard of one or more runs' metrics.jsonl (needs matplotlib: the plot extra).

    python scripts/plot.py runs/a runs/b-seed0 runs/b-seed1 [--out dashboard.png] [--smooth 0.9]
    python scripts/plot.py runs/x runs/y runs/z --group "lr3e-4=runs/x,runs/y"
    python scripts/plot.py runs/sft runs/grpo --x minutes    # runs of different lengths on one time axis
    python scripts/plot.py runs/sft runs/grpo --x samples    # ... or on the samples each has trained on

Runs named alike apart from a -seedN suffix are drawn as one mean ± std band; --group NAME=DIRS
makes a group explicitly (its directories need not be repeated before it).
"""

import argparse
import sys

from nanopost.plumbing.config import main_guard
from nanopost.tools.plot import parse_group, plot_runs, run_names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", metavar="RUN_DIR")
    ap.add_argument("--out", default="dashboard.png", help="PNG to write (default: dashboard.png)")
    ap.add_argument("--group", action="append", default=[], metavar="NAME=RUN_DIR,...")
    ap.add_argument("--smooth", type=float, default=0.0, help="EMA weight for train curves, 0..1 (default 0: raw)")
    ap.add_argument("--title")
    ap.add_argument("--x", choices=["step", "minutes", "samples"], default="step",
                    help="horizontal axis: optimizer steps, minutes since each run's first row, or samples "
                         "trained on (SFT examples, GRPO completions) (default: step)")
    args = ap.parse_args()
    groups = [parse_group(g) for g in args.group]
    dirs = list(dict.fromkeys([*args.runs, *(d for _, members in groups for d in members)]))
    if not dirs:
        ap.error("give at least one RUN_DIR")
    names = dict(zip(dirs, run_names(dirs)))
    try:
        out = plot_runs(dirs, args.out, groups={g: [names[d] for d in members] for g, members in groups},
                        smooth=args.smooth, title=args.title, x=args.x)
    except ModuleNotFoundError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main_guard(main)
