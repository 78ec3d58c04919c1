"""Where a project keeps its files (pure: no Dagster)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional


def data_folder(environ: Optional[Mapping[str, str]] = None) -> str:
    """The data folder as configured: ``$MERGE_DAG_DATA`` as written (relative to the project root
    unless absolute), else ``data``. `environ` defaults to the process environment."""
    env = os.environ if environ is None else environ
    return env.get("MERGE_DAG_DATA", "").strip() or "data"


def data_dir(root: str | os.PathLike, folder: Optional[str] = None) -> Path:
    """The project's data folder: ``$MERGE_DAG_DATA`` (relative to `root` unless absolute), else
    ``<root>/data``. It holds recipes/, tasks/, eval/, calibration/, and by default artifacts/, the
    lineage database and dagster_home/. Model folders are wherever recipes point (relative paths are
    resolved against the root), so two projects in one checkout (``data`` and ``data/real``, the real
    zoo's) share ``data/models``. `folder` overrides the configured one (Settings passes its own)."""
    return (Path(root) / (folder or data_folder())).absolute()


def models_dir(root: str | os.PathLike) -> Path:
    """Where the zoos' model folders live: ``<root>/data/models``, whatever the data folder (the ci,
    bench and real zoos are shared by every project of the checkout)."""
    return Path(root) / "data" / "models"
