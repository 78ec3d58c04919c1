"""The lineage database: one DuckDB file holding every artifact, the edges between them, each
materialization / cache hit / observation, metrics and runs. Every table is in schema.sql. Pure: no Dagster.

DuckDB lets one process at a time hold a file open for writing, and while it does, a second process
cannot even open it read-only. Dagster's multiprocess executor runs steps in separate processes, so
each call here is one short transaction on the file, held only for that transaction:

1. flock(<file>.lock), exclusive to write, shared to read: merge_dag processes queue in the kernel
   and the next one wakes as soon as the holder is done (fair, no polling);
2. ATTACH the file to this process's in-memory DuckDB engine, retried with jittered exponential
   back-off while something else (a duckdb shell, a notebook, a system without flock) holds
   DuckDB's own lock;
3. BEGIN ... COMMIT (the commit checkpoints straight into the file), then DETACH, which lets go.

Both waits together give up after `lock_timeout` seconds (60 by default) with LineageLockTimeout,
naming the file (and DuckDB's message, which names the holder's PID). Reading a database that does
not exist yet returns nothing and creates nothing; the first write creates the folder and the schema.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import duckdb

from ..core.errors import MergeDagError

try:
    import fcntl
except ImportError:  # Windows: DuckDB's lock and retries only
    fcntl = None  # type: ignore[assignment]

SCHEMA_FILE = Path(__file__).with_name("schema.sql")
EVENTS = ("materialized", "cache_hit", "observed")
SOURCE_KINDS = ("model", "calibration", "recipe", "tasks", "adapter", "gguf")
TERMINAL_STATUSES = ("success", "failure", "failed", "canceled", "cancelled")
DEFAULT_LOCK_TIMEOUT = 60.0
MAX_TREE_DEPTH = 64

_schema_ready: set[str] = set()  # files this process has already brought up to schema.sql
T = TypeVar("T")

# One in-memory DuckDB engine per process; lineage files are attached to it one operation at a time.
_ALIAS = "merge_dag_lineage"
_ENGINE_LOCK = threading.RLock()
_engines: dict[int, duckdb.DuckDBPyConnection] = {}  # pid -> engine (one inherited through fork is never touched)


def _engine() -> duckdb.DuckDBPyConnection:
    con = _engines.get(os.getpid())
    if con is None:
        con = duckdb.connect(":memory:", config={"threads": 1})  # tiny statements; other processes share the CPU
        # Commit = checkpoint straight into the file, no WAL: the file is detached right after each
        # transaction anyway (detach checkpoints), and writing a WAL first only adds an fsync.
        con.execute("SET checkpoint_threshold = '0b'")
        con.execute("SET auto_checkpoint_skip_wal_threshold = 0")
        _engines[os.getpid()] = con
    return con


def _detach(con: duckdb.DuckDBPyConnection) -> None:
    """Detach the lineage file (checkpoint + release the lock); on any trouble drop the whole engine."""
    try:
        con.execute("USE memory")
        con.execute(f"DETACH DATABASE IF EXISTS {_ALIAS}")
    except Exception:  # noqa: BLE001 - closing the engine releases the file in every case
        _engines.pop(os.getpid(), None)
        try:
            con.close()
        except Exception:  # noqa: BLE001
            pass


def _flock(path: Path, *, exclusive: bool, timeout: float, stats: dict) -> Optional[int]:
    """A file descriptor holding flock(path) (exclusive or shared), or None where flock is unavailable
    (no fcntl, a read-only folder): then DuckDB's own lock, with retries, is all there is. The wait
    blocks in the kernel in a helper thread, so the holder's release wakes the next one at once."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        stats["queued"] += 1
    except OSError:  # a file system without flock
        os.close(fd)
        return None
    state = {"done": False, "cancelled": False, "error": None}
    cond = threading.Condition()

    def wait() -> None:
        error = None
        try:
            fcntl.flock(fd, op)
        except OSError as e:
            error = e
        with cond:
            state.update(done=True, error=error)
            if state["cancelled"]:
                os.close(fd)  # the caller gave up: let go at once
            cond.notify_all()

    threading.Thread(target=wait, name="merge_dag-lineage-flock", daemon=True).start()
    with cond:
        if not cond.wait_for(lambda: state["done"], timeout):
            state["cancelled"] = True
            raise TimeoutError(str(path))
    if state["error"] is not None:
        os.close(fd)
        return None
    return fd


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _transaction(con: duckdb.DuckDBPyConnection, statements: list["Stmt"]) -> None:
    con.execute("BEGIN TRANSACTION")
    try:
        for sql, params in statements:
            con.execute(sql, params) if params else con.execute(sql)
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the original error matters
            pass
        raise


