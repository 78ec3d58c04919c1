"""The Dagster asset graph, materialized in-process on a copy of the ci zoo: cache hits on repeats,
exactly the affected assets rebuilt after an expert or a recipe changes, audits, parallel lineage."""

import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from conftest import make_project
from safetensors.torch import load_file, save_file

from merge_dag.core.fingerprint import checkpoint_fingerprint
from merge_dag.dagster.definitions import ALL_JOB, build_definitions, reconstructable_merge_all
from merge_dag.dagster.resources import MergeDagResource
from merge_dag.lineage.audit import audit
from merge_dag.lineage.store import LineageStore

ROOT = Path(__file__).resolve().parents[1]
EVAL_LIMIT = 12
TASKS = ["arev", "ashift", "sort"]

TA = """
name: ta
merge_method: task_arithmetic
base_model: data/models/ci/base
models:
  - model: data/models/ci/arev
  - model: data/models/ci/ashift
  - model: data/models/ci/sort
parameters: {weight: 1.0, lambda: 0.5}
evals: [zoo_arev, zoo_ashift, zoo_sort]
"""
TIES = """
name: ties
merge_method: ties
base_model: data/models/ci/base
models:
  - model: data/models/ci/arev
  - model: data/models/ci/sort
parameters: {weight: 1.0, density: 0.5}
evals: [zoo_arev, zoo_sort]
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, ci_zoo):
    return make_project(
        tmp_path_factory.mktemp("project"),
        {"ta.yaml": TA, "ties.yaml": TIES},
        models=("base", "arev", "ashift", "sort"),
        data=("tasks", "eval"),
    )


def resource(root: Path) -> MergeDagResource:
    return MergeDagResource(root=str(root), eval_limit=EVAL_LIMIT, db_path=str(root / "data" / "lineage.duckdb"))


def run_all(root: Path, instance: dg.DagsterInstance):
    defs = build_definitions(root, resource=resource(root))
    result = defs.resolve_job_def(ALL_JOB).execute_in_process(instance=instance)
    assert result.success
    return result


def built(root: Path, run_id: str) -> set[str]:
    return {
        e["step"]
        for e in LineageStore(root / "data" / "lineage.duckdb").events(run_id=run_id)
        if e["event"] == "materialized"
    }


def hits(root: Path, run_id: str) -> set[str]:
    return {
        e["step"]
        for e in LineageStore(root / "data" / "lineage.duckdb").events(run_id=run_id)
        if e["event"] == "cache_hit"
    }


ALL_BUILT = {
    "task_vector/ci_arev",
    "task_vector/ci_ashift",
    "task_vector/ci_sort",
    "merged/ta",
    "merged/ties",
    "eval/merged_ta",
    "eval/merged_ties",
    "eval/model_ci_base",
    "eval/model_ci_arev",
    "eval/model_ci_ashift",
    "eval/model_ci_sort",
    "leaderboard/leaderboard",
}


@pytest.fixture(scope="module")
def first_run(project, instance):
    return run_all(project, instance)


def test_first_run_builds_every_artifact_and_checks_pass(project, first_run):
    assert built(project, first_run.run_id) == ALL_BUILT
    checks = {(tuple(c.asset_key.path), c.check_name): c for c in first_run.get_asset_check_evaluations()}
    assert set(checks) == {(("merged", r), "loads_and_matches_base") for r in ("ta", "ties")} | {
        (("merged", r), "embeddings_sane") for r in ("ta", "ties")
    } | {(("eval", "merged", r), c) for r in ("ta", "ties") for c in ("not_below_base", "no_task_collapsed")} | {
        (("merged", r), "evaluated_vs_base") for r in ("ta", "ties")
    }
    assert all(
        checks[k].passed for k in checks if k[1] in ("loads_and_matches_base", "embeddings_sane", "evaluated_vs_base")
    )
    mats = {
        tuple(m.asset_key.path): m
        for m in first_run.get_asset_materialization_events()
        for m in [m.event_specific_data.materialization]
    }
    merged = mats[("merged", "ta")].metadata
    assert merged["method"].value == "task_arithmetic"
    assert merged["tensor_count"].value > 0 and merged["bytes"].value > 0
    board = mats[("leaderboard",)].metadata["all_metrics"].value
    assert {r.data["model"] for r in board.records} == {
        "merged/ta",
        "merged/ties",
        "model/ci_base",
        "model/ci_arev",
        "model/ci_ashift",
        "model/ci_sort",
    }


def test_merged_page_shows_this_builds_scores_beside_the_base(project, first_run):
    """evaluated_vs_base runs on merged/<recipe> after its eval: the scores of this very build, per
    task, beside the base's, with the averages and Δ as numbers."""
    from merge_dag.dagster.steps import META_FILE
    from merge_dag.evaluation.report import ScoreTable

    checks = {(tuple(c.asset_key.path), c.check_name): c for c in first_run.get_asset_check_evaluations()}
    meta = checks[(("merged", "ta"), "evaluated_vs_base")].metadata
    mats = {
        tuple(m.asset_key.path): m
        for m in first_run.get_asset_materialization_events()
        for m in [m.event_specific_data.materialization]
    }
    results = [
        {**json.loads((project / mats[key].metadata["path"].value / META_FILE).read_text()), "model": name}
        for key, name in ((("eval", "merged", "ta"), "merged/ta"), (("eval", "model", "ci_base"), "model/ci_base"))
    ]
    t = ScoreTable.from_results(results)
    assert meta["average"].value == round(t.average("merged/ta"), 4)
    assert meta["base_average"].value == round(t.average("model/ci_base"), 4)
    assert meta["delta_vs_base"].value == round(t.diff("merged/ta", "model/ci_base")[0], 4)
    table = meta["scores"].value.splitlines()
    assert table[0] == "| task | this merge | base | Δ |" and len(table) == 2 + len(TASKS) + 1
    assert table[-1].startswith("| **average** |")


