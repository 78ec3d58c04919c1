"""The import graph of merge_dag (tools/import_graph.py): no cycle between modules, not even one a
lazy import hides, and the layers hold (the pure packages import no merge_dag.dagster; evaluation
does not reach up into the zoo); the CLI loads without the heavy libraries."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
ig = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ig)


def test_the_graph_finds_module_level_and_lazy_imports():
    g, full = ig.graph(), ig.graph(lazy=True)
    assert "merge_dag.dagster.sensors" in g["merge_dag.dagster.definitions"]  # module level
    assert "merge_dag.dagster.watch" in g["merge_dag.dagster.sensors"]
    assert "merge_dag.lineage.store" not in g["merge_dag.dagster.resources"]  # lazy only
    assert "merge_dag.lineage.store" in full["merge_dag.dagster.resources"]
    assert ig.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_and_no_layer_violation():
    full = ig.graph(lazy=True)
    assert ig.cycles(ig.graph()) == []
    assert ig.cycles(full) == []
    assert ig.layer_violations(full) == []


def test_evaluation_loads_without_the_zoo():
    code = (
        "import sys, merge_dag.evaluation, merge_dag.evaluation.tasks; "
        "assert not [m for m in sys.modules if m.startswith('merge_dag.zoo')], 'zoo imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_cli_and_its_commands_load_without_dagster_torch_or_lm_eval():
    """`merge-dag --help` and `merge-dag demo --help` stay fast: the commands import the heavy
    libraries inside the functions that run."""
    code = (
        "import sys, merge_dag.cli, merge_dag.commands.demo, merge_dag.commands.dev, merge_dag.commands.compare, "
        "merge_dag.commands.home; merge_dag.cli.build_parser(['demo']); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'dagster', 'torch', 'lm_eval', 'duckdb'}); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
