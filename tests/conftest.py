"""Shared fixtures and helpers.

- `ci_zoo`: the ci expert zoo, built once per test session;
- `fp_cache`: a fresh fingerprint cache per test (modules that hash checkpoints use it for all their
  tests: `pytestmark = pytest.mark.usefixtures("fp_cache")`);
- `family`: a tiny base + 3 experts (3 layers, 2 shards) under tmp_path;
- `instance`: one ephemeral Dagster instance per test module;
- `make_project`: a merge_dag project folder from the ci zoo, the data files and recipe texts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = "data/models/ci"


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


@pytest.fixture()
def fp_cache(tmp_path, monkeypatch) -> Path:
    """MERGE_DAG_CACHE (the fingerprint cache) under this test's tmp_path: no test sees another's."""
    monkeypatch.setenv("MERGE_DAG_CACHE", str(tmp_path / "fp-cache"))
    return tmp_path / "fp-cache"


@pytest.fixture()
def family(tmp_path):
    """base + e0..e2: tiny Llama checkpoints, 3 layers in 2 shards (_models.make_family)."""
    from _models import make_family

    return make_family(tmp_path / "models", n_experts=3, layers=3, shards=2)


@pytest.fixture(scope="module")
def instance():
    """An ephemeral Dagster instance shared by the tests of one module."""
    import dagster as dg

    with dg.instance_for_test() as inst:
        yield inst


def make_project(
    root: Path,
    recipes: dict[str, str | bytes],
    models=("base", "arev", "sort"),
    data=("tasks", "eval", "calibration"),
    link_zoo=False,
) -> Path:
    """A project at `root`: the ci zoo's `models` copied to data/models/ci/ (or data/models linked
    to the zoo cache), the committed `data` folders of this checkout, and `recipes` (file name ->
    text or bytes) under data/recipes."""
    if link_zoo:
        (root / "data").mkdir(parents=True)
        (root / "data" / "models").symlink_to(zoo_cache_dir(), target_is_directory=True)
    else:
        for name in models:
            shutil.copytree(zoo_cache_dir() / "ci" / name, root / CI / name)
    for folder in data:
        shutil.copytree(ROOT / "data" / folder, root / "data" / folder)
    (root / "data" / "recipes").mkdir(parents=True)
    for fname, text in recipes.items():
        f = root / "data" / "recipes" / fname
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    return root


@pytest.fixture(params=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    """Run each test with the real chunk size and with tiny chunks (many chunks, several workers):
    core.chunks.CPU_CHUNK becomes the test module's MANY_CHUNKS (53 unless it says)."""
    from merge_dag.core import chunks

    if request.param == "many-chunks":
        monkeypatch.setattr(chunks, "CPU_CHUNK", getattr(request.module, "MANY_CHUNKS", 53))
    return request.param
