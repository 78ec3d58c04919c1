"""Issue 11, the Dagster layer: one bad recipe or setting never takes the code location down, a
headless demo builds every independent branch and reports each failure in one line, runs killed
mid-way do not stay STARTED, the demo never rewrites a user's data files, user text is inert
Markdown in the UI."""

import argparse
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
from conftest import make_project, zoo_cache_dir

from merge_dag.commands.demo import failure_lines
from merge_dag.core.markdown import md_text
from merge_dag.dagster.definitions import ALL_JOB, build_definitions
from merge_dag.dagster.resources import MergeDagResource, SettingsError
from merge_dag.dagster.schedules import SCHEDULE_NAME
from merge_dag.dagster.sensors import SENSOR_NAME
from merge_dag.lineage.store import Batch, LineageStore
from merge_dag.project import load_project

ROOT = Path(__file__).resolve().parents[1]
CI = "data/models/ci"

GOOD = f"""
name: good
merge_method: ties
base_model: {CI}/base
models:
  - model: {CI}/arev
  - model: {CI}/sort
parameters: {{weight: 1.0, density: 0.5}}
"""


def resource(root: Path, **kw) -> MergeDagResource:
    return MergeDagResource(root=str(root), db_path=str(root / "data" / "lineage.duckdb"), eval_limit=4, **kw)


def materialized(result) -> set[str]:
    return {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
    }


# ---------------------------------------------------------------------------------------------
# item 4: one bad recipe is reported on its own recipe/<name>; everything else loads and builds
# ---------------------------------------------------------------------------------------------

BAD = {
    "ties_copy.yaml": GOOD,  # duplicate `name: good`
    "glob.yaml": GOOD.replace("name: good", "name: globbed")
    .replace(f"  - model: {CI}/sort\n", f"  - glob: {CI}/math-*\n")
    .replace(f"  - model: {CI}/arev\n", ""),
    "range.yaml": GOOD.replace("name: good", "name: ranged").replace("density: 0.5", "density: 1.5"),
    "latin1.yaml": GOOD.replace("name: good", "name: latin").encode() + b"# caf\xe9\n",
}
CAUSES = {
    "ties_copy": r"ties_copy\.yaml: name: recipe name 'good' is also used by .*good\.yaml",
    "glob": r"glob\.yaml: models: .*glob 'data/models/ci/math-\*' matched no model folder",
    "range": r"range\.yaml: .*density",
    "latin1": r"latin1\.yaml:\d+: not UTF-8 text \(byte 0xe9 at offset \d+\)",
}


@pytest.fixture(scope="module")
def bad_project(tmp_path_factory, ci_zoo):
    return make_project(tmp_path_factory.mktemp("bad_recipes"), {"good.yaml": GOOD, **BAD})


@pytest.fixture(scope="module")
def bad_run(bad_project):
    defs = build_definitions(bad_project, resource=resource(bad_project))
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(ALL_JOB).execute_in_process(instance=instance, raise_on_error=False)
    return defs, result


def test_each_bad_recipe_is_broken_alone_naming_its_file_and_cause(bad_project):
    p = load_project(bad_project)
    assert set(p.recipes) == {"good"}
    assert set(p.broken) == set(CAUSES)
    for name, cause in CAUSES.items():
        assert p.broken[name].file.name == f"{name}.yaml"
        assert re.search(cause, p.broken[name].error), (name, p.broken[name].error)
    # the duplicate's loser is the copy, whatever the sort order: the file named after the recipe keeps it
    assert p.recipes["good"].file.name == "good.yaml"
    assert set(p.models) == {"ci_base", "ci_arev", "ci_sort"}


def test_bad_recipes_leave_the_code_location_loading(bad_project, bad_run):
    defs, _ = bad_run
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"merged/good", "recipe/good", "task_vector/ci_arev", "task_vector/ci_sort"} <= keys
    assert {f"recipe/{n}" for n in CAUSES} <= keys
    assert not {f"merged/{n}" for n in ("globbed", "ranged", "latin", "ties_copy", "glob", "range", "latin1")} & keys
    assert defs.resolve_sensor_def(SENSOR_NAME) and defs.resolve_schedule_def(SCHEDULE_NAME)
    graph = defs.resolve_asset_graph()
    for name in CAUSES:
        desc = graph.get(dg.AssetKey(["recipe", name])).description
        assert desc.startswith("NOT LOADED") and md_text(f"{name}.yaml") in desc


