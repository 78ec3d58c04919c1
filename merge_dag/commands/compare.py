"""`merge-dag compare`: data-guided merges against their plain counterparts on the demo zoo.

Materializes the project's recipes (data/recipes: the plain and the guided demo recipes) through
Dagster, like `merge-dag demo`, and prints each skill's exact match side by side, with each guided
recipe against its plain twin (`merge_dag.evaluation.report.DEMO_PAIRS`). `--size bench` runs the
same recipes on the bench zoo: they are copied, with
data/models/ci/ read as data/models/bench/, into a project of their own under data/compare/bench
(git-ignored; calibration sets, tasks and eval data are shared through links), so the two sizes
never share a cache key or a leaderboard.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .demo import materialize_all, prepare, quiet


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path.cwd(), help="project root (default: the current folder)")
    p.add_argument("--size", default="ci", choices=["ci", "bench"], help="zoo to compare on (built if missing)")
    p.add_argument("--device", default=None, help="torch device for every step (default: $MERGE_DAG_DEVICE or cpu)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--verbose", action="store_true", help="show Dagster's step logs, warnings and lm-eval's progress")


def bench_project(root: Path, size: str) -> Path:
    """data/compare/<size>: the root's recipes pointed at data/models/<size>, everything else linked."""
    proj = root / "data" / "compare" / size
    (proj / "data" / "recipes").mkdir(parents=True, exist_ok=True)
    for name in ("models", "calibration", "tasks", "eval"):
        link = proj / "data" / name
        if not link.exists():
            link.symlink_to(root / "data" / name, target_is_directory=True)
    wanted = set()
    for f in sorted((root / "data" / "recipes").glob("*.y*ml")):
        text = f.read_text().replace("data/models/ci/", f"data/models/{size}/")
        out = proj / "data" / "recipes" / f.name
        wanted.add(out.name)
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
    for stale in (proj / "data" / "recipes").iterdir():
        if stale.name not in wanted:
            stale.unlink()
    return proj


def run(args: argparse.Namespace) -> int:
    from ..evaluation.report import DEMO_PAIRS, ScoreTable, format_results

    t0 = time.perf_counter()
    quiet(args.verbose)
    root = prepare(args)
    proj = root if args.size == "ci" else bench_project(root, args.size)
    result, summary, leaderboard, seconds = materialize_all(proj, verbose=args.verbose)
    if leaderboard is None:
        print("no leaderboard: the recipes name no evals")
        return 1
    table = ScoreTable.from_results(json.loads((leaderboard.parent / "results.json").read_text()))
    print(f"\nExact match per skill, {args.size} zoo (leaderboard: {leaderboard})\n")
    print(format_results(table, base=f"model/{args.size}_base", pairs=DEMO_PAIRS))
    if args.json:
        data = {
            m: {"avg": table.average(m), "se_avg": table.se_average(m), **{t: table.value(m, t) for t in table.tasks}}
            for m in table.scores
            if table.complete(m)
        }
        args.json.write_text(json.dumps({"size": args.size, "tasks": table.tasks, "table": data}, indent=2) + "\n")
    print(f"\nrun {result.run_id[:8]}: {summary}")
    print(f"Dagster run {seconds:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return 0 if result.success else 1
