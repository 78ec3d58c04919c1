"""The one resource every merge_dag asset uses: where things live and which device runs torch."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from ..artifacts import ArtifactStore
from ..core.paths import data_dir
from ..settings import SettingsError, settings

__all__ = ["MergeDagResource", "SettingsError", "resource_from_env", "torch_pool", "torch_tags"]

QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG
GPU_QUEUE = "gpu"  # the Celery queue of the steps that run torch (executors.py)
CPU_QUEUE = "cpu"  # every other step's


class MergeDagResource(dg.ConfigurableResource):
    """Settings of a merge_dag project (each defaults from the environment, merge_dag.settings, then
    the project root)."""

    root: str
    data_dir: str = ""  # default $MERGE_DAG_DATA under the root, else <root>/data (see core.paths)
    artifacts_dir: str = ""  # default <data>/artifacts
    db_path: str = ""  # default $MERGE_DAG_DB or <data>/lineage.duckdb
    device: str = "cpu"  # torch device for every tensor op: cpu, cuda, cuda:1
    eval_limit: int = 0  # 0: every example of each eval task
    eval_batch_size: int = 32
    eval_dtype: str = "auto"  # $MERGE_DAG_EVAL_DTYPE: auto (the checkpoint's), float32, bfloat16, float16
    stats_dtype: str = "float32"  # $MERGE_DAG_STATS_DTYPE: the dtype statistics passes load models in
    calibration_batch_size: int = 8  # rows per forward pass of a statistics step
    calibration_max_length: int = 512  # tokens per row (longer rows are truncated)
    calibration_max_rows: int = 0  # 0: every row of each calibration set
    lineage_spool: bool = False  # $MERGE_DAG_LINEAGE=spool: write lineage as files (lineage.spool), never the DB
    invalid: dict[str, str] = {}  # field -> why its environment variable was refused (see checked)

    def checked(self, field: str):
        """The setting `field`, or SettingsError naming its environment variable when that was bad:
        only the steps that use a bad setting fail; everything else runs."""
        if field in self.invalid:
            raise SettingsError(self.invalid[field])
        return getattr(self, field)

    def calibration_settings(self) -> dict:
        """Everything that shapes the batches of a statistics pass (part of each statistic's cache key)."""
        return {
            "batch_size": self.calibration_batch_size,
            "max_length": self.calibration_max_length,
            "max_rows": self.calibration_max_rows or None,
        }

    def stats_torch_dtype(self):
        """The working dtype of statistics passes (SettingsError naming MERGE_DAG_STATS_DTYPE when bad)."""
        from ..core.checkpoint import parse_dtype

        return parse_dtype(self.checked("stats_dtype"))

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else data_dir(self.root_path)

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts_dir or self.data_path / "artifacts")

    def database(self) -> Path:
        return Path(self.db_path) if self.db_path else settings().db_path(self.data_path)

    def spool_dir(self) -> Path:
        """Where spooled lineage files go: beside the artifacts, on the file system every worker shares."""
        from ..lineage.spool import SPOOL_FOLDER

        return self.store().root / SPOOL_FOLDER

    def lineage(self):
        """The lineage store; a worker's (lineage_spool) reads the database and spools every write."""
        from ..lineage.store import LineageStore

        if self.lineage_spool:
            from ..lineage.spool import SpoolingLineageStore

            return SpoolingLineageStore(self.database(), self.spool_dir())
        return LineageStore(self.database())


def resource_from_env(root: str | Path, data: str | Path | None = None) -> MergeDagResource:
    """The project's resource from the settings ($MERGE_DAG_DEVICE, _DB, _ARTIFACTS, _EVAL_LIMIT,
    _EVAL_DTYPE: merge_dag.settings). A bad value does not stop the code location from loading: the
    setting keeps its default in `invalid`, and every step that reads it (the evals, for
    _EVAL_LIMIT) fails with one line naming the variable."""
    s = settings()
    return MergeDagResource(
        root=str(root),
        data_dir=str(data) if data is not None else "",
        device=s.device,
        db_path=str(s.db or ""),
        artifacts_dir=str(s.artifacts or ""),
        eval_limit=s.eval_limit,
        eval_dtype=s.eval_dtype,
        stats_dtype=s.stats_dtype,
        lineage_spool=s.lineage == "spool",
        invalid={k: v for k, v in s.invalid.items() if k in ("eval_limit", "eval_dtype", "stats_dtype")},
    )


def torch_pool() -> str | None:
    """The pool of the steps that run torch on the device: see Settings.torch_pool."""
    return settings().torch_pool()


def torch_tags() -> dict[str, str]:
    """Op tags of the steps that run torch: with the Celery executor they go to the `gpu` queue
    (every other step to the executor's default queue, `cpu`); other executors ignore the tag."""
    return {QUEUE_TAG: GPU_QUEUE}