def test_merged_asset_equals_direct_engine_merge(project, first_run, tmp_path):
    import yaml

    from merge_dag.core.engine import merge
    from merge_dag.core.recipe import parse_recipe

    store = LineageStore(project / "data" / "lineage.duckdb")
    art = store.find("ta")
    recipe = parse_recipe(yaml.safe_load(TA))
    recipe.root = project
    merge(recipe, tmp_path / "direct")
    a, b = load_file(str(next(Path(art["path"]).glob("*.safetensors")))), {}
    for f in (tmp_path / "direct").glob("*.safetensors"):
        b.update(load_file(str(f)))
    for f in Path(art["path"]).glob("*.safetensors"):
        a.update(load_file(str(f)))
    assert set(a) == set(b)
    for n in a:  # via cached task vectors (base + delta in float32) == straight from the experts
        torch.testing.assert_close(a[n].float(), b[n].float(), rtol=0, atol=0, msg=n)


def test_repeat_recomputes_nothing(project, instance, first_run):
    again = run_all(project, instance)
    assert built(project, again.run_id) == set()
    assert hits(project, again.run_id) == ALL_BUILT
    mats = [m.event_specific_data.materialization for m in again.get_asset_materialization_events()]
    assert all(m.metadata["cache"].value == "hit" for m in mats)


def test_audit_names_the_right_fingerprints(project, first_run):
    store = LineageStore(project / "data" / "lineage.duckdb")
    art = store.find("ta")
    text = audit(store, art["path"])  # a folder found on disk, traced through its model card
    for name in ("base", "arev", "ashift", "sort"):
        assert checkpoint_fingerprint(project / "data" / "models" / "ci" / name) in text
    assert "task_arithmetic" in text and "lambda" in text
    card = json.loads((Path(art["path"]) / "merge_dag.json").read_text())
    assert card["artifact_id"] == art["artifact_id"]


