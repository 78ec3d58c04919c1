"""`merge-dag search <name>`: run or resume the search <data>/searches/<name>.yaml (merge_dag.core.search)
on the project's cached asset graph, then print the trials and write the best recipe."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="search name (<data>/searches/<name>.yaml) or the path of a search file")
    p.add_argument("--root", type=Path, default=Path.cwd(), help="project root (default: the current folder)")
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="run until the study holds this many trials (default: the file's budget)",
    )
    p.add_argument("--device", default=None, help="torch device for every step (default: $MERGE_DAG_DEVICE or cpu)")
    p.add_argument("--verbose", action="store_true", help="show Dagster's step logs and lm-eval's progress")


def run(args: argparse.Namespace) -> int:
    from ..core.errors import MergeDagError

    if args.trials is not None and args.trials < 1:
        raise MergeDagError(f"--trials: must be at least 1, got {args.trials}")
    if args.device:
        os.environ["MERGE_DAG_DEVICE"] = args.device
    from .demo import quiet

    quiet(args.verbose)
    from ..dagster.search import run_search

    out = run_search(
        args.root.absolute(), args.name, trials=args.trials, log=lambda s: print(s, flush=True), quiet=not args.verbose
    )
    print(f"\nsearch {out.name}: {len(out.trials)} trials ({out.new_trials} merged now) in {out.seconds:.1f} s")
    if out.best is None:
        print("no completed trial")
        return 1
    pruned = sum(t.pruned for t in out.trials)
    if pruned:
        print(f"successive halving: {pruned} of {len(out.trials)} trials pruned after the small subset")
    b = out.best
    scores = ", ".join(f"{t} {v:.4f}" for t, v in b.scores.items())
    print(f"best: trial {b.number} {b.params} -> {scores}{'' if b.feasible else ' (below base on some task)'}")
    if out.report:
        base = out.report.get("base_scores") or {}
        shown = ", ".join(
            f"{t} {v:.4f}" + (f" (base {base[t]:.4f})" if t in base else "") for t, v in out.report["scores"].items()
        )
        print(f"best recipe on the report tasks (once, after the search): {shown}")
    print(f"best recipe: {out.best_file}  (merge-dag merge {out.best_file} <out_dir>)")
    if out.removed:
        print(f"removed {len(out.removed)} merged trial checkpoint(s) outside the best few (keep_best)")
    return 0
