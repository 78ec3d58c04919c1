"""DAGSTER_HOME for a merge_dag project: <root>/data/dagster_home unless set, so runs persist."""

import os
from pathlib import Path

DAGSTER_YAML = """\
# Written by merge_dag. Runs, schedules and sensor state persist here (SQLite).
telemetry:
  enabled: false
concurrency:
  pools:
    # steps in the same pool (merge_dag puts torch steps on a CUDA device in pool "gpu") run one at a time
    default_limit: 1
"""


def ensure_dagster_home(root: Path) -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or Path(root) / "data" / "dagster_home").absolute()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