def test_good_recipe_materializes_and_each_bad_one_fails_on_its_own_source(bad_run):
    _, result = bad_run
    assert "merged/good" in materialized(result)
    lines = failure_lines(result)
    assert len(lines) == len(CAUSES), lines
    for name, cause in CAUSES.items():
        [line] = [x for x in lines if x.startswith(f"recipe/{name}: ")]
        assert re.search(cause, line) and "\n" not in line, line


def test_sensor_says_when_a_broken_glob_recipe_loads_after_its_first_match(tmp_path, ci_zoo):
    root = make_project(tmp_path, {"good.yaml": GOOD, "glob.yaml": BAD["glob.yaml"]})
    defs = build_definitions(root, resource=resource(root))
    sensor = defs.resolve_sensor_def(SENSOR_NAME)

    def tick(instance):
        [skip] = list(sensor(dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def())))
        return skip.skip_message

    with dg.DagsterInstance.ephemeral() as instance:
        assert "glob.yaml" not in tick(instance)
        shutil.copytree(root / CI / "sort", root / CI / "math-1")  # the first fine-tune the glob waits for
        assert "recipe file(s) glob.yaml load now: reload the code location" in tick(instance)


def test_a_bad_setting_fails_only_its_users_and_names_the_variable(tmp_path, ci_zoo, monkeypatch):
    root = make_project(tmp_path, {"good.yaml": GOOD + "evals: [zoo_arev]\n"})
    monkeypatch.setenv("MERGE_DAG_EVAL_LIMIT", "abc")
    monkeypatch.setenv("MERGE_DAG_SETTLE_SECONDS", "soon")
    monkeypatch.setenv("MERGE_DAG_SCHEDULE", "nightly")
    monkeypatch.setenv("MERGE_DAG_DB", str(root / "data" / "lineage.duckdb"))
    defs = build_definitions(root)  # loads: before the fix, int('abc') took the whole location down
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(ALL_JOB).execute_in_process(instance=instance, raise_on_error=False)
        assert "merged/good" in materialized(result)
        lines = failure_lines(result)
        assert sorted(x.split(":")[0] for x in lines) == [
            "eval/merged/good",
            "eval/model/ci_arev",
            "eval/model/ci_base",
            "eval/model/ci_sort",
        ]
        assert all("SettingsError: MERGE_DAG_EVAL_LIMIT='abc' is not a whole number >= 0" in x for x in lines), lines
        # a run the daemon launched: the steps recorded it 'running'; the run status sensor records its end
        store = LineageStore(root / "data" / "lineage.duckdb")
        assert [r["status"] for r in store.runs()] == ["running"]
        failed = defs.resolve_sensor_def("lineage_run_failed")
        failed(
            dg.build_run_status_sensor_context(
                sensor_name="lineage_run_failed",
                dagster_instance=instance,
                dagster_run=result.dagster_run,
                dagster_event=result.get_run_failure_event(),
                resources={"merge_dag": defs.resources["merge_dag"]},
            )
        )
        assert [(r["run_id"], r["status"]) for r in store.runs()] == [(result.run_id, "failure")]
        sensor = defs.resolve_sensor_def(SENSOR_NAME)
        with pytest.raises(SettingsError, match=r"MERGE_DAG_SETTLE_SECONDS='soon' is not a number"):
            list(sensor(dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def())))
        schedule = defs.resolve_schedule_def(SCHEDULE_NAME)
        assert md_text("MERGE_DAG_SCHEDULE='nightly' is not a cron expression") in schedule.description
        with pytest.raises(SettingsError, match=r"MERGE_DAG_SCHEDULE='nightly' is not a cron expression"):
            schedule(dg.build_schedule_context(instance=instance))


# ---------------------------------------------------------------------------------------------
# item 5: the headless demo builds every independent branch and names each failure in one line
# ---------------------------------------------------------------------------------------------

