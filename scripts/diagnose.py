"""Plain-language diagnosis of a run from its metrics.jsonl: overfitting, reward hacking, length,
entropy and KL problems, a learning rate too low or too high, data that teaches nothing, and
where early stopping (GL_alpha, UP_s) would have stopped — each with the steps and values it rests on.

    python scripts/diagnose.py runs/grpo [--gl-alpha 5 --up-s 3 ...]

Exit status 0 when nothing is wrong, 1 when a warning or error was found or the run has too few
rows to judge (fewer train rows than --min-rows). Every threshold of nanopost.tools.monitor.Thresholds
can be set with --name value.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from nanopost.plumbing.config import main_guard
from nanopost.plumbing.metrics import METRICS_FILE, read_metrics
from nanopost.tools.monitor import Thresholds, diagnose, format_report, too_few_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", metavar="RUN_DIR", help="run directory (or its metrics.jsonl)")
    for f in dataclasses.fields(Thresholds):
        if f.name != "task_rewards":
            ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                            help=f"default {f.default}")
    ap.add_argument("--task-rewards", default=",".join(Thresholds.task_rewards),
                    help="reward components that measure the task itself (default: accuracy,countdown)")
    args = vars(ap.parse_args())
    run = args.pop("run")
    args["task_rewards"] = tuple(n for n in args["task_rewards"].split(",") if n)
    metrics = Path(run) / METRICS_FILE if Path(run).is_dir() else Path(run)
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: not found; give a run directory (it holds {METRICS_FILE}) or the file")
    rows = read_metrics(metrics)
    findings = diagnose(rows, **args)
    print(format_report(findings, rows=rows, min_rows=args["min_rows"]), end="")
    # A run too short to judge has not been found healthy: a script gating on this must not pass it.
    judged = too_few_rows(rows, args["min_rows"]) is None
    sys.exit(1 if any(f.severity != "info" for f in findings) or not judged else 0)


if __name__ == "__main__":
    main_guard(main)
