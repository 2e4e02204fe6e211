"""Write the fixed held-out splits of the generated tasks into data/.

    python scripts/make_data.py [--out data]

    data/arithmetic/test.jsonl   100 questions per level, levels 1..9 (level 1 has only 18)
    data/countdown/test.jsonl     50 puzzles per level, levels 1..4

The splits come from the tasks' held-out buckets (see nanopost.tasks.base), so no question in them
is ever generated for training. The output is a function of the code alone: running this again
gives byte-identical files. GSM8K needs nothing generated; data/gsm8k holds the dataset's files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanopost.tasks import get_task, write_jsonl

# task -> (records per level, seed)
HELD_OUT = {"arithmetic": (100, 0), "countdown": (50, 0)}


def write_splits(out_dir: str | Path) -> list[Path]:
    """Write every held-out split under `out_dir`; returns the paths written."""
    paths = []
    for name, (per_level, seed) in HELD_OUT.items():
        task = get_task(name, split="test")
        path = Path(out_dir) / name / "test.jsonl"
        write_jsonl(task.make_split(per_level * len(task.levels), seed), path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data"),
                    help="directory to write <task>/test.jsonl into (default: the repository's data/)")
    args = ap.parse_args()
    for path in write_splits(args.out):
        print(f"wrote {path} ({sum(1 for _ in open(path, encoding='utf-8'))} records)")


if __name__ == "__main__":
    main()
