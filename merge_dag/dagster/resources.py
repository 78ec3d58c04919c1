"""The one resource every merge_dag asset uses: where things live and which device runs torch."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from ..artifacts import ArtifactStore


class MergeDagResource(dg.ConfigurableResource):
    """Settings of a merge_dag project (each defaults from the environment, then the project root)."""

    root: str
    artifacts_dir: str = ""      # default <root>/data/artifacts
    db_path: str = ""            # default $MERGE_DAG_DB or <root>/data/lineage.duckdb
    device: str = "cpu"          # torch device for every tensor op: cpu, cuda, cuda:1
    eval_limit: int = 0          # 0: every example of each eval task
    eval_batch_size: int = 32
    calibration_batch_size: int = 8    # rows per forward pass of a statistics step
    calibration_max_length: int = 512  # tokens per row (longer rows are truncated)
    calibration_max_rows: int = 0      # 0: every row of each calibration set

    def calibration_settings(self) -> dict:
        """Everything that shapes the batches of a statistics pass (part of each statistic's cache key)."""
        return {"batch_size": self.calibration_batch_size, "max_length": self.calibration_max_length,
                "max_rows": self.calibration_max_rows or None}

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts_dir or self.root_path / "data" / "artifacts")

    def database(self) -> Path:
        return Path(self.db_path or os.environ.get("MERGE_DAG_DB") or self.root_path / "data" / "lineage.duckdb")

    def lineage(self):
        from ..lineage.store import LineageStore

        return LineageStore(self.database())


def torch_pool() -> str | None:
    """The concurrency pool of steps that run torch on the device (task vectors, merges, evals).

    $MERGE_DAG_POOL names it; by default it is "gpu" when $MERGE_DAG_DEVICE is a CUDA device (so two
    steps never share a GPU: `dagster instance concurrency set gpu 1`, or the pools default_limit
    that `merge-dag dev` writes) and none on the CPU, where the multiprocess executor runs steps in
    parallel.
    """
    if "MERGE_DAG_POOL" in os.environ:
        return os.environ["MERGE_DAG_POOL"] or None
    return "gpu" if os.environ.get("MERGE_DAG_DEVICE", "cpu").startswith("cuda") else None
