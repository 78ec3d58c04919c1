"""`merge-dag dev`: `dagster dev -w workspace.yaml` with DAGSTER_HOME under the project, so the UI,
the daemon, the checkpoint sensor and the nightly schedule come up with one command and runs persist."""

import argparse
import os
import sys
from pathlib import Path

from .home import ensure_dagster_home


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path.cwd(), help="project root holding workspace.yaml")
    p.add_argument("--port", default="3000")
    p.add_argument("--host", default="127.0.0.1")


def run(args: argparse.Namespace) -> int:
    root = args.root.absolute()
    home = ensure_dagster_home(root)
    os.environ.setdefault("MERGE_DAG_ROOT", str(root))
    _fail_dead_runs(root)
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [str(dagster), "dev", "-w", str(root / "workspace.yaml"), "-h", args.host, "-p", args.port]
    print(f"DAGSTER_HOME={home}\n{' '.join(cmd)}", flush=True)
    os.chdir(root)
    os.execv(cmd[0], cmd)


def _fail_dead_runs(root: Path) -> None:
    """Runs of this instance left STARTED by a killed process are marked failed (see stale_runs)."""
    from dagster import DagsterInstance

    from ..lineage.store import LineageStore
    from .stale_runs import fail_dead_runs

    db = Path(os.environ.get("MERGE_DAG_DB") or root / "data" / "lineage.duckdb")
    try:
        with DagsterInstance.get() as instance:
            for line in fail_dead_runs(instance, LineageStore(db) if db.exists() else None):
                print(line, flush=True)
    except Exception as e:  # noqa: BLE001 - never keep the UI from starting; say what was not checked
        print(f"merge_dag: runs left STARTED by a killed process were not checked: {type(e).__name__}: {e}",
              flush=True)
