"""The lineage database: one DuckDB file holding every artifact, the edges between them, each
materialization / cache hit / observation, metrics and runs. Every table is in schema.sql. Pure: no Dagster.

    store = LineageStore("data/lineage.duckdb")
    store.write(Batch().artifact(...).edge(...).event(...))   # one transaction (batch.py)
    store.find("ties"); store.events(run_id); store.provenance(artifact_id)

Four modules, one layer each: engine.py (the file, its locks and transactions: many processes share
it, see there), batch.py (the records written, as a typed builder), this one (the reads, by what a
user or a Dagster step asks for) and provenance.py (an artifact's tree back to its sources).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import MergeDagError
from .batch import EVENTS, Batch
from .engine import DEFAULT_LOCK_TIMEOUT, LineageCorrupt, LineageDB, LineageLockTimeout, artifact_row, rows
from .provenance import SOURCE_KINDS, provenance

__all__ = [
    "LineageStore",
    "Batch",
    "RunSummary",
    "LineageLockTimeout",
    "LineageCorrupt",
    "EVENTS",
    "SOURCE_KINDS",
    "DEFAULT_LOCK_TIMEOUT",
]


class RunSummary(dict):
    """run_summary()'s dict; str() is one readable line."""

    def __str__(self) -> str:
        def per_kind(d: dict) -> str:
            return ", ".join(f"{k} {n}" for k, n in sorted(d.items()))

        parts = [
            f"{self['recomputed']} materialized"
            + (f" ({per_kind(self['materialized'])})" if self["materialized"] else ""),
            f"{self['cache_hits']} cache hits" + (f" ({per_kind(self['cache_hit'])})" if self["cache_hit"] else ""),
        ]
        if self["observed_total"]:
            parts.append(f"{self['observed_total']} sources observed")
        return ", ".join(parts)


