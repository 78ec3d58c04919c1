"""What is written to the lineage database: a typed batch of records, committed in one transaction.

    batch = Batch().artifact(artifact_id=..., kind="merged", ...).event(artifact_id=..., event="materialized", ...)
    for i in inputs:
        batch.edge(parent_id=i.artifact_id, child_id=..., role=i.role, fingerprint=i.version)
    store.write(batch)

Each method validates its arguments and builds its SQL at once (the time stamps are taken then, before
any lock), so a bad record raises ValueError naming it and nothing of the batch is written. The rows
each method writes, and how a repeated record updates them, are in the method's docstring; the tables
are in schema.sql. Pure: no Dagster.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

from .engine import Stmt

EVENTS = ("materialized", "cache_hit", "observed")
TERMINAL_STATUSES = ("success", "failure", "failed", "canceled", "cancelled")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _as_utc(value: Any) -> Optional[datetime]:
    """None, a datetime (aware ones converted to UTC), a Unix timestamp (Dagster's run stats) or ISO text."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), timezone.utc).replace(tzinfo=None)
    if isinstance(value, str):
        return _as_utc(datetime.fromisoformat(value))
    raise TypeError(f"not a time: {value!r}")


def _json(obj: Any) -> str:
    return json.dumps(obj if obj is not None else {}, default=str, separators=(",", ":"))  # the caller's key order


def _opt_number(v: Any, kind: type) -> Any:
    """A number, or None for what lm-eval reports when it has none ("N/A", None)."""
    try:
        return None if v is None else kind(v)
    except (TypeError, ValueError):
        return None


class Batch:
    """Records for one lineage transaction; every method returns the batch, to chain."""

    def __init__(self, at: Optional[datetime] = None) -> None:
        """`at`: the time every record of the batch is stamped with (default: now, when each is added);
        a spooled batch keeps the time its step recorded it, whenever it is ingested (spool.py)."""
        self.statements: list[Stmt] = []
        self.records: list[tuple[str, dict]] = []  # the same records as plain data (kind, kwargs)
        self.at = _as_utc(at)

    def _now(self) -> datetime:
        return self.at or utcnow()

    def _record(self, kind: str, kwargs: dict) -> None:
        self.records.append((kind, {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in kwargs.items()}))

    def __len__(self) -> int:
        return len(self.statements)

    def __repr__(self) -> str:
        return f"Batch({len(self)} statements)"

    def __add__(self, other: "Batch") -> "Batch":
        """Both batches' records, in order, as a new batch (one transaction when written)."""
        out = Batch(at=self.at)
        out.statements = self.statements + other.statements
        out.records = self.records + other.records
        return out

    def artifact(
        self,
        *,
        artifact_id: str,
        kind: str,
        name: str,
        key_hash: str,
        path: str | os.PathLike | None,
        bytes: int | None,
        code_version: str,
        params: dict,
        run_id: str | None,
        data_version: str | None = None,
    ) -> "Batch":
        """Upsert by artifact_id: the first created_at and run_id are kept, last_seen_at is refreshed,
        a None path / bytes / data_version keeps what is known."""
        for label, v in (("artifact_id", artifact_id), ("kind", kind), ("name", name), ("key_hash", key_hash)):
            if not isinstance(v, str) or not v:
                raise ValueError(f"lineage artifact: {label} must be a non-empty string, got {v!r}")
        now = self._now()
        self._record(
            "artifact",
            dict(
                artifact_id=artifact_id,
                kind=kind,
                name=name,
                key_hash=key_hash,
                path=None if path is None else str(path),
                bytes=bytes,
                code_version=code_version,
                params=json.loads(_json(params)),
                run_id=run_id,
                data_version=data_version,
            ),
        )
        self.statements.append(
            (
                """
        INSERT INTO artifacts (artifact_id, kind, name, key_hash, path, bytes, data_version, created_at, last_seen_at,
                               run_id, code_version, params_json)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (artifact_id) DO UPDATE SET
            kind = excluded.kind, name = excluded.name, key_hash = excluded.key_hash,
            path = coalesce(excluded.path, artifacts.path), bytes = coalesce(excluded.bytes, artifacts.bytes),
            data_version = coalesce(excluded.data_version, artifacts.data_version),
            last_seen_at = excluded.last_seen_at, run_id = coalesce(artifacts.run_id, excluded.run_id),
            code_version = excluded.code_version, params_json = excluded.params_json
        """,
                [
                    artifact_id,
                    kind,
                    name,
                    key_hash,
                    None if path is None else str(path),
                    None if bytes is None else int(bytes),
                    data_version,
                    now,
                    now,
                    run_id,
                    code_version,
                    _json(params),
                ],
            )
        )
        return self

    def edge(self, *, parent_id: str, child_id: str, role: str, fingerprint: str | None) -> "Batch":
        """Upsert by (parent, child, role); a None fingerprint keeps the one known."""
        if not (parent_id and child_id and role):
            raise ValueError(
                f"lineage edge: parent_id, child_id and role are required, got {parent_id!r}, {child_id!r}, {role!r}"
            )
        self._record("edge", dict(parent_id=parent_id, child_id=child_id, role=role, fingerprint=fingerprint))
        self.statements.append(
            (
                """
        INSERT INTO edges (parent_id, child_id, role, fingerprint, created_at) VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (parent_id, child_id, role) DO UPDATE SET
            fingerprint = coalesce(excluded.fingerprint, edges.fingerprint)
        """,
                [parent_id, child_id, role, fingerprint, self._now()],
            )
        )
        return self

    def event(
        self, *, artifact_id: str, run_id: str | None, step: str, event: str, seconds: float | None = None
    ) -> "Batch":
        """One more row: events accumulate (materialized, cache_hit or observed)."""
        if event not in EVENTS:
            raise ValueError(f"lineage event: event must be one of {', '.join(EVENTS)}, got {event!r}")
        self._record("event", dict(artifact_id=artifact_id, run_id=run_id, step=step, event=event, seconds=seconds))
        self.statements.append(
            (
                "INSERT INTO events (artifact_id, run_id, step, event, seconds, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
                [artifact_id, run_id, step, event, None if seconds is None else float(seconds), self._now()],
            )
        )
        return self

    def metric(
        self,
        *,
        artifact_id: str,
        task: str,
        metric: str,
        value: float,
        stderr: float | None,
        n: int | None,
        model: str | None = None,
    ) -> "Batch":
        """Upsert by (artifact, task, metric); a stderr or n lm-eval reports as "N/A" is stored as NULL."""
        if not (artifact_id and task and metric) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"lineage metric: artifact_id, task, metric and a numeric value are required, got "
                f"{artifact_id!r}, {task!r}, {metric!r}, {value!r}"
            )
        self._record(
            "metric",
            dict(artifact_id=artifact_id, task=task, metric=metric, value=value, stderr=stderr, n=n, model=model),
        )
        self.statements.append(
            (
                """
        INSERT INTO metrics (artifact_id, model, task, metric, value, stderr, n, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (artifact_id, task, metric) DO UPDATE SET
            model = coalesce(excluded.model, metrics.model), value = excluded.value,
            stderr = excluded.stderr, n = excluded.n
        """,
                [
                    artifact_id,
                    model,
                    task,
                    metric,
                    float(value),
                    _opt_number(stderr, float),
                    _opt_number(n, int),
                    self._now(),
                ],
            )
        )
        return self

    def run(self, *, run_id: str, started_at=None, finished_at=None, status: str, job: str | None = None) -> "Batch":
        """Upsert; a None keeps what is there (a new run without started_at starts now). A run that
        reached a terminal status is not set back to 'running' by a late step. Times: a datetime (aware
        ones converted to UTC), a Unix timestamp or ISO text."""
        if not run_id or not status:
            raise ValueError("lineage run: run_id and status are required")
        now = self._now()
        start, finish = _as_utc(started_at), _as_utc(finished_at)
        self._record("run", dict(run_id=run_id, started_at=start, finished_at=finish, status=status, job=job))
        terminal = ", ".join(f"'{t}'" for t in TERMINAL_STATUSES)
        self.statements.append(
            (
                f"""
        INSERT INTO runs (run_id, job, started_at, finished_at, status, updated_at) VALUES (?, ?, ?, ?, ?, ?)
        ON CONFLICT (run_id) DO UPDATE SET
            job = coalesce(excluded.job, runs.job),
            started_at = coalesce(?::TIMESTAMP, runs.started_at),
            finished_at = coalesce(excluded.finished_at, runs.finished_at),
            status = CASE WHEN excluded.status = 'running' AND runs.status IN ({terminal}) THEN runs.status
                          ELSE excluded.status END,
            updated_at = excluded.updated_at
        """,
                [run_id, job, start or now, finish, status, now, start],
            )
        )
        return self

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, dict]], at: Optional[datetime | str] = None) -> "Batch":
        """A batch from records as plain data, [(kind, keyword arguments)] with kind one of artifact,
        edge, event, metric, run: the form the pure core returns (core.gguf_import.lineage_ops), since
        it cannot import this package, and a spooled batch (spool.py, `at` its time). The legacy names
        record_artifact, ... are accepted too."""
        batch = cls(at=_as_utc(at))
        for record in records:
            try:
                kind, kwargs = record
            except (TypeError, ValueError):
                raise ValueError(f"lineage batch: each record is (kind, kwargs), got {record!r}") from None
            kind = kind.removeprefix("record_") if isinstance(kind, str) else kind
            if kind not in RECORD_KINDS:
                raise ValueError(f"lineage batch: unknown record {record[0]!r} (one of {', '.join(RECORD_KINDS)})")
            try:
                getattr(batch, kind)(**kwargs)
            except TypeError as e:
                raise ValueError(f"lineage {kind}: {e}") from None
        return batch


RECORD_KINDS = ("artifact", "edge", "event", "metric", "run")
