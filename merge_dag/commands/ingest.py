"""`merge-dag ingest [--root R] [--db PATH]`: write the lineage records Celery workers spooled
(<artifacts>/_lineage_spool) into the lineage database, each file exactly once (lineage/spool.py).
The run's coordinator and the lineage sensors do this by themselves; this is for a coordinator that
died. Prints one line: files ingested now, files already in the database, unreadable files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root", type=Path, default=None, help="project root (default: $MERGE_DAG_ROOT, else the current folder)"
    )
    p.add_argument(
        "--db", type=Path, default=None, help="lineage database (default: $MERGE_DAG_DB, else <data>/lineage.duckdb)"
    )


def run(args: argparse.Namespace) -> int:
    from ..dagster.resources import resource_from_env
    from ..lineage.spool import ingest
    from ..lineage.store import LineageStore
    from ..settings import settings

    res = resource_from_env(settings().project_root(args.root))
    result = ingest(LineageStore(args.db or res.database()), res.spool_dir())
    for line in result.errors:
        print(f"warning: {line}", file=sys.stderr)
    print(result)
    return 0
