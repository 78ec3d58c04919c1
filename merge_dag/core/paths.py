"""Where a project keeps its files (pure: no Dagster)."""

from __future__ import annotations

import os
from pathlib import Path


def data_folder() -> str:
    """The data folder as configured: ``$MERGE_DAG_DATA`` as written (relative to the project root
    unless absolute), else ``data``."""
    return os.environ.get("MERGE_DAG_DATA", "").strip() or "data"


def data_dir(root: str | os.PathLike) -> Path:
    """The project's data folder: ``$MERGE_DAG_DATA`` (relative to `root` unless absolute), else
    ``<root>/data``. It holds recipes/, tasks/, eval/, calibration/, and by default artifacts/, the
    lineage database and dagster_home/. Model folders are wherever recipes point (relative paths are
    resolved against the root), so two projects in one checkout (``data`` and ``data/real``, the real
    zoo's) share ``data/models``."""
    return (Path(root) / data_folder()).absolute()
