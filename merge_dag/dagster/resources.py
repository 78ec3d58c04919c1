"""The one resource every merge_dag asset uses: where things live and which device runs torch."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from ..artifacts import ArtifactStore
from ..core.errors import MergeDagError
from ..core.paths import data_dir


class SettingsError(MergeDagError):
    """An environment setting has a value merge_dag cannot use (the message names the variable)."""


def env_number(var: str, default: float, kind: type = int, minimum: float = 0, hint: str = ""):
    """($var as `kind`, None) or (`default`, the one-line error naming $var) when it is not a
    `kind` >= `minimum`. The caller keeps loading and reports the error where the value is used."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return default, None
    try:
        value = kind(raw.strip())
        if value < minimum or value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        return value, None
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        return default, f"{var}={raw!r} is not {what} >= {minimum:g}{hint}"


class MergeDagResource(dg.ConfigurableResource):
    """Settings of a merge_dag project (each defaults from the environment, then the project root)."""

    root: str
    data_dir: str = ""           # default $MERGE_DAG_DATA under the root, else <root>/data (see core.paths)
    artifacts_dir: str = ""      # default <data>/artifacts
    db_path: str = ""            # default $MERGE_DAG_DB or <data>/lineage.duckdb
    device: str = "cpu"          # torch device for every tensor op: cpu, cuda, cuda:1
    eval_limit: int = 0          # 0: every example of each eval task
    eval_batch_size: int = 32
    eval_dtype: str = "auto"           # $MERGE_DAG_EVAL_DTYPE: auto (the checkpoint's), float32, bfloat16, float16
    calibration_batch_size: int = 8    # rows per forward pass of a statistics step
    calibration_max_length: int = 512  # tokens per row (longer rows are truncated)
    calibration_max_rows: int = 0      # 0: every row of each calibration set
    invalid: dict[str, str] = {}       # field -> why its environment variable was refused (see checked)

    def checked(self, field: str):
        """The setting `field`, or SettingsError naming its environment variable when that was bad:
        only the steps that use a bad setting fail; everything else runs."""
        if field in self.invalid:
            raise SettingsError(self.invalid[field])
        return getattr(self, field)

    def calibration_settings(self) -> dict:
        """Everything that shapes the batches of a statistics pass (part of each statistic's cache key)."""
        return {"batch_size": self.calibration_batch_size, "max_length": self.calibration_max_length,
                "max_rows": self.calibration_max_rows or None}

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else data_dir(self.root_path)

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts_dir or self.data_path / "artifacts")

    def database(self) -> Path:
        return Path(self.db_path or os.environ.get("MERGE_DAG_DB") or self.data_path / "lineage.duckdb")

    def lineage(self):
        from ..lineage.store import LineageStore

        return LineageStore(self.database())


def resource_from_env(root: str | Path, data: str | Path | None = None) -> MergeDagResource:
    """The project's resource from $MERGE_DAG_DEVICE, _DB, _ARTIFACTS and _EVAL_LIMIT. A bad number
    does not stop the code location from loading: the setting keeps its default in `invalid`, and
    every step that reads it (the evals, for _EVAL_LIMIT) fails with one line naming the variable."""
    invalid = {}
    eval_limit, error = env_number("MERGE_DAG_EVAL_LIMIT", 0, int, hint=" (0 = every example)")
    if error:
        invalid["eval_limit"] = error
    eval_dtype = os.environ.get("MERGE_DAG_EVAL_DTYPE", "").strip() or "auto"
    if eval_dtype != "auto":
        from ..core.checkpoint import parse_dtype

        try:
            parse_dtype(eval_dtype)
        except (MergeDagError, ValueError, KeyError):
            invalid["eval_dtype"] = (f"MERGE_DAG_EVAL_DTYPE={eval_dtype!r} is not a dtype "
                                     "(auto, float32, bfloat16, float16)")
            eval_dtype = "auto"
    return MergeDagResource(root=str(root), data_dir=str(data) if data is not None else "",
                            device=os.environ.get("MERGE_DAG_DEVICE", "cpu"),
                            db_path=os.environ.get("MERGE_DAG_DB", ""),
                            artifacts_dir=os.environ.get("MERGE_DAG_ARTIFACTS", ""),
                            eval_limit=eval_limit, eval_dtype=eval_dtype, invalid=invalid)


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
