"""Lineage without a shared writer: steps on other machines spool their records as files, and one
writer ingests them into the DuckDB file. Pure: no Dagster.

A Celery worker (`merge-dag worker`) never opens the lineage database for writing: each batch a step
would have written (its artifact, input edges, event, metrics) becomes one JSON file in the spool
folder, <artifacts>/_lineage_spool/ by default, on the same shared file system as the artifacts:

    <spool>/<UTC time>-<pid>-<sequence>-<uuid>.json   {"id", "recorded_at", "records": [[kind, kwargs], ...]}

written to a hidden temporary name and renamed, so a reader never sees half a file. `ingest()` (the
run's coordinator when the run ends, the lineage sensors, `merge-dag lineage-ingest`) replays each
file not yet ingested as one transaction that also inserts its id into `spool_ingested`: a file is
ingested exactly once, however often or by how many writers ingest runs (the primary key makes a
second insert fail and roll its whole transaction back). A file that cannot be read is reported in
one line and skipped; the others are ingested.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from .batch import Batch, utcnow
from .store import LineageStore

SPOOL_FOLDER = "_lineage_spool"
_seq = itertools.count()  # orders one process's files written within the same microsecond


class LineageSpool:
    """The spool folder: `put` a batch as one file, list them, read one back."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def put(self, batch: Batch) -> Path | None:
        """Write the batch's records as one file (atomically: temporary name, fsync, rename); None
        when the batch is empty."""
        if not batch.records:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        at = batch.at or utcnow()
        sid = uuid.uuid4().hex
        name = f"{at.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}-{next(_seq):06d}-{sid[:12]}.json"
        body = json.dumps({"id": sid, "recorded_at": at.isoformat(), "records": batch.records}, default=str)
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.folder / name)
        return self.folder / name

    def files(self) -> list[Path]:
        """Every spooled file, oldest first (names start with their UTC time)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("*.json") if not p.name.startswith("."))

    @staticmethod
    def read(path: Path) -> tuple[str, Batch]:
        """(id, batch) of one spooled file; ValueError naming the file when it is not one."""
        try:
            data = json.loads(path.read_text())
            sid, at, records = data["id"], data["recorded_at"], data["records"]
            if not isinstance(sid, str) or not sid or not isinstance(records, list):
                raise ValueError("id or records missing")
            return sid, Batch.from_records([tuple(r) for r in records], at=at)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"lineage spool file {path}: {e}") from None


class SpoolingLineageStore(LineageStore):
    """The lineage store of a worker: reads the database (read-only, when it is reachable), writes
    every batch to the spool instead."""

    def __init__(self, path: str | os.PathLike, spool: str | os.PathLike, **kwargs):
        super().__init__(path, **kwargs)
        self.spool = LineageSpool(spool)

    def write(self, batch: Batch) -> None:
        self.spool.put(batch)


@dataclass
class IngestResult:
    ingested: int = 0  # files written into the database by this call
    already: int = 0  # files an earlier ingest (or another writer) had written
    errors: list[str] = field(default_factory=list)  # one line per unreadable file

    def __str__(self) -> str:
        text = f"{self.ingested} spooled lineage file(s) ingested, {self.already} already in the database"
        return text + (f", {len(self.errors)} unreadable" if self.errors else "")


def ingest(store: LineageStore, spool: str | os.PathLike) -> IngestResult:
    """Write every spooled file not yet in `store` into it, each in one transaction with its id in
    spool_ingested (idempotent: a second ingest, or two at once, write nothing twice)."""
    out = IngestResult()
    files = LineageSpool(spool).files()
    if not files:
        return out
    store.ensure_schema()
    ledger_rows = store.query("SELECT spool_id, file FROM spool_ingested")
    done = {r["spool_id"] for r in ledger_rows}
    done_files = {r["file"] for r in ledger_rows}
    for path in files:
        if path.name in done_files:  # not even read again
            out.already += 1
            continue
        try:
            sid, batch = LineageSpool.read(path)
        except ValueError as e:
            out.errors.append(str(e))
            continue
        if sid in done:
            out.already += 1
            continue
        ledger = (
            "INSERT INTO spool_ingested (spool_id, file, ingested_at) VALUES (?, ?, ?)",
            [sid, path.name, datetime.now(timezone.utc).replace(tzinfo=None)],
        )
        try:
            store.transaction([ledger, *batch.statements])
        except duckdb.ConstraintException:  # another writer ingested it between our read and now
            out.already += 1
            continue
        done.add(sid)
        out.ingested += 1
    return out