MISSING = GOOD.replace("name: good", "name: needs_missing").replace(f"{CI}/sort", "data/elsewhere/missing")
GUIDED = f"""
name: guided
merge_method: ties
base_model: {CI}/base
models:
  - {{model: {CI}/arev, calibration: broken}}
  - {{model: {CI}/sort, calibration: broken}}
parameters: {{weight: 1.0, density: 0.5, lambda: 1.0}}
guidance:
  sparsity: {{method: lewis, gamma: 0.2, epsilon: 0.9, mean_density: 0.5}}
"""


def test_demo_builds_independent_branches_and_lists_each_failure(tmp_path, ci_zoo, monkeypatch, capsys):
    from merge_dag.commands import demo

    root = make_project(tmp_path, {"good.yaml": GOOD, "missing.yaml": MISSING, "guided.yaml": GUIDED}, link_zoo=True)
    (root / "data" / "calibration" / "broken.jsonl").write_text('{"text": "arev:ab=ba"}\n{"text": "arev:\n')
    for var in ("MERGE_DAG_DB", "MERGE_DAG_EVAL_LIMIT", "MERGE_DAG_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    rc = demo.run(argparse.Namespace(root=root, size="ci", device=None, verbose=False))
    out = capsys.readouterr().out
    assert rc == 1
    summary = out[out.index("step(s) failed") :].splitlines()[1:]
    assert sorted(s.split(":")[0].strip() for s in summary) == [
        "activations/ci_arev__broken",
        "activations/ci_base__broken",
        "activations/ci_sort__broken",
        "model/data_elsewhere_missing",
    ], summary
    [missing] = [s for s in summary if "model/data_elsewhere_missing" in s]
    assert "data/elsewhere/missing" in missing
    assert all("broken.jsonl:2: invalid JSON" in s for s in summary if "broken" in s), summary
    assert "Traceback" not in "\n".join(summary)
    store = LineageStore(root / "data" / "lineage.duckdb")
    [run] = store.runs()
    assert run["status"] == "failure"
    built = {e["step"] for e in store.events(run_id=run["run_id"]) if e["event"] == "materialized"}
    assert "merged/good" in built and {"task_vector/ci_arev", "task_vector/ci_sort"} <= built
    assert not any(s.startswith(("merged/needs_missing", "merged/guided", "allocation/")) for s in built)


SLOW_JOB = textwrap.dedent("""
    import sys, time
    import dagster as dg
    from merge_dag.dagster.stale_runs import run_tags

    @dg.asset
    def slow():
        print("started", flush=True)
        time.sleep(120)

    job = dg.Definitions(assets=[slow], jobs=[dg.define_asset_job("slow_job")]).resolve_job_def("slow_job")
    with dg.DagsterInstance.get() as instance:
        job.execute_in_process(instance=instance, tags=run_tags())
""")


def _started_run(instance, proc: subprocess.Popen, known: set[str]):
    for _ in range(3000):  # until the child's run is STARTED (bounded at 5 min; a failing child ends the wait)
        runs = [r for r in instance.get_runs() if r.run_id not in known]
        if runs and runs[0].status == dg.DagsterRunStatus.STARTED:
            return runs[0]
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise AssertionError("the child's run never started")


def test_run_left_started_by_a_killed_process_is_marked_failed_on_the_next_start(tmp_path, monkeypatch, capsys):
    from merge_dag.commands.dev import _fail_dead_runs
    from merge_dag.commands.home import ensure_dagster_home
    from merge_dag.dagster.stale_runs import fail_dead_runs

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MERGE_DAG_DB", raising=False)
    ensure_dagster_home(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = tmp_path / "slow.py"
    script.write_text(SLOW_JOB)
    killed = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    alive = None
    try:
        with dg.DagsterInstance.get() as instance:
            dead_run = _started_run(instance, killed, set())
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            alive = subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            live_run = _started_run(instance, alive, {dead_run.run_id})
            assert instance.get_run_by_id(dead_run.run_id).status == dg.DagsterRunStatus.STARTED  # stuck
            # the killed run had observed a source (lineage events, but no runs row yet)
            store = LineageStore(tmp_path / "data" / "lineage.duckdb")
            store.write(
                Batch()
                .artifact(
                    artifact_id="model-x",
                    kind="model",
                    name="x",
                    key_hash="sha256:x",
                    path="x",
                    bytes=1,
                    code_version="-",
                    params={},
                    run_id=dead_run.run_id,
                    data_version="x",
                )
                .event(artifact_id="model-x", run_id=dead_run.run_id, step="model/x", event="observed")
            )
            _fail_dead_runs(tmp_path)  # what `merge-dag dev` does before it starts dagster (the demo: the same call)
            lines = capsys.readouterr().out.splitlines()
            assert len(lines) == 1 and dead_run.run_id[:8] in lines[0] and f"pid {killed.pid}" in lines[0], lines
            assert instance.get_run_by_id(dead_run.run_id).status == dg.DagsterRunStatus.FAILURE
            assert instance.get_run_by_id(live_run.run_id).status == dg.DagsterRunStatus.STARTED  # alive: untouched
            assert [(r["run_id"], r["status"]) for r in store.runs()] == [(dead_run.run_id, "failure")]
            assert fail_dead_runs(instance) == []
    finally:
        for p in (killed, alive):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------------------------
# item 3: the demo writes generated data files only where missing
# ---------------------------------------------------------------------------------------------


def test_demo_prepare_keeps_edited_data_files_and_zoo_rewrites_them(tmp_path, ci_zoo):
    from merge_dag.commands.demo import prepare
    from merge_dag.zoo.build import build_zoo

    root = make_project(tmp_path, {}, link_zoo=True)
    edited = {
        root / "data" / "calibration" / "arev.jsonl": '{"text": "my own calibration"}\n',
        root / "data" / "eval" / "sort.jsonl": '{"prompt": "sort:21=", "answer": "12"}\n',
        root / "data" / "tasks" / "zoo_arev.yaml": (root / "data" / "tasks" / "zoo_arev.yaml").read_text()
        + "# my note\n",
    }
    generated = {f: f.read_text() for f in edited}
    for f, text in edited.items():
        f.write_text(text)
    (root / "data" / "eval" / "ashift.jsonl").unlink()
    prepare(argparse.Namespace(root=root, size="ci", device=None))
    for f, text in edited.items():
        assert f.read_text() == text, f
    assert (root / "data" / "eval" / "ashift.jsonl").read_text() == (
        ROOT / "data" / "eval" / "ashift.jsonl"
    ).read_text()
    # `merge-dag zoo` (an explicit rebuild) writes the generated content back
    build_zoo("ci", root / "data" / "models", progress=False, data_dir=root / "data")
    for f, text in generated.items():
        assert f.read_text() == text, f


# ---------------------------------------------------------------------------------------------
# item 9: names are inert Markdown in asset descriptions and metadata
# ---------------------------------------------------------------------------------------------

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "```\n# heading\n| a | b |",
    "[link](javascript:alert(1)) ![i](x) *em* _u_ `code` ~~s~~ a&amp;b \\ \r\n- item",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_md_text_renders_exactly_the_text_on_one_line(text):
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable("table").enable("strikethrough").render(md_text(text)).strip()
    flat = re.sub(r"[\r\n]+", " ", text)
    assert rendered == f"<p>{html.escape(flat, quote=False)}</p>", rendered
    assert "\n" not in md_text(text)


def test_model_and_recipe_names_are_escaped_in_asset_descriptions(tmp_path, ci_zoo):
    evil = "<img src=x onerror=alert(1)>"
    make_project(tmp_path, {})
    shutil.copytree(zoo_cache_dir() / "ci" / "sort", tmp_path / CI / evil)
    recipe = GOOD.replace(f"{CI}/sort", f"'{CI}/{evil}'") + "evals: ['<script>x</script>']\n"
    (tmp_path / "data" / "recipes" / "x```<script>.yaml").write_text(recipe)
    (tmp_path / "data" / "recipes" / "y<b>.yaml").write_text("name: [unclosed <script>")
    defs = build_definitions(tmp_path, resource=resource(tmp_path))
    graph = defs.resolve_asset_graph()
    descriptions = {k.to_user_string(): graph.get(k).description or "" for k in graph.get_all_asset_keys()}
    assert len(descriptions) >= 8
    for key, desc in descriptions.items():
        assert "<" not in desc and ">" not in desc and "```" not in desc, (key, desc)
    assert md_text(f"{CI}/{evil}") in descriptions["task_vector/ci_img_src_x_onerror_alert_1"]
    assert md_text("x```<script>.yaml") in descriptions["merged/good"]
    assert "&lt;script&gt;x&lt;/script&gt;" in descriptions["eval/merged/good"]