class LineageLockTimeout(MergeDagError):
    """Another process held the lineage database for longer than the lock timeout."""


class LineageCorrupt(MergeDagError):
    """The lineage database file exists but DuckDB cannot open it (damaged, truncated, not DuckDB)."""


def corrupt_message(path: Path, e: BaseException) -> str:
    cause = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (f"lineage database {path} cannot be opened ({cause}); nothing was changed. To start a fresh one, "
            f"run `merge-dag audit --repair --db {path}`: it moves the damaged file aside to "
            f"{path.name}.corrupt-<time> (kept, never deleted) and the next run creates a new database")


_CORRUPTION_SIGNS = ("not a valid DuckDB database", "Corrupt database", "Could not read enough bytes",
                     "checksum", "Serialization Error")


def _is_corruption(e: BaseException) -> bool:
    return isinstance(e, (duckdb.SerializationException, duckdb.InternalException)) or (
        isinstance(e, duckdb.Error) and any(sign in str(e) for sign in _CORRUPTION_SIGNS))


def _is_lock_error(e: BaseException) -> bool:
    msg = str(e)
    return "Could not set lock" in msg or "Conflicting lock" in msg


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


def _rows(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _artifact_row(row: Optional[dict]) -> Optional[dict]:
    if row is None:
        return None
    row = dict(row)
    try:
        row["params"] = json.loads(row.pop("params_json") or "{}")
    except json.JSONDecodeError:
        row["params"] = {}
    return row


class RunSummary(dict):
    """run_summary()'s dict; str() is one readable line."""

    def __str__(self) -> str:
        def per_kind(d: dict) -> str:
            return ", ".join(f"{k} {n}" for k, n in sorted(d.items()))

        parts = [f"{self['recomputed']} materialized" + (f" ({per_kind(self['materialized'])})" if self["materialized"] else ""),
                 f"{self['cache_hits']} cache hits" + (f" ({per_kind(self['cache_hit'])})" if self["cache_hit"] else "")]
        if self["observed_total"]:
            parts.append(f"{self['observed_total']} sources observed")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# one statement list per write operation (validated and built before any lock is taken)
# ----------------------------------------------------------------------------------------------

Stmt = tuple[str, list]


def _op_record_artifact(*, artifact_id: str, kind: str, name: str, key_hash: str, path: str | os.PathLike | None,
                        bytes: int | None, code_version: str, params: dict, run_id: str | None,
                        data_version: str | None = None) -> list[Stmt]:
    for label, v in (("artifact_id", artifact_id), ("kind", kind), ("name", name), ("key_hash", key_hash)):
        if not isinstance(v, str) or not v:
            raise ValueError(f"record_artifact: {label} must be a non-empty string, got {v!r}")
    now = utcnow()
    return [("""
        INSERT INTO artifacts (artifact_id, kind, name, key_hash, path, bytes, data_version, created_at, last_seen_at,
                               run_id, code_version, params_json)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (artifact_id) DO UPDATE SET
            kind = excluded.kind, name = excluded.name, key_hash = excluded.key_hash,
            path = coalesce(excluded.path, artifacts.path), bytes = coalesce(excluded.bytes, artifacts.bytes),
            data_version = coalesce(excluded.data_version, artifacts.data_version),
            last_seen_at = excluded.last_seen_at, run_id = coalesce(artifacts.run_id, excluded.run_id),
            code_version = excluded.code_version, params_json = excluded.params_json
        """, [artifact_id, kind, name, key_hash, None if path is None else str(path),
              None if bytes is None else int(bytes), data_version, now, now, run_id, code_version, _json(params)])]


def _op_record_edge(*, parent_id: str, child_id: str, role: str, fingerprint: str | None) -> list[Stmt]:
    if not (parent_id and child_id and role):
        raise ValueError(f"record_edge: parent_id, child_id and role are required, got {parent_id!r}, {child_id!r}, {role!r}")
    return [("""
        INSERT INTO edges (parent_id, child_id, role, fingerprint, created_at) VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (parent_id, child_id, role) DO UPDATE SET fingerprint = coalesce(excluded.fingerprint, edges.fingerprint)
        """, [parent_id, child_id, role, fingerprint, utcnow()])]


def _op_record_event(*, artifact_id: str, run_id: str | None, step: str, event: str,
                     seconds: float | None = None) -> list[Stmt]:
    if event not in EVENTS:
        raise ValueError(f"record_event: event must be one of {', '.join(EVENTS)}, got {event!r}")
    return [("INSERT INTO events (artifact_id, run_id, step, event, seconds, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
             [artifact_id, run_id, step, event, None if seconds is None else float(seconds), utcnow()])]


def _op_record_metric(*, artifact_id: str, task: str, metric: str, value: float, stderr: float | None, n: int | None,
                      model: str | None = None) -> list[Stmt]:
    if not (artifact_id and task and metric) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"record_metric: artifact_id, task, metric and a numeric value are required, got "
                         f"{artifact_id!r}, {task!r}, {metric!r}, {value!r}")
    return [("""
        INSERT INTO metrics (artifact_id, model, task, metric, value, stderr, n, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (artifact_id, task, metric) DO UPDATE SET
            model = coalesce(excluded.model, metrics.model), value = excluded.value, stderr = excluded.stderr, n = excluded.n
        """, [artifact_id, model, task, metric, float(value), _opt_number(stderr, float), _opt_number(n, int), utcnow()])]


