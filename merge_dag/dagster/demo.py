"""`merge-dag demo`: build the ci zoo if missing, materialize every recipe under data/recipes and its
evals headless through Dagster, then print the leaderboard and what was built or found in cache."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .home import ensure_dagster_home


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path.cwd(), help="project root (default: the current folder)")
    p.add_argument("--size", default="ci", choices=["ci", "bench"], help="zoo size to build if missing")
    p.add_argument("--device", default=None, help="torch device for every step (default: $MERGE_DAG_DEVICE or cpu)")


def prepare(args: argparse.Namespace) -> Path:
    """The project root of `args`, with the device set and the zoo of `args.size` built if missing."""
    root = args.root.absolute()
    if args.device:
        os.environ["MERGE_DAG_DEVICE"] = args.device
    from ..zoo.build import build_zoo

    build_zoo(size=args.size, out=root / "data" / "models", progress=True, data_dir=root / "data")
    return root


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    root = prepare(args)
    t_zoo = time.perf_counter() - t0

    result, summary, leaderboard, t_run = materialize_all(root)
    if leaderboard is not None:
        print("\nLeaderboard\n")
        print(leaderboard.read_text())
    print(f"run {result.run_id[:8]}: {summary}")
    print(f"zoo {t_zoo:.1f} s, Dagster run {t_run:.1f} s, total {time.perf_counter() - t0:.1f} s")
    print(f"lineage: {os.environ.get('MERGE_DAG_DB') or root / 'data' / 'lineage.duckdb'}  (try: merge-dag audit <recipe name>)")
    return 0 if result.success else 1


def materialize_all(root: Path):
    """Run the merge_all job of the project at `root` in-process (runs persist in its DAGSTER_HOME).
    Returns (result, lineage summary text, leaderboard.md path or None, seconds)."""
    ensure_dagster_home(root)
    from datetime import datetime, timezone

    from dagster import DagsterInstance

    from .definitions import ALL_JOB, build_definitions

    defs = build_definitions(root)
    job = defs.resolve_job_def(ALL_JOB)
    t1 = time.perf_counter()
    with DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=True)
    seconds = time.perf_counter() - t1
    resource = defs.resources["merge_dag"]
    resource.lineage().record_run(run_id=result.run_id, finished_at=datetime.now(timezone.utc).replace(tzinfo=None),
                                  status="success" if result.success else "failure", job=ALL_JOB)
    leaderboard = None
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.path == ["leaderboard"]:
            leaderboard = Path(mat.metadata["path"].value) / "leaderboard.md"
    return result, resource.lineage().run_summary(result.run_id), leaderboard, seconds
