"""`merge-dag worker --queue gpu|cpu [--broker URL] [--concurrency N] [--device D]`: a Celery worker
of dagster-celery's app for the runs that use the celery executor (merge_dag.dagster.executors).

The gpu queue gets every step that runs torch and takes one at a time; the cpu queue gets the rest.
The worker's steps spool their lineage (MERGE_DAG_LINEAGE=spool) and never write the DuckDB file;
the artifacts root (MERGE_DAG_ARTIFACTS, or the project's data folder) must be on a file system
every worker and the run's coordinator share. Stop it with Ctrl-C (SIGINT/SIGTERM: warm shutdown).
"""

from __future__ import annotations

import argparse

from ..core.errors import MergeDagError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", "-q", required=True, choices=["gpu", "cpu"], help="the queue this worker serves")
    p.add_argument(
        "--broker", default=None, help="Celery broker URL (default: $MERGE_DAG_BROKER, else redis://localhost:6379/0)"
    )
    p.add_argument("--backend", default=None, help="Celery result backend URL (default: the broker)")
    p.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=None,
        help="steps run at once (gpu: 1, the only value allowed; cpu: default the number of CPUs)",
    )
    p.add_argument("--device", default=None, help="torch device of this worker's steps (sets MERGE_DAG_DEVICE)")
    p.add_argument("--name", default=None, help="the worker's Celery node name (default: <queue>-<pid>@<host>)")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")


def run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise MergeDagError(f"--concurrency {args.concurrency}: must be >= 1")
    if args.queue == "gpu" and args.concurrency not in (None, 1):
        raise MergeDagError(f"--concurrency {args.concurrency}: a gpu worker takes one step at a time (1)")
    from ..dagster.executors import start_worker

    start_worker(
        args.queue,
        broker=args.broker,
        backend=args.backend,
        concurrency=args.concurrency,
        device=args.device,
        name=args.name,
        loglevel=args.loglevel,
    )
    return 0