def _opt_number(v: Any, kind: type) -> Any:
    """A number, or None for what lm-eval reports when it has none ("N/A", None)."""
    try:
        return None if v is None else kind(v)
    except (TypeError, ValueError):
        return None


def _op_record_run(*, run_id: str, started_at=None, finished_at=None, status: str, job: str | None = None) -> list[Stmt]:
    """Upsert; a None keeps what is there (a new run without started_at starts now). A run that reached
    a terminal status is not set back to 'running' by a late step."""
    if not run_id or not status:
        raise ValueError("record_run: run_id and status are required")
    now = utcnow()
    start, finish = _as_utc(started_at), _as_utc(finished_at)
    terminal = ", ".join(f"'{t}'" for t in TERMINAL_STATUSES)
    return [(f"""
        INSERT INTO runs (run_id, job, started_at, finished_at, status, updated_at) VALUES (?, ?, ?, ?, ?, ?)
        ON CONFLICT (run_id) DO UPDATE SET
            job = coalesce(excluded.job, runs.job),
            started_at = coalesce(?::TIMESTAMP, runs.started_at),
            finished_at = coalesce(excluded.finished_at, runs.finished_at),
            status = CASE WHEN excluded.status = 'running' AND runs.status IN ({terminal}) THEN runs.status
                          ELSE excluded.status END,
            updated_at = excluded.updated_at
        """, [run_id, job, start or now, finish, status, now, start])]


_OPS: dict[str, Callable[..., list[Stmt]]] = {
    "record_artifact": _op_record_artifact,
    "record_edge": _op_record_edge,
    "record_event": _op_record_event,
    "record_metric": _op_record_metric,
    "record_run": _op_record_run,
}


