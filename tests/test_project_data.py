"""A project's data folder: data/ by default, $MERGE_DAG_DATA (e.g. data/real, the real demo's) or an
explicit `data` otherwise. Recipes, tasks, eval data, calibration sets by name, artifacts, the lineage
database and DAGSTER_HOME all follow it; model paths stay relative to the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge_dag.core.paths import data_dir
from merge_dag.project import load_project

from _models import base_state, perturb, tiny_config, write_model

RECIPE = """\
name: {name}
merge_method: task_arithmetic
base_model: data/models/t/base
models:
  - {{model: data/models/t/e1, calibration: c1}}
  - {{model: data/models/t/e2, calibration: c2}}
parameters: {{weight: 1.0, lambda: 0.5}}
guidance:
  coefficients: {{method: sens, temperature: 2}}
"""


@pytest.fixture()
def two_projects(tmp_path: Path) -> Path:
    """data/ holds recipe `main_one`, data/real holds `real_one`; both merge the same model folders."""
    state, cfg = base_state(), tiny_config()
    write_model(tmp_path / "data/models/t/base", state, cfg)
    write_model(tmp_path / "data/models/t/e1", perturb(state, 1), cfg)
    write_model(tmp_path / "data/models/t/e2", perturb(state, 2), cfg)
    for data, name in (("data", "main_one"), ("data/real", "real_one")):
        (tmp_path / data / "recipes").mkdir(parents=True)
        (tmp_path / data / "recipes" / f"{name}.yaml").write_text(RECIPE.format(name=name))
        (tmp_path / data / "calibration").mkdir()
        for c in ("c1", "c2"):
            (tmp_path / data / "calibration" / f"{c}.jsonl").write_text('{"text": "%s"}\n' % data)
    return tmp_path


def test_default_data_folder_is_data(two_projects: Path, monkeypatch):
    monkeypatch.delenv("MERGE_DAG_DATA", raising=False)
    p = load_project(two_projects)
    assert p.data == two_projects / "data"
    assert list(p.recipes) == ["main_one"]
    assert p.calibrations["c1"].path == two_projects / "data/calibration/c1.jsonl"


@pytest.mark.parametrize("how", ["env", "argument"])
def test_another_data_folder_has_its_own_recipes_and_calibration(two_projects: Path, monkeypatch, how):
    monkeypatch.delenv("MERGE_DAG_DATA", raising=False)
    if how == "env":
        monkeypatch.setenv("MERGE_DAG_DATA", "data/real")
        p = load_project(two_projects)
    else:  # explicit: recipes and tasks follow; calibration by name follows $MERGE_DAG_DATA only
        p = load_project(two_projects, data=two_projects / "data/real")
    real = two_projects / "data/real"
    assert p.data == real and p.recipes_dir == real / "recipes"
    assert (p.tasks_dir, p.eval_dir) == (real / "tasks", real / "eval")
    assert list(p.recipes) == ["real_one"]
    spec = p.recipes["real_one"]
    # model folders are still resolved against the root, and keep their asset names
    assert spec.base.path == two_projects / "data/models/t/base" and spec.base.name == "t_base"
    if how == "env":
        assert p.calibrations["c1"].path == real / "calibration/c1.jsonl"


def test_run_state_follows_the_data_folder(two_projects: Path, monkeypatch):
    from merge_dag.commands.home import ensure_dagster_home
    from merge_dag.dagster.resources import resource_from_env

    for var in ("MERGE_DAG_DB", "MERGE_DAG_ARTIFACTS", "DAGSTER_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MERGE_DAG_DATA", "data/real")
    real = two_projects / "data/real"
    assert data_dir(two_projects) == real
    res = resource_from_env(two_projects)
    assert res.store().root == real / "artifacts"
    assert res.database() == real / "lineage.duckdb"
    assert ensure_dagster_home(two_projects) == real / "dagster_home"
    assert (real / "dagster_home" / "dagster.yaml").is_file()
    # an absolute $MERGE_DAG_DATA is taken as it is
    monkeypatch.setenv("MERGE_DAG_DATA", str(two_projects / "elsewhere"))
    assert data_dir(two_projects) == two_projects / "elsewhere"


def test_eval_dtype_setting(monkeypatch, tmp_path: Path):
    """$MERGE_DAG_EVAL_DTYPE: the dtype lm-eval runs in; part of an eval's cache key only when set, so
    results evaluated before the setting existed keep their keys; a bad value fails only the evals."""
    from merge_dag.dagster.assets.evals import _settings
    from merge_dag.dagster.resources import SettingsError, resource_from_env

    monkeypatch.delenv("MERGE_DAG_EVAL_DTYPE", raising=False)
    res = resource_from_env(tmp_path)
    assert res.eval_dtype == "auto" and "dtype" not in _settings(res, ["t"])
    monkeypatch.setenv("MERGE_DAG_EVAL_DTYPE", "bfloat16")
    res = resource_from_env(tmp_path)
    assert _settings(res, ["t"])["dtype"] == "bfloat16"
    monkeypatch.setenv("MERGE_DAG_EVAL_DTYPE", "int3")
    res = resource_from_env(tmp_path)
    with pytest.raises(SettingsError, match=r"^MERGE_DAG_EVAL_DTYPE='int3' is not a dtype"):
        res.checked("eval_dtype")
