"""merge_dag.settings: every MERGE_DAG_* variable read in one place, typed, bad values named."""

import ast
from pathlib import Path

import pytest

from merge_dag.settings import DEFAULT_CRON, VARIABLES, Settings, SettingsError, settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "merge_dag"
CORE_READERS = {"core/paths.py", "core/fingerprint.py", "core/recipe.py"}  # the pure core reads DATA and CACHE itself


def test_defaults_without_any_variable():
    s = Settings.from_env({})
    assert s == Settings() and s.invalid == {}
    assert (s.device, s.eval_limit, s.eval_dtype, s.settle_seconds, s.schedule) == (
        "cpu",
        0,
        "auto",
        30.0,
        DEFAULT_CRON,
    )
    assert s.torch_pool() is None and s.db_path("/p/data") == Path("/p/data/lineage.duckdb")
    assert s.data_dir("/p") == Path("/p/data") and s.project_root("/p") == Path("/p")


def test_every_variable_reaches_its_field():
    env = {
        "MERGE_DAG_ROOT": "/proj",
        "MERGE_DAG_DATA": "data/real",
        "MERGE_DAG_DB": "/x/l.duckdb",
        "MERGE_DAG_ARTIFACTS": "/x/a",
        "MERGE_DAG_DEVICE": "cuda:1",
        "MERGE_DAG_EVAL_LIMIT": "12",
        "MERGE_DAG_EVAL_DTYPE": "bf16",
        "MERGE_DAG_STATS_DTYPE": "bfloat16",
        "MERGE_DAG_SETTLE_SECONDS": "2.5",
        "MERGE_DAG_SCHEDULE": " 0 4 * * * ",
        "MERGE_DAG_TASKS_DIR": "/t",
        "MERGE_DAG_CACHE": "/c",
        "MERGE_DAG_LINEAGE": "spool",
        "MERGE_DAG_BROKER": "redis://h:1/0",
    }
    assert set(env) | {"MERGE_DAG_POOL"} == set(VARIABLES.values())
    s = Settings.from_env(env)
    assert s.invalid == {}
    assert (s.root, s.data, s.db, s.artifacts, s.device) == (
        Path("/proj"),
        "data/real",
        Path("/x/l.duckdb"),
        Path("/x/a"),
        "cuda:1",
    )
    assert (s.eval_limit, s.eval_dtype, s.settle_seconds, s.schedule) == (12, "bf16", 2.5, "0 4 * * *")
    assert s.stats_dtype == "bfloat16"
    assert (s.tasks_dir, s.cache, s.lineage, s.broker) == (Path("/t"), Path("/c"), "spool", "redis://h:1/0")
    assert s.project_root() == Path("/proj") and s.data_dir("/proj") == Path("/proj/data/real")
    assert s.db_path(s.data_dir("/proj")) == Path("/x/l.duckdb")
    assert s.torch_pool() == "gpu"  # a CUDA device: one pool
    assert Settings.from_env({**env, "MERGE_DAG_POOL": ""}).torch_pool() is None  # set empty: none
    assert Settings.from_env({"MERGE_DAG_POOL": "big"}).torch_pool() == "big"


def test_a_bad_value_keeps_the_default_and_names_the_variable():
    s = Settings.from_env(
        {"MERGE_DAG_EVAL_LIMIT": "abc", "MERGE_DAG_SETTLE_SECONDS": "-1", "MERGE_DAG_EVAL_DTYPE": "int3"}
    )
    assert (s.eval_limit, s.settle_seconds, s.eval_dtype) == (0, 30.0, "auto")
    assert s.invalid == {
        "eval_limit": "MERGE_DAG_EVAL_LIMIT='abc' is not a whole number >= 0 (0 = every example)",
        "settle_seconds": "MERGE_DAG_SETTLE_SECONDS='-1' is not a number >= 0",
        "eval_dtype": "MERGE_DAG_EVAL_DTYPE='int3' is not a dtype (auto, float32, bfloat16, float16)",
    }
    bad = Settings.from_env({"MERGE_DAG_LINEAGE": "shared"})
    assert bad.lineage == "direct" and bad.invalid == {
        "lineage": "MERGE_DAG_LINEAGE='shared' is not one of direct, spool"
    }
    with pytest.raises(SettingsError, match=r"^MERGE_DAG_EVAL_LIMIT='abc' is not a whole number"):
        s.checked("eval_limit")
    assert s.checked("device") == "cpu"


def test_settings_reads_the_environment_at_each_call(monkeypatch):
    monkeypatch.setenv("MERGE_DAG_DEVICE", "cuda")
    assert settings().device == "cuda"
    monkeypatch.delenv("MERGE_DAG_DEVICE")
    assert settings().device == "cpu"


def _env_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """Reads of os.environ / os.getenv with a MERGE_DAG_* name (writes and setdefault are not reads)."""
    out = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr in ("get", "getenv", "pop")
                and ast.unparse(f.value) in ("os.environ", "os")
            ):
                name = node.args[0].value
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and ast.unparse(node.value) == "os.environ"
        ):
            name = getattr(node.slice, "value", None)
        elif isinstance(node, ast.Compare) and any(ast.unparse(c) == "os.environ" for c in node.comparators):
            name = getattr(node.left, "value", None)
        if isinstance(name, str) and name.startswith("MERGE_DAG_"):
            out.append((node.lineno, name))
    return out


def test_no_module_but_settings_reads_a_merge_dag_variable():
    readers = {}
    for py in sorted(PACKAGE.rglob("*.py")):
        rel = str(py.relative_to(PACKAGE))
        reads = _env_reads(ast.parse(py.read_text()))
        if reads and rel != "settings.py" and rel not in CORE_READERS:
            readers[rel] = reads
    assert readers == {}
    assert _env_reads(
        ast.parse(
            'import os\nos.environ.get("MERGE_DAG_X")\n"MERGE_DAG_Y" in os.environ\n'
            'os.environ.setdefault("MERGE_DAG_Z", "1")\nos.environ["MERGE_DAG_W"] = "1"'
        )
    ) == [(2, "MERGE_DAG_X"), (3, "MERGE_DAG_Y")]


def test_stats_dtype_is_a_working_dtype_or_refused_with_one_line():
    assert settings({}).stats_dtype == "float32"
    assert settings({"MERGE_DAG_STATS_DTYPE": "bf16"}).stats_dtype == "bfloat16"
    assert settings({"MERGE_DAG_STATS_DTYPE": "float16"}).stats_dtype == "float16"
    for bad in ("int3", "float64"):
        s = settings({"MERGE_DAG_STATS_DTYPE": bad})
        assert s.stats_dtype == "float32"
        assert s.invalid["stats_dtype"] == (
            f"MERGE_DAG_STATS_DTYPE={bad!r} is not a working dtype (float32, bfloat16, float16)"
        )
        with pytest.raises(SettingsError, match="MERGE_DAG_STATS_DTYPE"):
            s.checked("stats_dtype")
