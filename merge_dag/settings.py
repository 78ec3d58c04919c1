"""Every ``MERGE_DAG_*`` environment variable merge_dag reads, in one typed object. Pure: no Dagster.

    from merge_dag.settings import settings
    s = settings()               # read now: a test's monkeypatch.setenv counts at the next call
    s.device, s.db_path(root), s.checked("eval_limit")

=========================  ==========================  ==============================================
variable                   field                       meaning (default)
=========================  ==========================  ==============================================
MERGE_DAG_ROOT             root                        the project root (the working directory)
MERGE_DAG_DATA             data                        the project's data folder, relative to the
                                                       root unless absolute (<root>/data; see
                                                       core.paths.data_dir)
MERGE_DAG_DB               db                          the lineage database (<data>/lineage.duckdb)
MERGE_DAG_ARTIFACTS        artifacts                   the artifact store (<data>/artifacts)
MERGE_DAG_DEVICE           device                      torch device of every step (cpu)
MERGE_DAG_POOL             pool                        Dagster pool of the torch steps ("gpu" on a
                                                       CUDA device, else none; set empty: none)
MERGE_DAG_EVAL_LIMIT       eval_limit                  examples per eval task (0 = all)
MERGE_DAG_EVAL_DTYPE       eval_dtype                  dtype lm-eval runs in (auto: the checkpoint's;
                                                       bfloat16, float16, float32 and their aliases)
MERGE_DAG_STATS_DTYPE      stats_dtype                 the working dtype statistics passes load each
                                                       model in (float32; bfloat16, float16); the
                                                       statistics themselves accumulate in float32
MERGE_DAG_SETTLE_SECONDS   settle_seconds              how long a new checkpoint must stay unchanged
                                                       before the sensor builds it (30)
MERGE_DAG_SCHEDULE         schedule                    cron of the nightly rebuild (0 3 * * *)
MERGE_DAG_TASKS_DIR        tasks_dir                   lm-eval task folder of evaluate() when none is
                                                       given (data/tasks of this checkout)
MERGE_DAG_CACHE            cache                       fingerprint cache (core.fingerprint)
MERGE_DAG_LINEAGE          lineage                     direct: steps write the lineage database;
                                                       spool: they write files that one writer
                                                       ingests (lineage.spool; `merge-dag worker`)
MERGE_DAG_BROKER           broker                      Celery broker URL; when set, runs use the
                                                       celery executor by default (dagster.executors)
=========================  ==========================  ==============================================

A value merge_dag cannot use does not stop anything from loading: the field keeps its default and
`invalid` holds one line naming the variable; `checked(field)` raises SettingsError with that line,
so only what uses the setting fails (a step, a sensor tick). (MERGE_DAG_DATA and MERGE_DAG_CACHE are
also read by the pure core itself, core.paths and core.fingerprint, with the same meaning.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from .core.errors import MergeDagError
from .core.paths import data_dir, data_folder

DEFAULT_CRON = "0 3 * * *"
DEFAULT_SETTLE_SECONDS = 30.0

VARIABLES = {  # field -> environment variable
    "root": "MERGE_DAG_ROOT",
    "data": "MERGE_DAG_DATA",
    "db": "MERGE_DAG_DB",
    "artifacts": "MERGE_DAG_ARTIFACTS",
    "device": "MERGE_DAG_DEVICE",
    "pool": "MERGE_DAG_POOL",
    "eval_limit": "MERGE_DAG_EVAL_LIMIT",
    "eval_dtype": "MERGE_DAG_EVAL_DTYPE",
    "stats_dtype": "MERGE_DAG_STATS_DTYPE",
    "settle_seconds": "MERGE_DAG_SETTLE_SECONDS",
    "schedule": "MERGE_DAG_SCHEDULE",
    "tasks_dir": "MERGE_DAG_TASKS_DIR",
    "cache": "MERGE_DAG_CACHE",
    "lineage": "MERGE_DAG_LINEAGE",
    "broker": "MERGE_DAG_BROKER",
}
LINEAGE_MODES = ("direct", "spool")


class SettingsError(MergeDagError):
    """An environment setting has a value merge_dag cannot use (the message names the variable)."""


def env_number(
    var: str,
    default: float,
    kind: type = int,
    minimum: float = 0,
    hint: str = "",
    environ: Optional[Mapping[str, str]] = None,
):
    """($var as `kind`, None) or (`default`, the one-line error naming $var) when it is not a
    `kind` >= `minimum`. The caller keeps loading and reports the error where the value is used."""
    raw = (os.environ if environ is None else environ).get(var)
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


def _path(raw: Optional[str]) -> Optional[Path]:
    return Path(raw) if raw else None


@dataclass(frozen=True)
class Settings:
    root: Optional[Path] = None
    data: str = "data"
    db: Optional[Path] = None
    artifacts: Optional[Path] = None
    device: str = "cpu"
    pool: Optional[str] = None  # only when pool_set: the variable is there (empty: no pool)
    pool_set: bool = False
    eval_limit: int = 0
    eval_dtype: str = "auto"
    stats_dtype: str = "float32"
    settle_seconds: float = DEFAULT_SETTLE_SECONDS
    schedule: str = DEFAULT_CRON  # checked as a cron expression by dagster.schedules (Dagster knows cron)
    tasks_dir: Optional[Path] = None
    cache: Optional[Path] = None
    lineage: str = "direct"  # direct | spool
    broker: Optional[str] = None  # Celery broker URL
    invalid: dict[str, str] = field(default_factory=dict)  # field -> why its variable was refused

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if environ is None else environ
        invalid: dict[str, str] = {}

        def number(name: str, default: float, kind: type, hint: str = ""):
            value, error = env_number(VARIABLES[name], default, kind, hint=hint, environ=env)
            if error:
                invalid[name] = error
            return value

        eval_dtype = env.get("MERGE_DAG_EVAL_DTYPE", "").strip() or "auto"
        if eval_dtype != "auto":
            from .core.checkpoint import parse_dtype  # imports torch: only when a dtype is set

            try:
                parse_dtype(eval_dtype)
            except (MergeDagError, ValueError, KeyError):
                invalid["eval_dtype"] = (
                    f"MERGE_DAG_EVAL_DTYPE={eval_dtype!r} is not a dtype (auto, float32, bfloat16, float16)"
                )
                eval_dtype = "auto"
        stats_dtype = env.get("MERGE_DAG_STATS_DTYPE", "").strip() or "float32"
        if stats_dtype != "float32":
            from .core.checkpoint import parse_dtype  # imports torch: only when a dtype is set

            try:
                stats_dtype = str(parse_dtype(stats_dtype)).removeprefix("torch.")
                if stats_dtype not in ("float32", "bfloat16", "float16"):
                    raise ValueError(stats_dtype)
            except (MergeDagError, ValueError, KeyError):
                invalid["stats_dtype"] = (
                    f"MERGE_DAG_STATS_DTYPE={stats_dtype!r} is not a working dtype (float32, bfloat16, float16)"
                )
                stats_dtype = "float32"
        lineage = env.get("MERGE_DAG_LINEAGE", "").strip() or "direct"
        if lineage not in LINEAGE_MODES:
            invalid["lineage"] = f"MERGE_DAG_LINEAGE={lineage!r} is not one of {', '.join(LINEAGE_MODES)}"
            lineage = "direct"
        return cls(
            root=_path(env.get("MERGE_DAG_ROOT")),
            data=data_folder(env),
            db=_path(env.get("MERGE_DAG_DB")),
            artifacts=_path(env.get("MERGE_DAG_ARTIFACTS")),
            device=env.get("MERGE_DAG_DEVICE", "cpu"),
            pool=env.get("MERGE_DAG_POOL") or None,
            pool_set="MERGE_DAG_POOL" in env,
            eval_limit=number("eval_limit", 0, int, " (0 = every example)"),
            eval_dtype=eval_dtype,
            stats_dtype=stats_dtype,
            settle_seconds=number("settle_seconds", DEFAULT_SETTLE_SECONDS, float),
            schedule=env.get("MERGE_DAG_SCHEDULE", "").strip() or DEFAULT_CRON,
            tasks_dir=_path(env.get("MERGE_DAG_TASKS_DIR")),
            cache=_path(env.get("MERGE_DAG_CACHE")),
            lineage=lineage,
            broker=env.get("MERGE_DAG_BROKER", "").strip() or None,
            invalid=invalid,
        )

    def checked(self, name: str):
        """The setting `name`, or SettingsError naming its environment variable when that was bad."""
        if name in self.invalid:
            raise SettingsError(self.invalid[name])
        return getattr(self, name)

    def project_root(self, root: Optional[str | os.PathLike] = None) -> Path:
        """`root` if given, else $MERGE_DAG_ROOT, else the working directory (absolute)."""
        return Path(root or self.root or Path.cwd()).absolute()

    def data_dir(self, root: str | os.PathLike) -> Path:
        """The data folder of the project at `root`: $MERGE_DAG_DATA (relative to the root unless
        absolute), else <root>/data."""
        return data_dir(root, self.data)

    def db_path(self, data: str | os.PathLike) -> Path:
        """The lineage database of a project whose data folder is `data`: $MERGE_DAG_DB or <data>/lineage.duckdb."""
        return self.db or Path(data) / "lineage.duckdb"

    def torch_pool(self) -> Optional[str]:
        """The concurrency pool of steps that run torch on the device (task vectors, merges, evals).

        $MERGE_DAG_POOL names it; by default it is "gpu" when $MERGE_DAG_DEVICE is a CUDA device (so
        two steps never share a GPU: `dagster instance concurrency set gpu 1`, or the pools
        default_limit that `merge-dag dev` writes) and none on the CPU, where the multiprocess executor
        runs steps in parallel."""
        if self.pool_set:
            return self.pool
        return "gpu" if self.device.startswith("cuda") else None


def settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """The settings as the environment says now."""
    return Settings.from_env(environ)
