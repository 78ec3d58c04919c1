"""Shared fixtures. `ci_zoo`: the ci expert zoo, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def zoo_cache_dir() -> Path:
    """Where the test session keeps its zoo: $MERGE_DAG_ZOO_DIR, else data/models of this checkout
    (git-ignored), so a developer's second test run reuses the zoo at no cost."""
    return Path(os.environ.get("MERGE_DAG_ZOO_DIR", ROOT / "data" / "models"))


@pytest.fixture(scope="session")
def ci_zoo():
    """The ci zoo's manifest (base + one expert per skill), built at most once per session and
    reused across sessions while a complete zoo with the same settings is in the cache folder.
    The committed data files are not rewritten here (a test compares them with the generator)."""
    from merge_dag.zoo.build import build_zoo

    return build_zoo("ci", zoo_cache_dir(), progress=True, data_dir=None)
