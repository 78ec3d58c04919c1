"""`merge-dag card PATH_OR_NAME [--db PATH] [--print]`: rewrite a merged model's card for the Hub.

The card a merge writes (README.md, merge_dag.json) already carries the Hugging Face front matter
(merge_dag.core.card.front_matter). Evaluations run after the merge (eval/merged/<recipe> in the
Dagster layer) are recorded in lineage, not in the folder; this step reads them (the latest result
per task and metric of the evals run on the merged artifact) and rewrites the two card files, with
`model-index` in the front matter and an evaluation table. Nothing else in the folder changes, so
the artifact's content fingerprint (tensors + config.json) is the same before and after.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

from ..core.errors import MergeDagError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="PATH_OR_NAME",
        help="a merged folder, a name such as 'ties' or 'merged/ties', or an artifact id (as for audit)",
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="lineage database (default: $MERGE_DAG_DB, else <data>/lineage.duckdb)",
    )
    parser.add_argument(
        "--print", dest="print_only", action="store_true", help="print the new README.md; write nothing"
    )


def card_with_lineage(db: str | os.PathLike, target: str | os.PathLike) -> tuple[Path, dict]:
    """(folder, card): the merged folder `target` names and its merge_dag.json card with
    `eval_results` from lineage (the metrics of the evals run on it; none recorded: unchanged)."""
    from ..core.card import with_eval_results
    from .audit import resolve
    from .store import LineageStore

    store = LineageStore(db)
    row, found = resolve(store, target) if Path(db).exists() else (None, _read(target))
    if found is None and row is not None and row.get("path"):
        found = _read(row["path"])
    if found is None:
        raise MergeDagError(
            f"{target}: no merged folder with a merge_dag.json found"
            + ("" if row is None else f" (lineage records {row['artifact_id']} at {row.get('path')})")
        )
    folder, card = found
    if "inputs" not in card or "method" not in card:
        raise MergeDagError(f"{folder / 'merge_dag.json'}: not a merge_dag card (no method or inputs)")
    metrics = store.provenance(row["artifact_id"]).get("metrics", []) if row is not None else []
    return folder, (with_eval_results(card, metrics) if metrics else card)


def _read(path) -> Optional[tuple[Path, dict]]:
    from .audit import read_card

    return read_card(path)


def write_card_files(folder: Path, card: dict) -> None:
    """Replace merge_dag.json and README.md in `folder`, each atomically (temporary file + rename)."""
    from ..core.card import card_files

    for name, text in card_files(card).items():
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, folder / name)


def run(args: argparse.Namespace) -> int:
    from .command import default_db

    folder, card = card_with_lineage(args.db or default_db(), args.target)
    if args.print_only:
        from ..core.card import model_card

        print(model_card(card), end="")
        return 0
    write_card_files(folder, card)
    n = len(card.get("eval_results") or [])
    print(
        f"{folder / 'README.md'}: card rewritten with "
        + (f"model-index ({n} metric(s) from lineage)" if n else "no evaluation recorded in lineage")
    )
    return 0
