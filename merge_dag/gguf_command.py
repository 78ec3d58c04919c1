"""``merge-dag import FILE.gguf OUT_DIR``: a GGUF file into a Hugging Face safetensors folder
(see merge_dag.core.gguf_import), recorded in the lineage database as a source."""

from __future__ import annotations

import argparse
from pathlib import Path

from .settings import settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", type=Path, help="the .gguf file (llama.cpp format)")
    parser.add_argument(
        "out_dir",
        type=Path,
        help="output folder (written atomically; an earlier import of this "
        "command is replaced, any other non-empty folder is refused)",
    )
    parser.add_argument("--dtype", default="float32", help="dtype of the written tensors (default float32)")
    parser.add_argument(
        "--force", action="store_true", help="re-import even if OUT_DIR already holds this GGUF's import"
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="lineage database to record the GGUF source in (default: $MERGE_DAG_DB, else "
        "<data>/lineage.duckdb when it exists; data: $MERGE_DAG_DATA or data/)",
    )
    parser.add_argument("--no-lineage", action="store_true", help="record nothing in a lineage database")


def _db(args: argparse.Namespace) -> Path | None:
    if args.no_lineage:
        return None
    if args.db is not None:
        return args.db
    from .lineage.command import default_db

    db = default_db()  # $MERGE_DAG_DB (used even if it does not exist yet), else <data>/lineage.duckdb if it exists
    return db if settings().db is not None or db.exists() else None


def run(args: argparse.Namespace) -> int:
    from .core.gguf_import import import_gguf, lineage_ops

    res = import_gguf(args.gguf, args.out_dir, dtype=args.dtype, force=args.force)
    what = "already imported" if res.reused else f"imported in {res.seconds:.1f} s"
    print(f"{args.gguf} ({res.architecture}, sha256 {res.sha256[:16]}...): {what} -> {res.out_dir}")
    print(
        f"  {res.tensor_count} tensors, {res.parameters / 1e6:.1f}M parameters; "
        f"model fingerprint {res.model_fingerprint}"
    )
    db = _db(args)
    if db is not None:
        from .lineage.store import Batch, LineageStore

        LineageStore(db).write(Batch.from_records(lineage_ops(res.out_dir, model_fingerprint=res.model_fingerprint)))
        print(f"  lineage: gguf source sha256:{res.sha256[:16]}... -> model/{Path(res.out_dir).name} recorded in {db}")
    return 0
