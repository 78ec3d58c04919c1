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

    # data files only where missing: a user's edits under data/ survive (`merge-dag zoo` rewrites them)
    build_zoo(size=args.size, out=root / "data" / "models", progress=True, data_dir=root / "data",
              overwrite_data=False)
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
    failed = failure_lines(result)
    if failed:
        print(f"\n{len(failed)} step(s) failed; what depends on them was skipped, everything else was built:")
        print("\n".join(f"  {line}" for line in failed))
    return 0 if result.success and not failed else 1


def _one_line(error) -> str:
    """The user's error inside Dagster's wrappers, as `Class: first line of its message`."""
    while error.cause is not None and error.cls_name and error.cls_name.startswith("Dagster"):
        error = error.cause
    message = (error.message or "").strip()
    prefix = f"{error.cls_name}: "
    full = message.split(": ", 1)[1] if message.split(": ", 1)[0].endswith(error.cls_name or "?") else message
    first = (full.strip().splitlines() or [""])[0]
    return first if error.cls_name == "Failure" else prefix + first


def failure_lines(result) -> list[str]:
    """One line per failed step of `result`: `<asset key>: <the error's first line>`, no traceback."""
    keys = {k.to_python_identifier(): k.to_user_string()
            for k in result.job_def.asset_layer.asset_graph.get_all_asset_keys()}
    lines = []
    for event in result.get_step_failure_events():
        data = event.event_specific_data
        step = event.step_key or "?"
        node = step.split(".", 1)[0]
        label = keys.get(node)
        if label is None:  # an asset check's step: <asset>_<check name>
            owner = max((k for k in keys if node.startswith(k + "_")), key=len, default=None)
            label = f"{keys[owner]} (check {node[len(owner) + 1:]})" if owner else step
        if data.user_failure_data is not None and data.user_failure_data.description:
            text = data.user_failure_data.description.strip().splitlines()[0]
        elif data.error is not None:
            text = _one_line(data.error)
        else:
            text = "failed"
        lines.append(f"{label}: {text}")
    return lines


def materialize_all(root: Path):
    """Run the merge_all job of the project at `root` in-process (runs persist in its DAGSTER_HOME).
    Returns (result, lineage summary text, leaderboard.md path or None, seconds)."""
    ensure_dagster_home(root)
    from datetime import datetime, timezone

    from dagster import DagsterInstance

    from .definitions import ALL_JOB, build_definitions
    from .stale_runs import fail_dead_runs, run_tags

    defs = build_definitions(root)
    job = defs.resolve_job_def(ALL_JOB)
    t1 = time.perf_counter()
    with DagsterInstance.get() as instance:
        for line in fail_dead_runs(instance, defs.resources["merge_dag"].lineage()):
            print(line, flush=True)
        # every independent branch builds; Dagster skips only what depends on a failed step
        result = job.execute_in_process(instance=instance, raise_on_error=False, tags=run_tags())
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
