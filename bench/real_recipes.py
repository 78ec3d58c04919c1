#!/usr/bin/env python
"""Materialize some recipes of the real project (data/real) through Dagster, not all of them: each named
recipe's eval and everything upstream of it (its statistics, merge, sources), the evals of the models
those recipes merge and of their bases (a LoRA expert's base too), and the leaderboard over the evals
the instance has, so bench/real_table.py prints their rows. What is in the project's cache is a hit.

    OMP_NUM_THREADS=1 .venv/bin/python bench/real_recipes.py fisher linear
    .venv/bin/python bench/real_table.py

Same settings as `merge-dag demo --size real` (MERGE_DAG_DATA=data/real, evaluation in bfloat16, the
project's DAGSTER_HOME); the real zoo must exist (`merge-dag zoo --size real` or the demo builds it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipe names (the `name:` of files in data/real/recipes)")
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--no-baselines", action="store_true", help="leave out the base's and experts' evals")
    args = ap.parse_args()
    os.environ.setdefault("MERGE_DAG_DATA", "data/real")
    os.environ.setdefault("MERGE_DAG_EVAL_DTYPE", "bfloat16")
    from merge_dag.commands.demo import failure_lines, progress_logger_def, quiet
    from merge_dag.commands.home import ensure_dagster_home

    quiet(False)
    root = args.root.absolute()
    ensure_dagster_home(root)
    import dagster as dg

    from merge_dag.dagster.definitions import ALL_JOB, build_definitions
    from merge_dag.project import load_project

    project = load_project(root)
    unknown = [r for r in args.recipes if r not in project.recipes]
    if unknown:
        print(f"error: no recipe named {', '.join(unknown)} in {project.recipes_dir}", file=sys.stderr)
        return 2
    keys = [dg.AssetKey(["eval", "merged", r]) for r in args.recipes]
    if not args.no_baselines:  # the evals of the models the recipes merge and of their bases (a LoRA's too)
        members = [m for r in args.recipes for m in project.recipes[r].members]
        names = {m.name for m in members} | {m.base_name for m in members if m.is_adapter}
        keys += [dg.AssetKey(["eval", "model", n]) for n in project.model_evals if n in names]
    defs = build_definitions(root)
    job = defs.resolve_job_def(ALL_JOB).with_logger_defs({"progress": progress_logger_def()})
    selection = dg.AssetSelection.assets(*keys).upstream() | dg.AssetSelection.assets(dg.AssetKey(["leaderboard"]))
    graph = defs.resolve_asset_graph()
    chosen = list(selection.resolve(graph))
    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(
            instance=instance, asset_selection=chosen, raise_on_error=False, run_config={"loggers": {"progress": {}}}
        )
    print(f"{len(chosen)} assets in {time.perf_counter() - t0:.1f} s")
    failed = failure_lines(result)
    for line in failed:
        print(f"  failed: {line}")
    return 0 if result.success and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
