"""How a merge_dag run executes its steps: in one process, in parallel processes (Dagster's
multiprocess executor, the default) or on Celery workers through Dagster's own integration
(dagster-celery), chosen per run in the launchpad's `execution` config:

    execution:
      config:
        celery:
          broker: redis://localhost:6379/0    # default $MERGE_DAG_BROKER, else this
          backend: redis://localhost:6379/0   # default: the broker

With `$MERGE_DAG_BROKER` set when the code location loads, celery is the default. The steps that
run torch carry the op tag `dagster-celery/queue: gpu` (resources.torch_tags); every other step goes
to the default queue `cpu`. Workers: `merge-dag worker --queue gpu|cpu` (start_worker below).

Lineage: a worker's steps spool their records (MERGE_DAG_LINEAGE=spool, lineage/spool.py) and never
write the DuckDB file; the run's coordinator ingests the spool when the run ends, whatever its
outcome (and the lineage sensors do it again for runs whose coordinator died), idempotently.

Celery settings (both sides): acks_late with reject_on_worker_lost, so a step whose worker process
dies (kill -9, out of memory) is put back on its queue and runs again, and prefetch 1, so a worker
reserves no step it is not running.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import dagster as dg

from ..lineage.spool import ingest
from ..lineage.store import LineageStore
from ..settings import settings
from .resources import CPU_QUEUE, GPU_QUEUE, MergeDagResource

DEFAULT_BROKER = "redis://localhost:6379/0"
QUEUES = (GPU_QUEUE, CPU_QUEUE)

# the Celery app settings of the executor and of every worker (they must agree)
CELERY_SETTINGS: dict[str, Any] = {
    "task_default_queue": CPU_QUEUE,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
}


def default_broker() -> str:
    return settings().broker or DEFAULT_BROKER


def celery_app(broker: str | None = None, backend: str | None = None):
    """The Celery app of dagster-celery (its execute_plan task registered) on `broker`."""
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    broker = broker or default_broker()
    app = make_app(
        CeleryExecutor.for_cli(broker=broker, backend=backend or broker, config_source=dict(CELERY_SETTINGS)).app_args()
    )
    create_task(app)
    return app


def _celery_executor_class():
    from dagster_celery.executor import CeleryExecutor

    class MergeDagCeleryExecutor(CeleryExecutor):
        """dagster-celery's executor; when the run ends (success, failure or interrupt) the
        coordinator ingests the lineage the workers spooled: the one writer of the DuckDB file."""

        def __init__(self, resource: MergeDagResource, **kwargs):
            super().__init__(**kwargs)
            self.resource = resource

        def execute(self, plan_context, execution_plan):
            try:
                yield from super().execute(plan_context, execution_plan)
            finally:
                result = ingest(LineageStore(self.resource.database()), self.resource.spool_dir())
                for line in result.errors:
                    plan_context.log.warning(line)
                plan_context.log.info(f"lineage: {result}")

    return MergeDagCeleryExecutor


def executor_def(resource: MergeDagResource) -> dg.ExecutorDefinition:
    """The executor of every merge_dag job: a selector of multiprocess (default), in_process and
    celery; celery is the default when $MERGE_DAG_BROKER is set."""
    from dagster._core.definitions.executor_definition import (
        IN_PROC_CONFIG,
        MULTI_PROC_CONFIG,
        _core_in_process_executor_creation,
        _core_multiprocess_executor_creation,
    )
    from dagster._core.execution.retries import RetryMode, get_retries_config

    celery_config = dg.Field(
        {
            "broker": dg.Field(str, is_required=False, description=f"Celery broker URL (default: {default_broker()})"),
            "backend": dg.Field(str, is_required=False, description="Celery result backend URL (default: the broker)"),
            "include": dg.Field([str], is_required=False, description="modules every worker imports"),
            "config_source": dg.Field(dg.Permissive(), is_required=False, description="more Celery app settings"),
            "retries": get_retries_config(),
        },
        description="Run each step on a Celery worker (`merge-dag worker --queue gpu|cpu`): torch steps on "
        "queue gpu, the rest on queue cpu.",
    )
    default = {"celery": {}} if settings().broker else {"multiprocess": {}}

    def requirements(config) -> list:
        return dg.multiple_process_executor_requirements() if "in_process" not in config else []

    @dg.executor(
        name="merge_dag",
        config_schema=dg.Field(
            dg.Selector({"multiprocess": MULTI_PROC_CONFIG, "in_process": IN_PROC_CONFIG, "celery": celery_config}),
            default_value=default,
        ),
        requirements=requirements,
    )
    def merge_dag_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
        config = init_context.executor_config
        if "in_process" in config:
            return _core_in_process_executor_creation(config["in_process"])
        if "multiprocess" in config:
            return _core_multiprocess_executor_creation(config["multiprocess"])
        c = config["celery"]
        broker = c.get("broker") or default_broker()
        return _celery_executor_class()(
            resource,
            broker=broker,
            backend=c.get("backend") or broker,
            include=c.get("include"),
            config_source={**CELERY_SETTINGS, **(c.get("config_source") or {})},
            retries=RetryMode.from_config(c["retries"]),
        )

    return merge_dag_executor


def worker_argv(queue: str, concurrency: int, name: str | None = None, loglevel: str = "INFO") -> list[str]:
    """The `celery worker` arguments of a merge_dag worker on `queue`."""
    return [
        "worker",
        "--queues",
        queue,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--prefetch-multiplier",
        "1",
        "--hostname",
        name or f"{queue}-{os.getpid()}@{socket.gethostname()}",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def start_worker(
    queue: str,
    *,
    broker: str | None = None,
    backend: str | None = None,
    concurrency: int | None = None,
    device: str | None = None,
    name: str | None = None,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker of dagster-celery's app on `queue` until it is stopped (what
    `dagster-celery worker start -q <queue>` runs, with merge_dag's settings). The gpu queue takes
    one step at a time; its steps see MERGE_DAG_DEVICE=`device`. Every step spools its lineage."""
    if queue not in QUEUES:
        from ..core.errors import MergeDagError

        raise MergeDagError(f"--queue {queue!r}: one of {', '.join(QUEUES)}")
    if queue == GPU_QUEUE:
        concurrency = 1
    os.environ["MERGE_DAG_LINEAGE"] = "spool"  # workers never write the DuckDB file
    if device:
        os.environ["MERGE_DAG_DEVICE"] = device
    app = celery_app(broker, backend)
    app.worker_main(argv=worker_argv(queue, concurrency or os.cpu_count() or 1, name, loglevel))
