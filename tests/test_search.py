"""Search (merge-dag search): Optuna proposes recipes, each trial a cached Dagster run on the ci zoo.
A search interrupted mid-trial resumes without repeating a finished trial, reuses the task vectors
(cache hits in lineage), never merges one recipe twice, and its best recipe merges with
`merge-dag merge` to the fingerprint of its trial."""

import json
from pathlib import Path

import optuna
import pytest
from conftest import make_project

from merge_dag.cli import main as cli
from merge_dag.core.errors import SearchError
from merge_dag.core.search import aggregate, load_search, pareto_front, trial_key
from merge_dag.dagster import search as search_mod
from merge_dag.dagster.resources import MergeDagResource
from merge_dag.dagster.search import run_search
from merge_dag.lineage.store import LineageStore

pytestmark = pytest.mark.usefixtures("fp_cache")

EVAL_LIMIT = 8
TA = """
name: ta
merge_method: task_arithmetic
base_model: data/models/ci/base
models:
  - model: data/models/ci/arev
  - model: data/models/ci/sort
parameters: {weight: 1.0, lambda: 0.5}
evals: [zoo_arev, zoo_sort]
"""
LAMBDA = """
recipe: ta
parameters:
  parameters.lambda: {low: 0.3, high: 1.2}
  models[sort].parameters.weight: {low: 0.5, high: 1.5, step: 0.25}
objective: {tasks: [zoo_arev, zoo_sort], aggregate: mean, not_below_base: true}
budget: {trials: 3}
keep_best: 2
report: [zoo_ashift]
"""
SAME = """
recipe: ta
parameters:
  parameters.lambda: {choices: [0.7]}
objective: {tasks: [zoo_arev, zoo_sort], aggregate: min}
budget: {trials: 2}
"""

