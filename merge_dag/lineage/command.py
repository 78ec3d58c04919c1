"""`merge-dag audit PATH_OR_NAME [--db PATH] [--json]`: the provenance of a merged model (or any artifact)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..settings import settings


def default_db() -> Path:
    """$MERGE_DAG_DB, else lineage.duckdb in the data folder ($MERGE_DAG_DATA, else data/) of the
    current directory."""
    s = settings()
    return s.db_path(s.data_dir(Path.cwd()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="PATH_OR_NAME",
        nargs="?",
        help="a merged folder (or any artifact's path), a name such as 'ties' or 'merged/ties', "
        "an artifact id, or a unique prefix of one",
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="lineage database (default: $MERGE_DAG_DB, else <data>/lineage.duckdb: $MERGE_DAG_DATA "
        "or data/ under the current directory)",
    )
    parser.add_argument("--json", action="store_true", help="print the provenance tree as JSON")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="if the lineage database cannot be opened, move it aside to <file>.corrupt-<time> "
        "(kept, never deleted) so the next run starts a fresh one",
    )


def run(args: argparse.Namespace) -> int:
    from ..core.errors import MergeDagError
    from .audit import audit, resolve
    from .store import LineageStore

    store = LineageStore(args.db or default_db())
    if getattr(args, "repair", False):
        moved = store.repair()
        if moved is None:
            print(f"{store.path}: opens fine (or does not exist); nothing to repair")
        else:
            print(f"{store.path}: could not be opened; moved aside to {moved} (the next run creates a fresh database)")
        return 0
    if args.target is None:
        raise MergeDagError("audit: name a merged folder, a name or an artifact id (or pass --repair)")
    if not getattr(args, "json", False):
        print(audit(store, args.target), end="")
        return 0
    row, found = resolve(store, args.target)
    if row is not None:
        obj = store.provenance(row["artifact_id"])
    elif found is not None:
        obj = {"recorded": False, "folder": str(found[0]), "merge_dag.json": found[1]}
    else:
        audit(store, args.target)  # raises the MergeDagError that explains what is known
        return 2
    print(json.dumps(obj, indent=2, default=str))
    return 0