def test_one_code_version_for_a_merged_artifact(project, first_run):
    """The model card, merge_dag.json, the lineage row (what `audit` prints) and the Dagster asset's
    code version and metadata all name the same code version."""
    from merge_dag.core.version import merge_code_version

    store = LineageStore(project / "data" / "lineage.duckdb")
    art = store.find("ta")
    card = json.loads((Path(art["path"]) / "merge_dag.json").read_text())
    readme = (Path(art["path"]) / "README.md").read_text()
    mats = {
        tuple(m.asset_key.path): m
        for m in first_run.get_asset_materialization_events()
        for m in [m.event_specific_data.materialization]
    }
    defs = build_definitions(project, resource=resource(project))
    asset_code = defs.resolve_assets_def(dg.AssetKey(["merged", "ta"])).code_versions_by_key[
        dg.AssetKey(["merged", "ta"])
    ]
    versions = {
        card["code_version"],
        art["code_version"],
        mats[("merged", "ta")].metadata["code_version"].value,
        asset_code,
    }
    assert versions == {merge_code_version()}
    assert f"code version {merge_code_version()}" in readme
    assert f"code {merge_code_version()}" in audit(store, "ta")


def test_changing_one_expert_rebuilds_exactly_its_dependents(project, instance, first_run):
    run_all(project, instance)  # make sure the starting point is fully built
    shard = next((project / "data" / "models" / "ci" / "ashift").glob("*.safetensors"))
    state = load_file(str(shard))
    name = next(n for n in state if n.endswith("mlp.up_proj.weight"))
    state[name] = state[name] + 0.01
    save_file(state, str(shard), metadata={"format": "pt"})
    after = run_all(project, instance)
    assert built(project, after.run_id) == {
        "task_vector/ci_ashift",
        "merged/ta",
        "eval/merged_ta",
        "eval/model_ci_ashift",
        "leaderboard/leaderboard",
    }
    assert hits(project, after.run_id) == ALL_BUILT - built(project, after.run_id)


def test_changing_a_recipe_rebuilds_only_its_merge_and_evals(project, instance, first_run):
    run_all(project, instance)
    recipe = project / "data" / "recipes" / "ties.yaml"
    recipe.write_text(TIES.replace("density: 0.5", "density: 0.7"))
    try:
        after = run_all(project, instance)
        assert built(project, after.run_id) == {"merged/ties", "eval/merged_ties", "leaderboard/leaderboard"}
    finally:
        recipe.write_text(TIES)


def keys_of(result) -> dict[tuple, str]:
    return {
        tuple(m.asset_key.path): m.metadata["key"].value
        for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())
    }


