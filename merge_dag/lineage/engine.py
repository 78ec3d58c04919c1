"""The lineage database file: one DuckDB file, schema.sql, and the locking that lets many processes
share it. What is written (batch.py), read (store.py) and built from it (provenance.py) lives apart.
Pure: no Dagster.

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
from typing import Callable, Iterator, Optional, TypeVar

import duckdb

from ..core.errors import MergeDagError

try:
    import fcntl
except ImportError:  # Windows: DuckDB's lock and retries only
    fcntl = None  # type: ignore[assignment]

SCHEMA_FILE = Path(__file__).with_name("schema.sql")
DEFAULT_LOCK_TIMEOUT = 60.0

Stmt = tuple[str, list]  # one SQL statement and its parameters
T = TypeVar("T")

_schema_ready: set[str] = set()  # files this process has already brought up to schema.sql

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


def _run_transaction(con: duckdb.DuckDBPyConnection, statements: list[Stmt]) -> None:
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
    return (
        f"lineage database {path} cannot be opened ({cause}); nothing was changed. To start a fresh one, "
        f"run `merge-dag audit --repair --db {path}`: it moves the damaged file aside to "
        f"{path.name}.corrupt-<time> (kept, never deleted) and the next run creates a new database"
    )


_CORRUPTION_SIGNS = (
    "not a valid DuckDB database",
    "Corrupt database",
    "Could not read enough bytes",
    "checksum",
    "Serialization Error",
)


def _is_corruption(e: BaseException) -> bool:
    return isinstance(e, (duckdb.SerializationException, duckdb.InternalException)) or (
        isinstance(e, duckdb.Error) and any(sign in str(e) for sign in _CORRUPTION_SIGNS)
    )


def _is_lock_error(e: BaseException) -> bool:
    msg = str(e)
    return "Could not set lock" in msg or "Conflicting lock" in msg


def rows(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    """The cursor's result as dicts (column -> value)."""
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def artifact_row(row: Optional[dict]) -> Optional[dict]:
    """An artifacts row with params_json decoded into 'params' ({} when unreadable)."""
    if row is None:
        return None
    row = dict(row)
    try:
        row["params"] = json.loads(row.pop("params_json") or "{}")
    except json.JSONDecodeError:
        row["params"] = {}
    return row


class LineageDB:
    """The lineage database file at `path` (created with its parent folder on the first write): one
    short transaction per operation, under flock and DuckDB's lock (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.path = Path(path).expanduser().absolute()
        self.lock_timeout = float(lock_timeout)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        # lock waiting, for measurements: operations run, how many queued behind another merge_dag process
        # (flock), DuckDB lock retries (a foreign holder), total and longest wait before each operation (s)
        self.stats = {"operations": 0, "queued": 0, "retries": 0, "waited_s": 0.0, "max_wait_s": 0.0}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

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
                    f"{self.lock_timeout:.0f} s; is a run stuck?"
                ) from None
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
                _engine().execute(
                    f"ATTACH {_sql_str(str(self.path))} AS {_ALIAS}" + (" (READ_ONLY)" if read_only else "")
                )
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
                        f"elsewhere"
                    ) from None
                self.stats["retries"] += 1
                time.sleep(min(delay * random.uniform(0.5, 1.5), max(deadline - now, 0.0)))
                delay = min(delay * 1.6, 0.05)
            except duckdb.ResourceInUseException:
                # another duckdb connection of this very process has the file open: share its instance
                try:
                    return duckdb.connect(str(self.path), read_only=read_only)
                except duckdb.ConnectionException:
                    if not read_only:
                        raise MergeDagError(
                            f"lineage database {self.path} is open read-only elsewhere in this "
                            f"process; close that connection to record lineage"
                        ) from None
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
                tables = [
                    r[0]
                    for r in con.execute(
                        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
                    ).fetchall()
                ]
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
            _run_transaction(con, [(sql, [])])
        _schema_ready.add(key)

    def transaction(self, statements: list[Stmt]) -> None:
        """Run the statements in one transaction on the file: all of them or, on any error, none."""
        self.ensure_schema()
        try:
            with self._attached(read_only=False) as con:
                _run_transaction(con, statements)
        except duckdb.CatalogException:
            # the file was replaced under us (deleted, or an old schema): bring the schema back once, retry
            _schema_ready.discard(str(self.path))
            self.ensure_schema()
            with self._attached(read_only=False) as con:
                _run_transaction(con, statements)

    def read(self, fn: Callable[[duckdb.DuckDBPyConnection], T], default: T) -> T:
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
        return self.read(lambda con: rows(con.execute(sql, params or [])), [])