class LineageStore:
    """The lineage database at `path` (created with its parent folder on the first write)."""

    def __init__(self, path: str | os.PathLike, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.path = Path(path).expanduser().absolute()
        self.lock_timeout = float(lock_timeout)
        # lock waiting, for measurements: connections opened, retries, total and longest wait (s)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        # lock waiting, for measurements: operations run, how many queued behind another merge_dag process
        # (flock), DuckDB lock retries (a foreign holder), total and longest wait before each operation (s)
        self.stats = {"operations": 0, "queued": 0, "retries": 0, "waited_s": 0.0, "max_wait_s": 0.0}

    def __repr__(self) -> str:
        return f"LineageStore({str(self.path)!r})"

    # -- connections -----------------------------------------------------------------------------

    @contextmanager
    def _attached(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection whose default database is this file, attached for the duration of the block.

        First a flock on <file>.lock (shared to read, exclusive to write): merge_dag processes queue in
        the kernel and wake the moment the holder is done, instead of polling. Then the file is
        ATTACHed to this process's in-memory DuckDB engine, retried with jittered exponential back-off
        while a process outside merge_dag (a duckdb shell, a notebook) holds DuckDB's own lock, and
        DETACHed at the end, which releases the file. (A fresh duckdb.connect(file) per operation
        costs ~40 ms of engine start-up with DuckDB 2.0; an attach/detach costs ~3 ms.)"""
        with _ENGINE_LOCK:
            t0 = time.monotonic()
            deadline = t0 + self.lock_timeout
            try:
                lock_fd = _flock(self.lock_path, exclusive=not read_only, timeout=self.lock_timeout, stats=self.stats)
            except TimeoutError:
                raise LineageLockTimeout(
                    f"lineage database {self.path}: another merge_dag process held {self.lock_path.name} for "
                    f"{self.lock_timeout:.0f} s; is a run stuck?") from None
            try:
                shared = self._attach(read_only, t0, deadline)
                waited = time.monotonic() - t0
                self.stats["operations"] += 1
                self.stats["waited_s"] += waited
                self.stats["max_wait_s"] = max(self.stats["max_wait_s"], waited)
                if shared is not None:
                    try:
                        yield shared
                    finally:
                        shared.close()
                    return
                con = _engine()
                try:
                    con.execute(f"USE {_ALIAS}")
                    yield con
                except duckdb.Error as e:
                    if _is_corruption(e):  # damage found past the file header, while reading
                        raise LineageCorrupt(corrupt_message(self.path, e)) from None
                    raise
                finally:
                    _detach(con)
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)  # releases the flock, after the file is detached

    def _attach(self, read_only: bool, t0: float, deadline: float) -> Optional[duckdb.DuckDBPyConnection]:
        """Attach the file to the engine (None), or a connection to this process's own open instance of it."""
        delay = 0.002
        while True:
            try:
                _engine().execute(f"ATTACH {_sql_str(str(self.path))} AS {_ALIAS}" + (" (READ_ONLY)" if read_only else ""))
                return None
            except duckdb.IOException as e:
                if not _is_lock_error(e):
                    if _is_corruption(e):
                        raise LineageCorrupt(corrupt_message(self.path, e)) from None
                    raise
                now = time.monotonic()
                if now >= deadline:
                    raise LineageLockTimeout(
                        f"lineage database {self.path} stayed locked by another process for {now - t0:.0f} s "
                        f"({e}); close that process (a duckdb shell, a notebook?) or point MERGE_DAG_DB "
                        f"elsewhere") from None
                self.stats["retries"] += 1
                time.sleep(min(delay * random.uniform(0.5, 1.5), max(deadline - now, 0.0)))
                delay = min(delay * 1.6, 0.05)
            except duckdb.ResourceInUseException:
                # another duckdb connection of this very process has the file open: share its instance
                try:
                    return duckdb.connect(str(self.path), read_only=read_only)
                except duckdb.ConnectionException:
                    if not read_only:
                        raise MergeDagError(f"lineage database {self.path} is open read-only elsewhere in this "
                                            f"process; close that connection to record lineage") from None
                    return duckdb.connect(str(self.path))
            except duckdb.Error as e:
                if _is_corruption(e):
                    raise LineageCorrupt(corrupt_message(self.path, e)) from None
                raise

    def repair(self) -> Optional[Path]:
        """If the database file cannot be opened, move it aside to `<name>.corrupt-<UTC time>` (its
        WAL too) and return the new path; a healthy or missing file is left alone (None). Nothing is
        ever deleted: the next write creates a fresh, empty database."""
        if not self.path.exists():
            return None
        try:
            with self._attached(read_only=True) as con:  # open it and read every table through
                tables = [r[0] for r in con.execute(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
                for t in tables:
                    con.execute(f'SELECT * FROM "{t}"').fetchall()
                return None
        except LineageCorrupt:
            pass
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        with _ENGINE_LOCK:
            lock_fd = _flock(self.lock_path, exclusive=True, timeout=self.lock_timeout, stats=self.stats)
            try:
                os.rename(self.path, dest)
                wal = self.path.with_name(self.path.name + ".wal")
                if wal.exists():
                    os.rename(wal, dest.with_name(dest.name + ".wal"))
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)
        _schema_ready.discard(str(self.path))
        return dest

    def ensure_schema(self) -> None:
        """Create the folder and every table of schema.sql (idempotent; once per process and file)."""
        key = str(self.path)
        if key in _schema_ready and self.path.exists():
            return
        if not SCHEMA_FILE.is_file():
            raise MergeDagError(f"{SCHEMA_FILE} is missing from the merge_dag installation (package data)")
        sql = SCHEMA_FILE.read_text()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._attached(read_only=False) as con:
            _transaction(con, [(sql, [])])
        _schema_ready.add(key)

    def _write(self, statements: list[Stmt]) -> None:
        self.ensure_schema()
        try:
            with self._attached(read_only=False) as con:
                _transaction(con, statements)
        except duckdb.CatalogException:
            # the file was replaced under us (deleted, or an old schema): bring the schema back once, retry
            _schema_ready.discard(str(self.path))
            self.ensure_schema()
            with self._attached(read_only=False) as con:
                _transaction(con, statements)

    def _read(self, fn: Callable[[duckdb.DuckDBPyConnection], T], default: T) -> T:
        """fn(connection) on the file attached read-only; `default` when there is no database yet."""
        if not self.path.exists():
            return default
        try:
            with self._attached(read_only=True) as con:
                return fn(con)
        except duckdb.CatalogException:
            _schema_ready.discard(str(self.path))
            self.ensure_schema()  # an empty or older file: bring it up to schema.sql, then read again
            with self._attached(read_only=True) as con:
                return fn(con)

    def query(self, sql: str, params: Optional[list] = None) -> list[dict]:
        """Any read-only SQL over the lineage tables, as dicts."""
        return self._read(lambda con: _rows(con.execute(sql, params or [])), [])

    # -- writes ----------------------------------------------------------------------------------

    def record_batch(self, ops: Iterable[tuple[str, dict]]) -> None:
        """Several record_* calls in one transaction: [("record_artifact", {...}), ("record_edge", {...})]."""
        statements: list[Stmt] = []
        for op in ops:
            try:
                name, kwargs = op
            except (TypeError, ValueError):
                raise ValueError(f"record_batch: each op is (name, kwargs), got {op!r}") from None
            if name not in _OPS:
                raise ValueError(f"record_batch: unknown op {name!r} (one of {', '.join(_OPS)})")
            try:
                statements += _OPS[name](**kwargs)
            except TypeError as e:
                raise ValueError(f"record_batch: {name}: {e}") from None
        if statements:
            self._write(statements)

    def record_artifact(self, *, artifact_id: str, kind: str, name: str, key_hash: str, path: str | None,
                        bytes: int | None, code_version: str, params: dict, run_id: str | None,
                        data_version: str | None = None) -> None:
        """Upsert by artifact_id: the first created_at and run_id are kept, last_seen_at is refreshed."""
        self._write(_op_record_artifact(artifact_id=artifact_id, kind=kind, name=name, key_hash=key_hash, path=path,
                                        bytes=bytes, code_version=code_version, params=params, run_id=run_id,
                                        data_version=data_version))

    def record_edge(self, *, parent_id: str, child_id: str, role: str, fingerprint: str | None) -> None:
        self._write(_op_record_edge(parent_id=parent_id, child_id=child_id, role=role, fingerprint=fingerprint))

    def record_event(self, *, artifact_id: str, run_id: str | None, step: str, event: str,
                     seconds: float | None = None) -> None:
        self._write(_op_record_event(artifact_id=artifact_id, run_id=run_id, step=step, event=event, seconds=seconds))

    def record_metric(self, *, artifact_id: str, task: str, metric: str, value: float, stderr: float | None,
                      n: int | None, model: str | None = None) -> None:
        self._write(_op_record_metric(artifact_id=artifact_id, task=task, metric=metric, value=value, stderr=stderr,
                                      n=n, model=model))

    def record_run(self, *, run_id: str, started_at=None, finished_at=None, status: str, job: str | None = None) -> None:
        self._write(_op_record_run(run_id=run_id, started_at=started_at, finished_at=finished_at, status=status, job=job))

    # -- reads -----------------------------------------------------------------------------------

    def artifact(self, artifact_id: str) -> dict | None:
        rows = self.query("SELECT * FROM artifacts WHERE artifact_id = ?", [artifact_id])
        return _artifact_row(rows[0]) if rows else None

    def artifacts(self, kind: str | None = None) -> list[dict]:
        sql = "SELECT * FROM artifacts" + (" WHERE kind = ?" if kind else "") + " ORDER BY last_seen_at DESC, created_at DESC"
        return [_artifact_row(r) for r in self.query(sql, [kind] if kind else [])]

    def names(self, kind: str = "merged") -> list[str]:
        """Distinct names of one kind, most recently seen first."""
        rows = self.query("SELECT name, max(last_seen_at) AS t FROM artifacts WHERE kind = ? GROUP BY name ORDER BY t DESC",
                          [kind])
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
                return _artifact_row(by_path[candidate])
        return None

    def _find_by_name(self, text: str) -> dict | None:
        order = "ORDER BY (kind = 'merged') DESC, last_seen_at DESC, created_at DESC LIMIT 1"
        rows = self.query(f"SELECT * FROM artifacts WHERE name = ? {order}", [text])
        if not rows and "/" in text:
            kind, _, name = text.partition("/")
            rows = self.query(f"SELECT * FROM artifacts WHERE kind = ? AND name = ? {order}", [kind, name])
        return _artifact_row(rows[0]) if rows else None

    def _find_by_prefix(self, text: str) -> dict | None:
        if len(text) < 4:
            return None
        rows = self.query("""SELECT * FROM artifacts
                             WHERE starts_with(artifact_id, ?) OR starts_with(key_hash, ?) OR starts_with(key_hash, ?)
                             ORDER BY last_seen_at DESC""", [text, text, "sha256:" + text])
        if len(rows) > 1:
            ids = ", ".join(r["artifact_id"] for r in rows[:8]) + (" ..." if len(rows) > 8 else "")
            raise MergeDagError(f"{text!r} is the prefix of {len(rows)} artifacts in {self.path}: {ids}; give more of it")
        return _artifact_row(rows[0]) if rows else None

    def events(self, run_id: str | None = None, kind: str | None = None) -> list[dict]:
        """Events in the order they were recorded, with the artifact's kind and name."""
        where, params = [], []
        if run_id is not None:
            where.append("e.run_id = ?")
            params.append(run_id)
        if kind is not None:
            where.append("a.kind = ?")
            params.append(kind)
        sql = ("SELECT e.*, a.kind, a.name FROM events e LEFT JOIN artifacts a ON a.artifact_id = e.artifact_id"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.id")
        return self.query(sql, params)

    def metrics(self, artifact_id: str | None = None) -> list[dict]:
        """Metrics recorded on an artifact (all when None), with its kind and name."""
        sql = ("SELECT m.*, a.kind, a.name FROM metrics m LEFT JOIN artifacts a ON a.artifact_id = m.artifact_id"
               + (" WHERE m.artifact_id = ?" if artifact_id else "") + " ORDER BY m.artifact_id, m.task, m.metric")
        return self.query(sql, [artifact_id] if artifact_id else [])

    def runs(self) -> list[dict]:
        """Every run with its recomputed / cache_hits / observed counts (view run_stats), newest first."""
        return self.query("SELECT * FROM run_stats ORDER BY started_at DESC NULLS LAST")

    def run_summary(self, run_id: str) -> RunSummary:
        """{'run_id', 'status', 'job', 'started_at', 'finished_at', 'materialized': {kind: n}, 'cache_hit': {kind: n},
        'observed': {kind: n}, 'recomputed': total, 'cache_hits': total, 'observed_total': total}"""
        def fn(con):
            counts = con.execute("""SELECT coalesce(a.kind, '?') AS kind, e.event, count(*) AS n FROM events e
                                    LEFT JOIN artifacts a ON a.artifact_id = e.artifact_id
                                    WHERE e.run_id = ? GROUP BY ALL""", [run_id]).fetchall()
            run = _rows(con.execute("SELECT * FROM run_stats WHERE run_id = ?", [run_id]))
            return counts, run[0] if run else {}

        counts, run = self._read(fn, ([], {}))
        out = RunSummary(run_id=run_id, status=run.get("status", "unknown"), job=run.get("job"),
                         started_at=run.get("started_at"), finished_at=run.get("finished_at"),
                         materialized={}, cache_hit={}, observed={})
        for kind, event, n in counts:
            out.setdefault(event, {})[kind] = n
        out["recomputed"] = sum(out["materialized"].values())
        out["cache_hits"] = sum(out["cache_hit"].values())
        out["observed_total"] = sum(out["observed"].values())
        return out

    # -- provenance ------------------------------------------------------------------------------

    def provenance(self, artifact_id: str) -> dict:
        """The artifact as a tree: its row (params decoded), 'metrics' (its own and those of the evals
        run on it, latest eval per task/metric) and 'inputs': [{'role', 'fingerprint', 'node'}] walking
        edges back to the sources (kinds model / calibration / recipe / tasks; a model imported with
        `merge-dag import` has its GGUF, kind gguf, as a parent). A parent never recorded
        is a node with 'missing': True; a parent already on the path is a node with 'cycle': True."""
        def load(con) -> tuple[dict, dict, dict]:
            nodes: dict[str, dict] = {}
            parents: dict[str, list[dict]] = {}
            frontier, seen = [artifact_id], {artifact_id}
            while frontier:
                for r in _rows(con.execute("SELECT * FROM artifacts WHERE list_contains(?, artifact_id)", [frontier])):
                    nodes[r["artifact_id"]] = _artifact_row(r)
                # sources have no parents, except a model imported from a GGUF (edge gguf -> model)
                walk = [i for i in frontier if i in nodes and (nodes[i]["kind"] not in SOURCE_KINDS
                                                               or nodes[i]["kind"] == "model")]
                nxt = []
                if walk:
                    for e in _rows(con.execute("SELECT parent_id, child_id, role, fingerprint FROM edges "
                                               "WHERE list_contains(?, child_id) ORDER BY seq", [walk])):
                        parents.setdefault(e["child_id"], []).append(e)
                        if e["parent_id"] not in seen:
                            seen.add(e["parent_id"])
                            nxt.append(e["parent_id"])
                frontier = nxt
            ids = list(nodes)
            own = _rows(con.execute("""SELECT m.*, m.artifact_id AS of_id, m.artifact_id AS eval_id, NULL AS eval_seen
                                       FROM metrics m WHERE list_contains(?, m.artifact_id)""", [ids]))
            down = _rows(con.execute("""SELECT m.*, e.parent_id AS of_id, e.child_id AS eval_id, a.last_seen_at AS eval_seen
                                        FROM edges e JOIN artifacts a ON a.artifact_id = e.child_id AND a.kind = 'eval'
                                        JOIN metrics m ON m.artifact_id = e.child_id
                                        WHERE list_contains(?, e.parent_id)""", [ids]))
            metrics: dict[str, dict] = {}
            for m in own + sorted(down, key=lambda m: m["eval_seen"] or datetime.min):
                # own metrics first, then evals oldest to newest: the latest eval of a task/metric wins
                metrics.setdefault(m["of_id"], {})[(m["task"], m["metric"])] = {
                    k: m[k] for k in ("task", "metric", "value", "stderr", "n", "model", "eval_id", "created_at")}
            return nodes, parents, {k: [v[t] for t in sorted(v)] for k, v in metrics.items()}

        nodes, parents, metrics = self._read(load, ({}, {}, {}))
        if artifact_id not in nodes:
            raise MergeDagError(f"no artifact {artifact_id!r} in {self.path}")
        memo: dict[str, dict] = {}

        def build(aid: str, stack: tuple[str, ...]) -> tuple[dict, bool]:
            """(tree, whether it cut a cycle: such a subtree depends on the path and is not memoized)"""
            if aid in memo:
                return memo[aid], False
            node = dict(nodes[aid], metrics=metrics.get(aid, []), inputs=[],
                        source=nodes[aid]["kind"] in SOURCE_KINDS)
            cut = False
            for e in parents.get(aid, []):
                pid = e["parent_id"]
                if pid in stack or len(stack) >= MAX_TREE_DEPTH:
                    child, cut = {"artifact_id": pid, "cycle": True, "inputs": [], "metrics": []}, True
                    if pid in nodes:
                        child.update(kind=nodes[pid]["kind"], name=nodes[pid]["name"])
                elif pid not in nodes:
                    child = {"artifact_id": pid, "missing": True, "inputs": [], "metrics": []}
                else:
                    child, c = build(pid, stack + (pid,))
                    cut = cut or c
                node["inputs"].append({"role": e["role"], "fingerprint": e["fingerprint"], "node": child})
            if not cut:
                memo[aid] = node
            return node, cut

        return build(artifact_id, (artifact_id,))[0]