def test_multiprocess_executor_writes_lineage_without_loss(project, instance, first_run, tmp_path, monkeypatch):
    """Steps in parallel processes (the multiprocess executor) each write to the one DuckDB file."""
    reference = keys_of(run_all(project, instance))
    db = tmp_path / "parallel.duckdb"
    monkeypatch.setenv("MERGE_DAG_ROOT", str(project))
    monkeypatch.setenv("MERGE_DAG_DB", str(db))
    monkeypatch.setenv("MERGE_DAG_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MERGE_DAG_EVAL_LIMIT", str(EVAL_LIMIT))
    with dg.instance_for_test() as inst:
        result = dg.execute_job(
            reconstructable_merge_all(project),
            instance=inst,
            run_config={"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}},
        )
        assert result.success
        starts = [e for e in result.all_events if e.event_type_value == "STEP_START"]
        assert len({e.pid for e in starts}) > 1  # really several processes
    store = LineageStore(db)
    events = store.events(run_id=result.run_id)
    assert {e["step"] for e in events if e["event"] == "materialized"} == ALL_BUILT
    # same content keys (hence the same fingerprints) as in-process: parallelism changes nothing
    parallel = {
        tuple(m.asset_key.path): m.metadata["key"].value
        for m in (e.event_specific_data.materialization for e in result.all_events if e.is_step_materialization)
    }
    assert parallel == reference
    # and the merged checkpoints, rebuilt from scratch in other processes, hold the same tensors
    fp = {
        tuple(m.asset_key.path): m.metadata["output_fingerprint"].value
        for m in (e.event_specific_data.materialization for e in result.all_events if e.is_step_materialization)
        if m.asset_key.path[0] == "merged"
    }
    assert set(fp) == {("merged", "ta"), ("merged", "ties")}
    for (_, name), value in fp.items():
        assert value == checkpoint_fingerprint(Path(store.find(name)["path"]))
        assert value == first_run_fingerprints(project)[name]


def first_run_fingerprints(project: Path) -> dict[str, str]:
    store = LineageStore(project / "data" / "lineage.duckdb")
    return {name: checkpoint_fingerprint(Path(store.find(name)["path"])) for name in ("ta", "ties")}


def test_quiet_demo_run_prints_one_line_per_asset_and_the_results_table(project, first_run, monkeypatch, capfd):
    """`merge-dag demo` without --verbose: a progress line per asset (here all cache hits), no
    Dagster DEBUG stream, and the results table with averages, standard errors and the base first."""
    from merge_dag.commands.demo import materialize_all, print_results, quiet

    monkeypatch.setenv("DAGSTER_HOME", str(project / "data" / "dagster_home"))
    monkeypatch.setenv("MERGE_DAG_EVAL_LIMIT", str(EVAL_LIMIT))
    monkeypatch.setenv("MERGE_DAG_DB", str(project / "data" / "lineage.duckdb"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    quiet(False)
    capfd.readouterr()
    result, summary, leaderboard, _ = materialize_all(project, verbose=False)
    out, err = capfd.readouterr()
    assert result.success
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assets = sorted(
        "/".join(e.event_specific_data.materialization.asset_key.path)
        for e in first_run.get_asset_materialization_events()
    )
    assert len(assets) == len(ALL_BUILT) and sorted(" ".join(w[2:]) for w in lines) == assets
    assert all(w[:2] == ["cache", "hit"] for w in lines)
    assert "DEBUG" not in out + err and "STEP_START" not in out + err
    print_results(project, leaderboard)
    table = capfd.readouterr().out
    rows = [r for r in table.splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| model | arev | ashift | sort | avg ± SE | Δ avg vs base |")
    assert rows[1].startswith("| ci_base (base) |")
    assert {r.split(" |")[0] for r in rows[2:5]} == {"| ci_arev (expert)", "| ci_ashift (expert)", "| ci_sort (expert)"}
    merged = [r for r in rows if r.startswith(("| ta ", "| ties "))]
    assert len(merged) == 2 and all(" ± " in r for r in merged)


def materializations(result) -> dict[tuple, dg.AssetMaterialization]:
    return {
        tuple(m.asset_key.path): m
        for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())
    }


def test_metadata_lists_every_input_with_relative_paths(project, first_run):
    """`inputs` is a table with one row per input (a role may repeat): merged/ta has its recipe, base
    and 3 task vectors, the leaderboard all 6 evals; no metadata path is absolute."""
    mats = materializations(first_run)
    rows = [r.data for r in mats[("merged", "ta")].metadata["inputs"].value.records]
    assert [(r["role"], r["name"]) for r in rows] == [
        ("recipe", "recipe/ta"),
        ("base", "model/ci_base"),
        ("expert", "task_vector/ci_arev"),
        ("expert", "task_vector/ci_ashift"),
        ("expert", "task_vector/ci_sort"),
    ]
    store = LineageStore(project / "data" / "lineage.duckdb")
    edges = store.query(
        "SELECT fingerprint FROM edges WHERE child_id = ? ORDER BY seq",
        [mats[("merged", "ta")].metadata["artifact_id"].value],
    )
    assert [r["fingerprint"] for r in rows] == [e["fingerprint"][: len(r["fingerprint"])] for e, r in zip(edges, rows)]
    board = [r.data for r in mats[("leaderboard",)].metadata["inputs"].value.records]
    assert len(board) == 6 and {r["role"] for r in board} == {"eval"}
    for m in mats.values():
        for k, v in m.metadata.items():
            if isinstance(v, dg.PathMetadataValue):
                assert not Path(v.value).is_absolute(), (m.asset_key, k, v.value)
                assert (project / v.value).exists()


def test_merged_provenance_matches_the_audit(project, instance, first_run):
    """The merged page's provenance names every input of the audit tree (role, name, fingerprint) and,
    once the merge was evaluated, its scores with Δ vs the base's."""
    from merge_dag.lineage.audit import format_audit

    again = run_all(project, instance)  # a cache hit: by now the merge's evaluation is in lineage
    md = materializations(again)[("merged", "ta")].metadata["provenance"].value
    store = LineageStore(project / "data" / "lineage.duckdb")
    tree = store.provenance(store.find("ta")["artifact_id"])
    text = format_audit(tree)
    assert "method **task_arithmetic**" in md and tree["code_version"] in md and "lambda: 0.5" in md
    assert str(project) not in md
    base_scores = {(m["task"], m["metric"]): m["value"] for m in tree["inputs"][1]["node"]["metrics"]}
    for m in tree["metrics"]:
        d = m["value"] - base_scores[(m["task"], m["metric"])]
        assert f"| {m['task']} | {m['metric']} | {m['value']:.3f}" in md and f"{d:+.3f}" in md

    def walk(inputs, depth=0):
        for i in inputs:
            yield depth, i
            if not i["node"].get("source"):
                yield from walk(i["node"].get("inputs") or [], depth + 1)

    listed = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    for _, i in walk(tree["inputs"]):
        label = f"{i['node']['kind']}/{i['node']['name']}"
        fp = (i["fingerprint"] or "").rpartition(":")[2][:12]
        assert label in text and fp in text  # what the audit prints ...
        assert any(f"`{label}`" in line and fp in line for line in listed), label  # ... is on the page


def test_leaderboard_tells_the_story(project, first_run):
    """Sorted rows with ± SE, an average and Δ vs base; base and experts first; a chart; numbers."""
    from merge_dag.evaluation.report import ScoreTable

    mats = materializations(first_run)
    md = mats[("leaderboard",)].metadata
    lines = [r for r in md["leaderboard_markdown"].value.splitlines() if r.startswith("| ")]
    assert lines[0].startswith("| model | arev | ashift | sort | **avg** ± SE | Δ avg vs base |")
    assert lines[1].startswith("| *ci\\_base \\(base\\)* |")  # names escaped (md_text): renders as ci_base (base)
    assert {r.split(" |")[0].replace("\\", "") for r in lines[2:5]} == {
        "| *ci_arev (expert)*",
        "| *ci_ashift (expert)*",
        "| *ci_sort (expert)*",
    }
    art = project / md["path"].value
    table = ScoreTable.from_results(json.loads((art / "results.json").read_text()))
    merges = [r.split(" |")[0].removeprefix("| ").replace("\\", "") for r in lines[5:]]
    assert merges == sorted(["ta", "ties"], key=lambda m: -table.average(f"merged/{m}"))
    best = f"merged/{merges[0]}"
    assert md["best_merge_average"].value == round(table.average(best), 4)
    assert md["best_merge_delta_vs_base"].value == round(table.diff(best, "model/ci_base")[0], 4)
    rows = [r.data for r in md["leaderboard"].value.records]  # the same rows as a table
    models = [r["model"] for r in rows]
    assert models[0] == "ci_base (base)" and models[4:] == merges
    assert rows[4]["avg ± SE"].endswith(" ★") and rows[0]["Δ avg vs base"] == ""
    assert md["chart"].value.startswith("![leaderboard chart](data:image/png;base64,")
    assert (art / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(md["seconds"].value, float) and isinstance(md["peak_rss_mb"].value, float)
