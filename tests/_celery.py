"""A real Celery setup on this machine for the scale-out tests and bench/scaleout.py: redis-server on a
free loopback port (no persistence, its own folder) and `merge-dag worker` processes, each in its own
working directory and process group, stopped afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def have_redis() -> bool:
    return Path(REDIS).is_file() and os.access(REDIS, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """redis-server on 127.0.0.1:<free port>, no RDB/AOF, working in `folder`; yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=open(folder / "redis.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


WORKER = """
import sys
{prelude}
from merge_dag.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_worker(
    queue: str, broker: str, cwd: Path, env: dict[str, str], name: str, prelude: str = "", concurrency: int = 1
) -> subprocess.Popen:
    """`merge-dag worker --queue <queue>` in `cwd` (its own process group), log in cwd/worker.log.
    `prelude`: Python run in the worker before it starts (a test's fault injection)."""
    cwd.mkdir(parents=True, exist_ok=True)
    argv = ["worker", "--queue", queue, "--broker", broker, "--name", name, "--loglevel", "INFO"]
    if queue != "gpu":
        argv += ["--concurrency", str(concurrency)]
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER.format(prelude=prelude), *argv],
        cwd=cwd,
        env=full_env,
        stdout=open(cwd / "worker.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(broker: str, names: list[str], procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Until every named worker answers a ping (or one of them exits: RuntimeError)."""
    from merge_dag.dagster.executors import celery_app

    app = celery_app(broker)
    deadline = time.monotonic() + timeout
    while True:
        replies = app.control.ping(timeout=1.0) or []
        seen = {n for r in replies for n in r}
        if set(names) <= seen:
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(
                f"workers {names} not ready (answered: {sorted(seen)}; exited: {[p.args for p in dead]})"
            )


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the worker's process group (warm shutdown), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    else:  # the leader is gone: make sure no pool child of it survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def children(pid: int) -> list[int]:
    """The direct children of `pid` (a prefork worker's pool processes)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out