class LineageStore(LineageDB):
    """The lineage database at `path` (created with its parent folder on the first write)."""

    # -- writes ----------------------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        """Every record of the batch in one transaction (nothing when it is empty)."""
        if batch.statements:
            self.transaction(batch.statements)

    def record_run(
        self, *, run_id: str, started_at=None, finished_at=None, status: str, job: str | None = None
    ) -> None:
        """One run's status on its own (a sensor, the demo, a stale run): Batch.run in a transaction."""
        self.write(Batch().run(run_id=run_id, started_at=started_at, finished_at=finished_at, status=status, job=job))

    # -- reads -----------------------------------------------------------------------------------

    def artifact(self, artifact_id: str) -> dict | None:
        rows = self.query("SELECT * FROM artifacts WHERE artifact_id = ?", [artifact_id])
        return artifact_row(rows[0]) if rows else None

    def artifacts(self, kind: str | None = None) -> list[dict]:
        sql = (
            "SELECT * FROM artifacts"
            + (" WHERE kind = ?" if kind else "")
            + " ORDER BY last_seen_at DESC, created_at DESC"
        )
        return [artifact_row(r) for r in self.query(sql, [kind] if kind else [])]

    def names(self, kind: str = "merged") -> list[str]:
        """Distinct names of one kind, most recently seen first."""
        rows = self.query(
            "SELECT name, max(last_seen_at) AS t FROM artifacts WHERE kind = ? GROUP BY name ORDER BY t DESC", [kind]
        )
        return [r["name"] for r in rows]

    def find(self, path_or_name: str | os.PathLike) -> dict | None:
        """The artifact a user means: an artifact id; a path on disk (the artifact's folder or a file in it,
        symlinks and relative paths resolved; a copied merged folder through its merge_dag.json); a name,
        or kind/name (merged first, then the most recently seen); or a unique prefix of an artifact id or
        content key. None when nothing matches; MergeDagError when a prefix is ambiguous."""
        text = str(path_or_name).strip()
        if not text:
            return None
        hit = self.artifact(text)
        if hit is not None:
            return hit
        hit = self._find_by_path(text)
        if hit is not None:
            return hit
        hit = self._find_by_name(text)
        if hit is not None:
            return hit
        return self._find_by_prefix(text)

    def _find_by_path(self, text: str) -> dict | None:
        p = Path(text).expanduser()
        if not p.exists():
            return None
        real = p.resolve()
        card = (real if real.is_dir() else real.parent) / "merge_dag.json"
        if card.is_file():
            try:
                aid = json.loads(card.read_text()).get("artifact_id")
            except (OSError, ValueError, AttributeError):
                aid = None
            if isinstance(aid, str) and (hit := self.artifact(aid)) is not None:
                return hit
        wanted = [real, *real.parents]
        by_path: dict[Path, dict] = {}
        for row in self.query("SELECT * FROM artifacts WHERE path IS NOT NULL ORDER BY last_seen_at ASC"):
            try:
                by_path[Path(row["path"]).resolve()] = row  # latest wins on a shared path
            except (OSError, RuntimeError):
                continue
        for candidate in wanted:  # the folder itself first, then the folder a file lies in
            if candidate in by_path:
                return artifact_row(by_path[candidate])
        return None

    def _find_by_name(self, text: str) -> dict | None:
        order = "ORDER BY (kind = 'merged') DESC, last_seen_at DESC, created_at DESC LIMIT 1"
        rows = self.query(f"SELECT * FROM artifacts WHERE name = ? {order}", [text])
        if not rows and "/" in text:
            kind, _, name = text.partition("/")
            rows = self.query(f"SELECT * FROM artifacts WHERE kind = ? AND name = ? {order}", [kind, name])
        return artifact_row(rows[0]) if rows else None

    def _find_by_prefix(self, text: str) -> dict | None:
        if len(text) < 4:
            return None
        rows = self.query(
            """SELECT * FROM artifacts
                             WHERE starts_with(artifact_id, ?) OR starts_with(key_hash, ?) OR starts_with(key_hash, ?)
                             ORDER BY last_seen_at DESC""",
            [text, text, "sha256:" + text],
        )
        if len(rows) > 1:
            ids = ", ".join(r["artifact_id"] for r in rows[:8]) + (" ..." if len(rows) > 8 else "")
            raise MergeDagError(
                f"{text!r} is the prefix of {len(rows)} artifacts in {self.path}: {ids}; give more of it"
            )
        return artifact_row(rows[0]) if rows else None

    def events(self, run_id: str | None = None, kind: str | None = None) -> list[dict]:
        """Events in the order they were recorded, with the artifact's kind and name."""
        where, params = [], []
        if run_id is not None:
            where.append("e.run_id = ?")
            params.append(run_id)
        if kind is not None:
            where.append("a.kind = ?")
            params.append(kind)
        sql = (
            "SELECT e.*, a.kind, a.name FROM events e LEFT JOIN artifacts a ON a.artifact_id = e.artifact_id"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY e.id"
        )
        return self.query(sql, params)

    def metrics(self, artifact_id: str | None = None) -> list[dict]:
        """Metrics recorded on an artifact (all when None), with its kind and name."""
        sql = (
            "SELECT m.*, a.kind, a.name FROM metrics m LEFT JOIN artifacts a ON a.artifact_id = m.artifact_id"
            + (" WHERE m.artifact_id = ?" if artifact_id else "")
            + " ORDER BY m.artifact_id, m.task, m.metric"
        )
        return self.query(sql, [artifact_id] if artifact_id else [])

    def runs(self) -> list[dict]:
        """Every run with its recomputed / cache_hits / observed counts (view run_stats), newest first."""
        return self.query("SELECT * FROM run_stats ORDER BY started_at DESC NULLS LAST")

    def run_summary(self, run_id: str) -> RunSummary:
        """{'run_id', 'status', 'job', 'started_at', 'finished_at', 'materialized': {kind: n}, 'cache_hit': {kind: n},
        'observed': {kind: n}, 'recomputed': total, 'cache_hits': total, 'observed_total': total}"""

        def fn(con):
            counts = con.execute(
                """SELECT coalesce(a.kind, '?') AS kind, e.event, count(*) AS n FROM events e
                                    LEFT JOIN artifacts a ON a.artifact_id = e.artifact_id
                                    WHERE e.run_id = ? GROUP BY ALL""",
                [run_id],
            ).fetchall()
            run = rows(con.execute("SELECT * FROM run_stats WHERE run_id = ?", [run_id]))
            return counts, run[0] if run else {}

        counts, run = self.read(fn, ([], {}))
        out = RunSummary(
            run_id=run_id,
            status=run.get("status", "unknown"),
            job=run.get("job"),
            started_at=run.get("started_at"),
            finished_at=run.get("finished_at"),
            materialized={},
            cache_hit={},
            observed={},
        )
        for kind, event, n in counts:
            out.setdefault(event, {})[kind] = n
        out["recomputed"] = sum(out["materialized"].values())
        out["cache_hits"] = sum(out["cache_hit"].values())
        out["observed_total"] = sum(out["observed"].values())
        return out

    def provenance(self, artifact_id: str) -> dict:
        """See provenance.provenance: the artifact's tree back to the sources, with eval metrics."""
        return provenance(self, artifact_id)
