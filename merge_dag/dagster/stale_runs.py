"""Runs killed mid-way (kill -9, a closed laptop, an OOM) stay STARTED in Dagster's run list forever:
nothing is left to report their end. `merge-dag demo` and `merge-dag dev` call `fail_dead_runs` when
they start, which marks such runs of this instance failed.

The rule: a run of this instance in status STARTING or STARTED is marked failed when no process
that ran it is alive on this machine. The processes that ran it are the one named by the
`merge_dag/pid` tag (runs `merge-dag demo` starts; with the process's start time from /proc, so a
reused pid is not taken for the run's process) and every process that wrote an event to the run's
log (Dagster records each event's pid: the run worker of a run `dagster dev` launched). A run whose
process is alive (a demo still running in another terminal, a run worker of a live `dagster dev`)
is never touched; a run with a `merge_dag/host` tag of another machine, or with no recorded pid, is
left as it is. A pid reused by an unrelated process reads as alive, so such a run stays STARTED:
the rule errs on the side of never failing a live run.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

PID_TAG = "merge_dag/pid"
START_TAG = "merge_dag/pid_start"
HOST_TAG = "merge_dag/host"


def process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start: Optional[str] = None) -> bool:
    """Is `pid` a live process (and, when `start` is given and /proc knows, the same process)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    if start:
        now = process_start(pid)
        return now is None or now == start
    return True


def run_tags() -> dict[str, str]:
    """Tags that let a later start tell whether this process still runs the run."""
    pid = os.getpid()
    return {PID_TAG: str(pid), START_TAG: process_start(pid) or "", HOST_TAG: socket.gethostname()}


def _run_processes(instance, run) -> list[tuple[int, Optional[str]]]:
    procs: list[tuple[int, Optional[str]]] = []
    if run.tags.get(PID_TAG, "").isdigit():
        procs.append((int(run.tags[PID_TAG]), run.tags.get(START_TAG) or None))
    seen = {p for p, _ in procs}
    for entry in instance.all_logs(run.run_id):
        pid = getattr(entry.dagster_event, "pid", None) if entry.dagster_event is not None else None
        if pid and pid not in seen:
            seen.add(pid)
            procs.append((pid, None))
    return procs


def fail_dead_runs(instance, lineage=None) -> list[str]:
    """Mark failed every STARTING/STARTED run of `instance` whose processes are all gone (see the
    module docstring); also in the lineage store `lineage` when given and the run wrote to it
    (a row in `runs`, or only observation events: the step that records `running` never ran).
    Returns one line per run marked."""
    from dagster import DagsterRunStatus, RunsFilter

    lines = []
    runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]))
    for run in runs:
        if run.tags.get(HOST_TAG, socket.gethostname()) != socket.gethostname():
            continue
        try:
            procs = _run_processes(instance, run)
        except Exception as e:  # noqa: BLE001 - an unreadable event log: leave the run, say so, go on
            lines.append(f"merge_dag: run {run.run_id[:8]} left as it is: its event log does not read ({e})")
            continue
        if not procs or any(pid_alive(p, s) for p, s in procs):
            continue
        pids = ", ".join(str(p) for p, _ in procs)
        message = (
            f"merge_dag: marked failed at startup: run {run.run_id[:8]} was {run.status.value} but its "
            f"process (pid {pids}) is gone (killed mid-run)"
        )
        instance.report_run_failed(run, message=message)
        if lineage is not None:
            try:
                if lineage.query(
                    "SELECT run_id FROM runs WHERE run_id = ? UNION ALL "
                    "SELECT run_id FROM events WHERE run_id = ? LIMIT 1",
                    [run.run_id, run.run_id],
                ):
                    lineage.record_run(run_id=run.run_id, status="failure")
            except Exception as e:  # noqa: BLE001 - a lineage problem must not stop the start
                message += f" (lineage not updated: {type(e).__name__}: {e})"
        lines.append(message)
    return lines