PARETO = """
recipe: ta
parameters:
  parameters.lambda: {low: 0.3, high: 1.2}
objective: {tasks: [zoo_arev, zoo_sort]}
optimizer: nsga2
budget: {trials: 2}
"""
HALVING = """
recipe: ta
parameters:
  parameters.lambda: {low: 0.2, high: 2.0}
objective: {tasks: [zoo_arev, zoo_sort], aggregate: mean}
optimizer: random
seed: 1
budget: {trials: 5, halving: {rows: 4, fraction: 0.5}}
keep_best: 1
"""
CMAES = """
recipe: ta
parameters:
  parameters.lambda: {low: 0.3, high: 1.2}
  models[0].parameters.weight: {low: 0.5, high: 1.5}
objective: {tasks: [zoo_arev, zoo_sort], aggregate: weighted, weights: {zoo_sort: 3}}
optimizer: cmaes
budget: {trials: 2}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, ci_zoo):
    root = make_project(tmp_path_factory.mktemp("search"), {"ta.yaml": TA}, data=("tasks", "eval"))
    (root / "data" / "searches").mkdir()
    (root / "data" / "searches" / "lam.yaml").write_text(LAMBDA)
    (root / "data" / "searches" / "same.yaml").write_text(SAME)
    (root / "data" / "searches" / "par.yaml").write_text(PARETO)
    (root / "data" / "searches" / "cma.yaml").write_text(CMAES)
    (root / "data" / "searches" / "halv.yaml").write_text(HALVING)
    return root


def resource(root: Path) -> MergeDagResource:
    return MergeDagResource(root=str(root), eval_limit=EVAL_LIMIT, db_path=str(root / "data" / "lineage.duckdb"))


def events(root: Path, run_id: str) -> list[dict]:
    return LineageStore(root / "data" / "lineage.duckdb").events(run_id=run_id)


def study(root: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'data' / 'searches' / name / 'study.db'}")


@pytest.fixture(scope="module")
def searched(project, instance):
    """`lam` interrupted in its second trial (Ctrl-C while the trial's run starts), then resumed."""
    real, calls = search_mod._materialize, []

    def interrupting(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    search_mod._materialize = interrupting
    try:
        with pytest.raises(KeyboardInterrupt):
            run_search(project, "lam", resource=resource(project), instance=instance, log=lambda s: None)
    finally:
        search_mod._materialize = real
    first = study(project, "lam").trials
    resumed = run_search(project, "lam", resource=resource(project), instance=instance, log=lambda s: None)
    return first, resumed


def test_interrupted_search_resumes_without_repeating_a_trial(project, searched):
    first, out = searched
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]
    states = [t.state.name for t in study(project, "lam").trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # the interrupted trial failed, budget of 3 met
    assert [t.number for t in out.trials] == [0, 2, 3] and out.new_trials == 2
    # trial 0 (finished before the interruption) was merged once, in its own run, never again
    done0 = out.trials[0]
    store = LineageStore(project / "data" / "lineage.duckdb")
    merged0 = [e for e in store.events() if e["step"] == f"merged/{done0.recipe}" and e["event"] == "materialized"]
    assert [e["run_id"] for e in merged0] == [done0.run_id]
    assert done0.run_id not in out.run_ids
    assert len({t.key for t in out.trials}) == 3
    # each trial's score is the mean of its task scores; feasible: no task below the base's score
    rows = store.query(
        "SELECT m.task, m.value FROM metrics m JOIN artifacts a USING (artifact_id) WHERE a.name = 'model_ci_base'"
    )
    base = {r["task"]: r["value"] for r in rows}
    for t in out.trials:
        assert t.values == pytest.approx([sum(t.scores.values()) / 2])
        assert set(t.scores) == {"zoo_arev", "zoo_sort"}
        assert t.feasible == all(t.scores[x] >= base[x] for x in t.scores)
        merged_scores = store.query("SELECT task, value FROM metrics WHERE artifact_id = ?", [t.eval["artifact_id"]])
        assert t.scores == {r["task"]: r["value"] for r in merged_scores}


def test_trials_reuse_cached_task_vectors(project, searched):
    _, out = searched
    first_run = out.trials[0].run_id
    built_first = {e["step"] for e in events(project, first_run) if e["event"] == "materialized"}
    assert {"task_vector/ci_arev", "task_vector/ci_sort", "eval/model_ci_base"} <= built_first
    for t in out.trials[1:]:
        ev = events(project, t.run_id)
        hit = {e["step"] for e in ev if e["event"] == "cache_hit"}
        built = {e["step"] for e in ev if e["event"] == "materialized"}
        assert {"task_vector/ci_arev", "task_vector/ci_sort", "eval/model_ci_base"} <= hit
        assert built == {f"merged/{t.recipe}", f"eval/merged_{t.recipe}"}


def test_best_recipe_merges_to_its_trials_fingerprint(project, searched, tmp_path, monkeypatch, capsys):
    _, out = searched
    best = out.best
    ranked = sorted(out.trials, key=lambda t: (t.feasible, t.values[0]), reverse=True)
    assert best.number == ranked[0].number
    assert out.best_file == project / "data" / "searches" / "lam" / "best.yaml"
    monkeypatch.chdir(project)
    assert cli(["merge", str(out.best_file), str(tmp_path / "best"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"output fingerprint {best.output_fingerprint}" in printed
    # keep_best 2: the third trial's merged checkpoint is gone, the best two stand
    assert len(out.removed) == 1
    kept = [t for t in ranked[:2]]
    assert all((project / t.merged["path"]).is_dir() for t in kept)
    assert not (project / ranked[2].merged["path"]).exists()


def test_report_tasks_score_the_best_recipe_once_after_the_search(project, searched):
    """`report`: the best recipe (rebuilt as <name>_best: the same tensors) on the test tasks, and the base."""
    _, out = searched
    rep = out.report
    assert rep["tasks"] == ["zoo_ashift"] and set(rep["scores"]) == set(rep["base_scores"]) == {"zoo_ashift"}
    assert rep["output_fingerprint"] == out.best.output_fingerprint
    store = LineageStore(project / "data" / "lineage.duckdb")
    rows = store.query("SELECT task, value FROM metrics WHERE artifact_id = ?", [rep["eval"]["artifact_id"]])
    assert {r["task"]: r["value"] for r in rows} == rep["scores"]
    # no trial was scored on the report task
    assert all(set(t.scores) == {"zoo_arev", "zoo_sort"} for t in out.trials)


def test_search_asset_links_every_trial(project, searched, instance):
    import dagster as dg

    _, out = searched
    ev = instance.get_latest_materialization_event(dg.AssetKey(["search", "lam"]))
    md = ev.asset_materialization.metadata
    assert md["best_trial"].value == out.best.number
    assert "lambda" in md["best_recipe"].value and md["trial_count"].value == 3
    assert md["objective_chart"].value.startswith("![")
    assert "never used to choose" in md["report"].value
    store = LineageStore(project / "data" / "lineage.duckdb")
    edges = store.query("SELECT parent_id, role FROM edges WHERE child_id = ?", [md["artifact_id"].value])
    assert {(e["parent_id"], e["role"]) for e in edges} == {
        (out.best.merged["artifact_id"], "best_merged"),
        (out.report["eval"]["artifact_id"], "report_eval"),
    } | {(t.eval["artifact_id"], "trial_eval") for t in out.trials} | {
        (t.record["artifact_id"], "trial") for t in out.trials
    }
    saved = json.loads((project / md["path"].value / "trials.json").read_text())
    assert [t["number"] for t in saved] == [0, 2, 3]


def test_identical_parameters_are_merged_once(project, instance):
    out = run_search(project, "same", resource=resource(project), instance=instance, log=lambda s: None)
    assert [t.duplicate_of for t in out.trials] == [None, 0]
    assert out.trials[1].key == out.trials[0].key and out.trials[1].values == out.trials[0].values
    assert out.new_trials == 1
    assert out.trials[0].values == [min(out.trials[0].scores.values())]
    # one partition, one merge of the recipe in lineage
    assert instance.get_dynamic_partitions("search_same") == [out.trials[0].key[:16]]
    store = LineageStore(project / "data" / "lineage.duckdb")
    step = f"merged/{out.trials[0].recipe}"
    assert [e["event"] for e in store.events() if e["step"] == step] == ["materialized"]


@pytest.mark.parametrize("name", ["par", "cma"])
def test_cli_runs_nsga2_and_cmaes_searches(project, name, tmp_path, monkeypatch, capsys):
    """`merge-dag search` with the multi-objective NSGA-II (one value per task) and CMA-ES samplers,
    runs in the project's DAGSTER_HOME, one progress line per asset."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("MERGE_DAG_EVAL_LIMIT", str(EVAL_LIMIT))
    assert cli(["search", name, "--root", str(project)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"search {name}: 2 trials (2 merged now)" in printed
    assert "RUN_START" not in printed + captured.err  # no Dagster console log, the result's run included
    assert "cache hit task_vector/ci_arev" in printed and f"built     merged/{name}_" in printed
    trials = study(project, name).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    scores = [t.user_attrs["scores"] for t in trials]
    if name == "par":
        assert [t.values for t in trials] == [[s["zoo_arev"], s["zoo_sort"]] for s in scores]
        assert set(trials[0].params) == {"parameters.lambda"}
        # the Pareto front across tasks: its trials in the metadata, its chart a PNG in the UI
        import dagster as dg

        with dg.DagsterInstance.get() as inst:
            md = materialization(inst, ["search", name]).metadata
        assert md["pareto_front"].value == [trials[i].number for i in pareto_front([t.values for t in trials])]
        assert md["pareto_chart"].value.startswith("![Pareto front](data:image/png;base64,")
        assert_png(project / md["path"].value / "pareto.png")
    else:
        assert [t.values for t in trials] == [pytest.approx([(s["zoo_arev"] + 3 * s["zoo_sort"]) / 4]) for s in scores]
    best = (project / "data" / "searches" / name / "best.yaml").read_text()
    assert f"name: {name}_best" in best
    # run again: the budget is met, nothing is merged
    assert cli(["search", name, "--root", str(project)]) == 0
    assert f"search {name}: 2 trials (0 merged now)" in capsys.readouterr().out


def test_failing_trials_stop_the_search(tmp_path, ci_zoo, instance):
    """An expert whose weights are truncated fails every trial's run (its task vector cannot be
    read): each is a failed Optuna trial, and three in a row stop the search with a SearchError."""
    root = make_project(tmp_path / "p", {"ta.yaml": TA}, data=("tasks", "eval"))
    (root / "data" / "searches").mkdir()
    (root / "data" / "searches" / "lam.yaml").write_text(
        "recipe: ta\nparameters:\n  parameters.lambda: {low: 0.3, high: 1.2}\nbudget: {trials: 5}\n"
    )
    f = next((root / "data" / "models" / "ci" / "arev").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(SearchError, match=r"lam.yaml: 3 trials in a row failed \(last: run "):
        run_search(root, "lam", resource=resource(root), instance=instance, log=lambda s: None)
    assert [t.state.name for t in study(root, "lam").trials] == ["FAIL", "FAIL", "FAIL"]


def test_wall_time_spent_stops_before_a_trial(project, tmp_path, monkeypatch, capsys):
    """budget.wall_time is checked before each trial: spent, the search stops (resumable), no run."""
    text = SAME.replace("{trials: 2}", "{trials: 2, wall_time: 1.0e-9}")
    (project / "data" / "searches" / "quick.yaml").write_text(text)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert cli(["search", "quick", "--root", str(project)]) == 1
    printed = capsys.readouterr().out
    assert "search quick: wall time 0 s spent; stopping (resume later)" in printed and "no completed trial" in printed
    assert study(project, "quick").trials == []


BAD = [
    (
        "recipe: ta\nparameters: {parameters.lambda: {low: 0.3}}\n",
        "parameters.parameters.lambda: give `low` and `high`",
    ),
    (
        "recipe: ta\nparameters: {parameters.bogus: {low: 0.3, high: 0.5}}\n",
        "parameters.parameters.bogus: value 0.3 makes an invalid recipe: parameters.bogus: unknown parameter",
    ),
    (
        "recipe: ta\nparameters:\n  models[nope].parameters.weight: {low: 0, high: 1}\n",
        "models has no entry for [nope]",
    ),
    ("recipe: ta\nparameters: {guidance.sparsity.gamma: {low: 0.1, high: 0.2}}\n", "the recipe has no guidance"),
    ("recipe: nope\nparameters: {parameters.lambda: {low: 0, high: 1}}\n", "recipe: no recipe 'nope'"),
    (
        "recipe: ta\nparameters: {parameters.lambda: {low: 0, high: 1}}\noptimizer: sgd\n",
        "optimizer: must be one of tpe, cmaes, nsga2, random",
    ),
    ("recipe: ta\nparameters: {parameters.lambda: {low: 0, high: 1}}\nbudgt: {trials: 3}\n", "budgt: unknown key"),
    (
        "recipe: ta\nparameters: {parameters.lambda: {low: 0, high: 1}}\n"
        "objective: {tasks: [zoo_sort], weights: {x: 1}}\n",
        "objective: `weights` is only used",
    ),
    (
        "recipe: ta\nparameters: {parameters.lambda: {low: 0, high: 1}}\nobjective: {aggregate: median}\n",
        "objective.aggregate: must be one of mean, min, weighted, pareto",
    ),
    ("recipe: ta\nparameters: {}\n", "no parameters to search"),
    (
        "recipe: ta\nparameters: {parameters.lambda: {low: 0, high: 1}}\nreport: [zoo_ashift, zoo_sort]\n",
        "report[1]: 'zoo_sort' is also an objective task",
    ),
]


@pytest.mark.parametrize("text,error", BAD)
def test_bad_search_file_is_one_line_naming_file_and_key(project, tmp_path, text, error, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SearchError) as e:
        load_search(f, project / "data", project)
    assert str(e.value).startswith(f"{f}: ") and error in str(e.value) and "\n" not in str(e.value)
    assert cli(["search", str(f), "--root", str(project)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {e.value}"


def test_trial_key_and_aggregates(project):
    s = load_search(project / "data" / "searches" / "lam.yaml", project / "data", project)
    a = s.resolve({"parameters.lambda": 0.5, "models[sort].parameters.weight": 1.0})
    b = {**s.resolve({"parameters.lambda": 0.5, "models[sort].parameters.weight": 1.0}), "name": "other"}
    assert trial_key(a) == trial_key(b) != trial_key(s.resolve({"parameters.lambda": 0.6}))
    assert a["models"][1]["parameters"] == {"weight": 1.0} and a["parameters"]["lambda"] == 0.5
    o = s.spec.objective
    scores = {"zoo_arev": 0.2, "zoo_sort": 0.6}
    assert aggregate(o, scores) == pytest.approx([0.4])
    assert aggregate(o.model_copy(update={"aggregate": "min"}), scores) == [0.2]
    w = o.model_copy(update={"aggregate": "weighted", "weights": {"zoo_sort": 3.0}})
    assert aggregate(w, scores) == pytest.approx([(0.2 + 1.8) / 4])
    assert aggregate(o.model_copy(update={"aggregate": "pareto"}), scores) == [0.2, 0.6]


def materialization(instance, key: list[str], partition: str | None = None):
    import dagster as dg

    f = dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None)
    return instance.fetch_materializations(f, limit=1).records[0].asset_materialization


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_each_trial_is_a_dynamic_partition_with_its_record(project, searched, instance):
    """search_trial/lam: one partition per finished trial (its recipe hash), with its recipe, merged
    model, validation scores and the steps its run found cached, exactly as lineage recorded them."""
    _, out = searched
    assert instance.get_dynamic_partitions("search_lam") == [t.key[:16] for t in out.trials]
    for n, t in enumerate(out.trials):
        m = materialization(instance, ["search_trial", "lam"], t.partition)
        md = m.metadata
        assert md["trial"].value == t.number and md["merged_asset"].value == f"merged/{t.recipe}"
        assert md["merged_artifact"].value == t.merged["artifact_id"]
        assert md["output_fingerprint"].value == t.output_fingerprint
        assert md["validation_scores"].value == t.scores and md["objective"].value == t.values
        assert f"name: {t.recipe}" in md["recipe"].value
        ev = events(project, t.run_id)
        assert md["cache_hits"].value == [e["step"] for e in ev if e["event"] == "cache_hit"]
        assert md["built"].value == [e["step"] for e in ev if e["event"] == "materialized"]
        if n > 0:  # task vectors and the base's evaluation: cache hits, shown on the trial
            assert {"task_vector/ci_arev", "task_vector/ci_sort", "eval/model_ci_base"} <= set(md["cache_hits"].value)
        # lineage: the trial's record has its merged model and evaluation as parents
        store = LineageStore(project / "data" / "lineage.duckdb")
        edges = store.query("SELECT parent_id, role FROM edges WHERE child_id = ?", [t.record["artifact_id"]])
        assert {(e["parent_id"], e["role"]) for e in edges} == {
            (t.merged["artifact_id"], "merged"),
            (t.eval["artifact_id"], f"eval_{EVAL_LIMIT}"),
        }


def test_search_charts_are_pngs(project, searched, instance):
    _, out = searched
    md = materialization(instance, ["search", "lam"]).metadata
    assert_png(project / md["path"].value / "objective.png")
    assert "pareto_chart" not in md  # one objective: no Pareto front


def test_successive_halving_gives_the_full_evaluation_to_promising_trials_only(project, instance):
    """halving {rows: 4, fraction: 0.5}: every trial is evaluated on the first 4 examples per task;
    Optuna's SuccessiveHalvingPruner (eta 2) promotes a trial when its small-subset objective is in
    the top half of all trials' so far (the best so far while fewer than 2 compete): only those get
    the full evaluation (8 examples), the others are PRUNED and never evaluated in full."""
    out = run_search(project, "halv", resource=resource(project), instance=instance, log=lambda s: None)
    store = LineageStore(project / "data" / "lineage.duckdb")
    states = {t.number: t.state.name for t in study(project, "halv").trials}
    assert len(out.trials) == 5 and all(t.duplicate_of is None for t in out.trials)
    seen = []
    for t in out.trials:
        assert t.rung["rows"] == 4 and t.rung["value"] == pytest.approx(sum(t.rung["scores"].values()) / 2)
        small = store.query("SELECT task, value, n FROM metrics WHERE artifact_id = ?", [t.rung["eval"]["artifact_id"]])
        assert {r["task"]: r["value"] for r in small} == t.rung["scores"] and {r["n"] for r in small} == {4}
        seen.append(t.rung["value"])
        k = max(len(seen) // 2 - 1, 0)
        promoted = t.rung["value"] >= sorted(seen)[-(k + 1)]
        assert t.pruned == (not promoted) and states[t.number] == ("PRUNED" if t.pruned else "COMPLETE")
        # every evaluation of this trial's merged model, by examples per task
        rows = store.query(
            "SELECT DISTINCT m.n FROM metrics m JOIN edges e ON e.child_id = m.artifact_id WHERE e.parent_id = ?",
            [t.merged["artifact_id"]],
        )
        assert sorted(r["n"] for r in rows) == ([4] if t.pruned else [4, EVAL_LIMIT])
        md = materialization(instance, ["search_trial", "halv"], t.partition).metadata
        assert md["promoted"].value is promoted and md["pruned"].value is t.pruned
        if not t.pruned:
            assert t.eval and t.values == pytest.approx([sum(t.scores.values()) / 2])
    assert out.trials[0].pruned is False  # the first trial is the best so far
    assert any(t.pruned for t in out.trials) and out.new_trials == 5
    assert not out.best.pruned
    assert out.best.values[0] == max(t.values[0] for t in out.trials if not t.pruned)
    md = materialization(instance, ["search", "halv"]).metadata
    assert md["pruned_trials"].value == sum(t.pruned for t in out.trials)
    assert_png(project / md["path"].value / "objective.png")
    # keep_best 1: every other trial's merged checkpoint (pruned ones included) is deleted
    assert (project / out.best.merged["path"]).is_dir()
    assert all(not (project / t.merged["path"]).exists() for t in out.trials if t.number != out.best.number)


def test_halving_needs_one_objective(project, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(PARETO.replace("{trials: 2}", "{trials: 2, halving: {rows: 4}}"))
    with pytest.raises(SearchError, match=r"budget.halving needs one objective"):
        load_search(f, project / "data", project)


def test_pareto_front():
    pts = [[0.1, 0.9], [0.5, 0.5], [0.4, 0.4], [0.9, 0.1], [0.5, 0.5], [0.0, 0.0]]
    assert pareto_front(pts) == [0, 1, 3, 4]


def test_searches_are_in_the_projects_definitions(project, searched, instance):
    """`merge-dag dev` shows every search of <data>/searches: search/<name> and its trial partitions
    (not in merge_all); a search file that does not load is only its own failing asset; materialized
    from the definitions, search/lam is the search's own result again (a cache hit)."""
    import dagster as dg

    from merge_dag.dagster.definitions import build_definitions

    bad = project / "data" / "searches" / "zbroken.yaml"
    bad.write_text("recipe: ta\nparameters: {}\n")
    try:
        defs = build_definitions(project, resource=resource(project))
    finally:
        bad.unlink()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"search/lam", "search_trial/lam", "search/par", "search/halv", "search/zbroken"} <= keys
    trial = defs.resolve_assets_def(dg.AssetKey(["search_trial", "lam"]))
    assert trial.partitions_def == dg.DynamicPartitionsDefinition(name="search_lam")
    merge_all = defs.resolve_job_def("merge_all")
    assert not {k for k in merge_all.asset_layer.selected_asset_keys if k.path[0] in ("search", "search_trial")}
    job = dg.define_asset_job("x", selection=[dg.AssetKey(["search", "lam"])])
    lam = defs.resolve_assets_def(dg.AssetKey(["search", "lam"]))  # its merge_dag resource bound
    defs2 = dg.Definitions(assets=[lam, trial], jobs=[job])
    before = materialization(instance, ["search", "lam"]).metadata["artifact_id"].value
    assert defs2.resolve_job_def("x").execute_in_process(instance=instance).success
    md = materialization(instance, ["search", "lam"]).metadata
    assert md["artifact_id"].value == before and md["cache"].value == "hit"
    broken = defs.resolve_assets_def(dg.AssetKey(["search", "zbroken"]))
    res = dg.materialize([broken], instance=instance, raise_on_error=False)
    assert not res.success
