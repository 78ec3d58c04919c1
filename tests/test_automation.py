"""Automation: the checkpoint sensor (half-copied folders trigger nothing; a complete new checkpoint
triggers exactly its dependents), the nightly schedule, and torch steps under a concurrency pool."""

import json
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest

from merge_dag.dagster.definitions import ALL_JOB, build_definitions, reconstructable_merge_all
from merge_dag.dagster.resources import MergeDagResource
from merge_dag.dagster.schedules import SCHEDULE_NAME
from merge_dag.dagster.sensors import SENSOR_NAME
from merge_dag.dagster.watch import affected_keys, evaluate_models
from merge_dag.lineage.store import LineageStore
from merge_dag.project import load_project
from merge_dag.zoo.tokenizer import save_tokenizer

from _models import make_family

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "mix": """
name: mix
merge_method: task_arithmetic
base_model: data/models/base
models: [{model: data/models/a}, {model: data/models/b}]
parameters: {weight: 1.0, lambda: 0.5}
evals: [zoo_arev]
""",
    "other": """
name: other
merge_method: ties
base_model: data/models/base
models: [{model: data/models/c}, {model: data/models/b}]
parameters: {weight: 1.0, density: 0.5}
""",
}


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_DAG_CACHE", str(tmp_path / "fp-cache"))
    root = tmp_path / "proj"
    fam = make_family(root / "data" / "models", n_experts=3)
    for old, new in (("e0", "a"), ("e1", "b"), ("e2", "c")):
        fam[old].rename(root / "data" / "models" / new)
    for name in ("base", "a", "b", "c"):
        save_tokenizer(root / "data" / "models" / name)
    for folder in ("tasks", "eval"):
        shutil.copytree(ROOT / "data" / folder, root / "data" / folder)
    (root / "data" / "recipes").mkdir()
    for name, text in RECIPES.items():
        (root / "data" / "recipes" / f"{name}.yaml").write_text(text)
    return root


def keys(ks):
    return {k.to_user_string() for k in ks}


def affected(p, model: str) -> list[dg.AssetKey]:
    """watch.affected_keys on the project's own asset graph (the sensor passes its repository's)."""
    return affected_keys(p, model, build_definitions(project=p).resolve_asset_graph())


def test_affected_keys_are_exactly_the_dependents(project):
    p = load_project(project)
    assert keys(affected(p, "a")) == {
        "model/a",
        "task_vector/a",
        "recipe/mix",
        "merged/mix",
        "eval/merged/mix",
        "eval/model/a",
        "leaderboard",
    }
    assert keys(affected(p, "c")) == {"model/c", "task_vector/c", "recipe/other", "merged/other"}
    assert "merged/other" in keys(affected(p, "b")) and "merged/mix" in keys(affected(p, "b"))


def test_half_copied_checkpoint_triggers_nothing_until_complete(project):
    p = load_project(project)
    changed, cursor = evaluate_models(p, {}, now=0.0, settle_seconds=10)
    assert changed == [] and set(cursor) == {"base", "a", "b", "c"}  # first sight: baseline only

    shard = project / "data" / "models" / "c" / "model.safetensors"
    full = shard.read_bytes()
    from safetensors.torch import load_file, save_file

    state = load_file(str(shard))
    state["lm_head.weight"] = state["lm_head.weight"] + 0.5
    tmp = project / "new.safetensors"
    save_file(state, str(tmp), metadata={"format": "pt"})
    new_bytes = tmp.read_bytes()
    shard.write_bytes(new_bytes[: len(new_bytes) // 2])  # the copy is half-way

    changed, cursor = evaluate_models(p, cursor, now=100.0, settle_seconds=10)
    assert changed == []  # signature changed: the settle clock starts
    changed, cursor = evaluate_models(p, cursor, now=200.0, settle_seconds=10)
    assert changed == []  # stable, but the file is truncated: not a complete checkpoint
    shard.write_bytes(new_bytes)  # the copy finishes
    changed, cursor = evaluate_models(p, cursor, now=201.0, settle_seconds=10)
    assert changed == []  # just changed: wait for it to settle
    changed, cursor = evaluate_models(p, cursor, now=205.0, settle_seconds=10)
    assert changed == []  # not yet settled
    changed, cursor = evaluate_models(p, cursor, now=212.0, settle_seconds=10)
    assert changed == ["c"]
    changed, cursor = evaluate_models(p, cursor, now=300.0, settle_seconds=10)
    assert changed == []  # seen once, requested once
    assert len(full) == len(new_bytes)


def test_sensor_run_request_rebuilds_exactly_the_affected_assets(project, tmp_path):
    res = MergeDagResource(
        root=str(project), eval_limit=4, db_path=str(tmp_path / "l.duckdb"), artifacts_dir=str(tmp_path / "artifacts")
    )
    defs = build_definitions(project, resource=res)
    job = defs.resolve_job_def(ALL_JOB)
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(instance=instance).success
        sensor = defs.get_sensor_def(SENSOR_NAME)
        ctx = dg.build_sensor_context(instance=instance, definitions=defs)
        first = sensor.evaluate_tick(ctx)  # baseline
        assert not first.run_requests
        # a brand-new version of expert a lands, complete
        shard = project / "data" / "models" / "a" / "model.safetensors"
        from safetensors.torch import load_file, save_file

        state = load_file(str(shard))
        state["model.norm.weight"] = state["model.norm.weight"] * 2
        save_file(state, str(shard), metadata={"format": "pt"})
        cursor = json.loads(first.cursor)
        cursor["a"]["since"] -= 3600  # pretend the signature was first seen an hour ago ...
        cursor["a"]["sig"] = json.loads(
            json.dumps(
                sorted([q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in shard.parent.iterdir() if q.is_file())
            )
        )
        ctx = dg.build_sensor_context(instance=instance, definitions=defs, cursor=json.dumps(cursor))
        tick = sensor.evaluate_tick(ctx)  # ... so it is settled now
        assert len(tick.run_requests) == 1
        req = tick.run_requests[0]
        assert keys(req.asset_selection) == {
            "model/a",
            "task_vector/a",
            "recipe/mix",
            "merged/mix",
            "eval/merged/mix",
            "eval/model/a",
            "leaderboard",
        }
        result = job.execute_in_process(instance=instance, asset_selection=req.asset_selection, tags=req.tags)
        assert result.success
        built = {
            e["step"]
            for e in LineageStore(tmp_path / "l.duckdb").events(run_id=result.run_id)
            if e["event"] == "materialized"
        }
        assert built == {"task_vector/a", "merged/mix", "eval/merged_mix", "eval/model_a", "leaderboard/leaderboard"}


def test_schedule_requests_a_full_rebuild(project):
    defs = build_definitions(project)
    schedule = defs.get_schedule_def(SCHEDULE_NAME)
    assert schedule.cron_schedule == "0 3 * * *" and schedule.job_name == ALL_JOB
    with dg.instance_for_test() as instance:
        data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert len(data.run_requests) == 1
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert defs.get_sensor_def(SENSOR_NAME).default_status == dg.DefaultSensorStatus.RUNNING


def test_torch_steps_run_one_at_a_time_under_the_pool(project, tmp_path, monkeypatch):
    """Multiprocess executor, 4 slots, but merges and task vectors share pool 'gpu' of limit 1.

    (One recipe only: a step blocked on a pool polls with a back-off of up to 15 s in Dagster.)"""
    (project / "data" / "recipes" / "mix.yaml").unlink()
    monkeypatch.setenv("MERGE_DAG_POOL", "gpu")
    monkeypatch.setenv("MERGE_DAG_ROOT", str(project))
    monkeypatch.setenv("MERGE_DAG_DB", str(tmp_path / "pool.duckdb"))
    monkeypatch.setenv("MERGE_DAG_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MERGE_DAG_EVAL_LIMIT", "4")
    defs = build_definitions(project)
    pooled = [a for a in defs.assets if getattr(a, "op", None) is not None and a.op.pool == "gpu"]
    assert len(pooled) == 3  # task_vector/c, task_vector/b, merged/other
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        result = dg.execute_job(
            reconstructable_merge_all(project),
            instance=instance,
            run_config={"execution": {"config": {"multiprocess": {"max_concurrent": 4}}}},
        )
        assert result.success
        spans = {}
        for e in instance.all_logs(result.run_id):
            if e.dagster_event is None or e.step_key is None:
                continue
            if e.dagster_event.event_type_value == "STEP_START":
                spans.setdefault(e.step_key, [None, None])[0] = e.timestamp
            elif e.dagster_event.event_type_value == "STEP_SUCCESS":
                spans.setdefault(e.step_key, [None, None])[1] = e.timestamp
    pooled_ops = {a.op.name for a in pooled}
    torch_steps = sorted(v for k, v in spans.items() if k in pooled_ops)
    assert len(torch_steps) == 3
    for (_, e1), (s2, _) in zip(torch_steps, torch_steps[1:]):
        assert s2 >= e1, "two pooled steps overlapped"


GLOB_RECIPE = """
name: globbed
merge_method: task_arithmetic
base_model: data/models/base
models:
  - glob: data/models/g-*
    parameters: {weight: 1.0}
parameters: {lambda: 0.5}
"""


def test_glob_recipe_picks_up_a_new_expert(project, tmp_path):
    models = project / "data" / "models"
    shutil.copytree(models / "c", models / "g-1")
    (project / "data" / "recipes" / "globbed.yaml").write_text(GLOB_RECIPE)
    res = MergeDagResource(
        root=str(project), db_path=str(tmp_path / "g.duckdb"), artifacts_dir=str(tmp_path / "artifacts")
    )
    p = load_project(project)
    loaded = build_definitions(project, resource=res)  # the code location, loaded before g-2 exists
    assert [e.ref for e in p.recipes["globbed"].experts] == ["data/models/g-1"]
    changed, cursor = evaluate_models(p, {}, now=0.0, settle_seconds=10)
    assert changed == [] and "g_1" in cursor

    # a new fine-tune lands in the watched folder: copied under a hidden name, then renamed
    shutil.copytree(models / "b", models / ".g-2.tmp-copy")
    changed, cursor = evaluate_models(p, cursor, now=50.0, settle_seconds=10)
    assert changed == [] and "g_2" not in cursor  # hidden folders never match a glob
    (models / ".g-2.tmp-copy").rename(models / "g-2")
    changed, cursor = evaluate_models(p, cursor, now=100.0, settle_seconds=10)
    assert changed == []  # first seen now: it must settle
    changed, cursor = evaluate_models(p, cursor, now=111.0, settle_seconds=10)
    assert changed == ["g_2"]
    assert keys(affected(p, "g_2")) == {"recipe/globbed", "merged/globbed"}

    with dg.instance_for_test() as instance:
        # the run the sensor requests, on the graph loaded before g-2 existed: the merge takes both
        # experts and builds the newcomer's task vector inside its step
        result = loaded.resolve_job_def(ALL_JOB).execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(["task_vector", "g_1"])] + affected(p, "g_2")
        )
        assert result.success
        mats = {
            tuple(e.event_specific_data.materialization.asset_key.path): e.event_specific_data.materialization
            for e in result.get_asset_materialization_events()
        }
        assert mats[("merged", "globbed")].metadata["experts"].value == ["data/models/g-1", "data/models/g-2"]
        steps = {
            e["step"]
            for e in LineageStore(tmp_path / "g.duckdb").events(run_id=result.run_id)
            if e["event"] == "materialized"
        }
        assert steps == {"task_vector/g_1", "task_vector/g_2", "merged/globbed"}
        # after a reload the graph shows the newcomer's own task vector asset: a cache hit
        reloaded = build_definitions(project, resource=res)
        assert dg.AssetKey(["task_vector", "g_2"]) in reloaded.resolve_asset_graph().get_all_asset_keys()
        again = reloaded.resolve_job_def(ALL_JOB).execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(["task_vector", "g_2"]), dg.AssetKey(["merged", "globbed"])]
        )
        assert again.success
        events = LineageStore(tmp_path / "g.duckdb").events(run_id=again.run_id)
        assert {e["step"] for e in events if e["event"] == "cache_hit"} == {"task_vector/g_2", "merged/globbed"}
        assert not [e for e in events if e["event"] == "materialized"]


def test_new_expert_builds_when_the_run_reimports_the_definitions_and_the_sensor_fills_in_the_rest(project, tmp_path):
    """Under `dagster dev` each run re-imports the definitions after the newcomer landed: its
    task_vector and baseline eval exist in that graph but were never built. The merge builds the
    task vector inline, the leaderboard leaves the missing baseline out, and once the code location
    reloads the sensor requests the newcomer's never-built assets by itself."""
    models = project / "data" / "models"
    shutil.copytree(models / "c", models / "g-1")
    (project / "data" / "recipes" / "globbed.yaml").write_text(GLOB_RECIPE + "evals: [zoo_arev]\n")
    res = MergeDagResource(
        root=str(project), db_path=str(tmp_path / "g.duckdb"), artifacts_dir=str(tmp_path / "artifacts"), eval_limit=4
    )
    p = load_project(project)  # the code server's view, before g-2
    loaded = build_definitions(project, resource=res)
    with dg.instance_for_test() as instance:
        assert loaded.resolve_job_def(ALL_JOB).execute_in_process(instance=instance).success
        sensor = loaded.get_sensor_def(SENSOR_NAME)
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=loaded))
        assert not first.run_requests
        shutil.copytree(models / "b", models / "g-2")
        cursor = json.loads(first.cursor)
        _, cursor = evaluate_models(p, cursor, now=time.time() - 100, settle_seconds=10)  # first seen
        tick = sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, definitions=loaded, cursor=json.dumps(cursor))
        )
        assert len(tick.run_requests) == 1
        req = tick.run_requests[0]
        assert keys(req.asset_selection) == {"recipe/globbed", "merged/globbed", "eval/merged/globbed", "leaderboard"}
        fresh = build_definitions(project, resource=res)  # the run worker's import, after g-2 landed
        result = fresh.resolve_job_def(ALL_JOB).execute_in_process(
            instance=instance, asset_selection=req.asset_selection, raise_on_error=False
        )
        failures = [e.event_specific_data.error.message for e in result.all_events if e.is_step_failure]
        assert result.success, failures
        events = LineageStore(tmp_path / "g.duckdb").events(run_id=result.run_id)
        assert {e["step"] for e in events if e["event"] == "materialized"} == {
            "task_vector/g_2",
            "merged/globbed",
            "eval/merged_globbed",
            "leaderboard/leaderboard",
        }
        assert "model/g_2" in {e["step"] for e in events if e["event"] == "observed"}  # provenance of the newcomer
        # the code location reloads (`fresh`): the sensor now asks once for g-2's never-built assets
        tick2 = fresh.get_sensor_def(SENSOR_NAME).evaluate_tick(
            dg.build_sensor_context(instance=instance, definitions=fresh, cursor=tick.cursor)
        )
        assert len(tick2.run_requests) == 1
        assert keys(tick2.run_requests[0].asset_selection) == {"task_vector/g_2", "eval/model/g_2", "leaderboard"}
        again = fresh.resolve_job_def(ALL_JOB).execute_in_process(
            instance=instance, asset_selection=tick2.run_requests[0].asset_selection
        )
        assert again.success
        events = LineageStore(tmp_path / "g.duckdb").events(run_id=again.run_id)
        assert {e["step"] for e in events if e["event"] == "cache_hit"} == {"task_vector/g_2"}  # built inline before
        board = [
            e.event_specific_data.materialization
            for e in again.get_asset_materialization_events()
            if e.event_specific_data.materialization.asset_key.path == ["leaderboard"]
        ][0]
        assert "model/g_2" in {r.data["model"] for r in board.metadata["all_metrics"].value.records}
        tick3 = fresh.get_sensor_def(SENSOR_NAME).evaluate_tick(
            dg.build_sensor_context(instance=instance, definitions=fresh, cursor=tick2.cursor)
        )
        assert not tick3.run_requests  # nothing left to build


GUIDED_RECIPE = """
name: guided
merge_method: ties
base_model: data/models/base
models: [{model: data/models/a, calibration: arev}, {model: data/models/b, calibration: sort}]
parameters: {weight: 1.0, density: 0.5}
guidance: {sparsity: {gamma: 0.3, epsilon: 0.7}}
"""


def test_affected_keys_include_the_guidance_statistics_of_a_changed_expert(project):
    shutil.copytree(ROOT / "data" / "calibration", project / "data" / "calibration")
    (project / "data" / "recipes" / "guided.yaml").write_text(GUIDED_RECIPE)
    p = load_project(project)
    assert keys(affected(p, "a")) == {
        "model/a",
        "recipe/mix",
        "recipe/guided",
        "task_vector/a",
        "merged/mix",
        "eval/merged/mix",
        "eval/model/a",
        "leaderboard",
        "activations/a__arev",
        "importance/a__arev",
        "allocation/guided",
        "merged/guided",
    }


def _newcomer_after_reload(project, tmp_path, partial_copy: bool):
    """Drop g-2 into the glob (in one go, or first a config only then the rest), let the sensor request
    the merge, then 'reload' (fresh definitions) and return (fresh defs, instance, cursor before reload tick)."""
    models = project / "data" / "models"
    shutil.copytree(models / "c", models / "g-1")
    (project / "data" / "recipes" / "globbed.yaml").write_text(GLOB_RECIPE + "evals: [zoo_arev]\n")
    p = load_project(project)
    loaded = build_definitions(project)
    instance = dg.DagsterInstance.ephemeral()
    first = loaded.get_sensor_def(SENSOR_NAME).evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=loaded)
    )
    cursor = json.loads(first.cursor)
    t = time.time()
    if partial_copy:  # a copy still in progress when the sensor first sees the folder
        (models / "g-2").mkdir()
        shutil.copy2(models / "b" / "config.json", models / "g-2" / "config.json")
        _, cursor = evaluate_models(p, cursor, now=t - 200, settle_seconds=10)
        shutil.copytree(models / "b", models / "g-2", dirs_exist_ok=True)
        _, cursor = evaluate_models(p, cursor, now=t - 100, settle_seconds=10)
    else:
        shutil.copytree(models / "b", models / "g-2")
        _, cursor = evaluate_models(p, cursor, now=t - 100, settle_seconds=10)
    tick = loaded.get_sensor_def(SENSOR_NAME).evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=loaded, cursor=json.dumps(cursor))
    )
    assert len(tick.run_requests) == 1  # the merge of the glob recipe
    fresh = build_definitions(project)
    for k in fresh.resolve_asset_graph().materializable_asset_keys:  # everything else built (no need to execute)
        if "g_2" not in k.path[-1]:
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=k))
    return fresh, instance, tick.cursor


def test_fill_in_request_is_not_repeated_while_its_run_is_in_flight(project, tmp_path):
    fresh, instance, cursor = _newcomer_after_reload(project, tmp_path, partial_copy=False)
    sensor = fresh.get_sensor_def(SENSOR_NAME)
    tick2 = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=fresh, cursor=cursor))
    assert len(tick2.run_requests) == 1
    assert keys(tick2.run_requests[0].asset_selection) == {"task_vector/g_2", "eval/model/g_2", "leaderboard"}
    # the run is in flight: its first step has materialized, the others not yet
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=["task_vector", "g_2"]))
    tick3 = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=fresh, cursor=tick2.cursor))
    assert not tick3.run_requests, [(r.run_key, keys(r.asset_selection)) for r in tick3.run_requests]


def test_newcomer_seen_mid_copy_still_gets_its_assets_after_reload(project, tmp_path):
    fresh, instance, cursor = _newcomer_after_reload(project, tmp_path, partial_copy=True)
    tick2 = fresh.get_sensor_def(SENSOR_NAME).evaluate_tick(
        dg.build_sensor_context(instance=instance, definitions=fresh, cursor=cursor)
    )
    assert len(tick2.run_requests) == 1
    assert keys(tick2.run_requests[0].asset_selection) == {"task_vector/g_2", "eval/model/g_2", "leaderboard"}


def test_an_edited_calibration_set_triggers_exactly_its_dependents(project, tmp_path):
    shutil.copytree(ROOT / "data" / "calibration", project / "data" / "calibration")
    (project / "data" / "recipes" / "guided.yaml").write_text(GUIDED_RECIPE)
    defs = build_definitions(project)
    sensor = defs.get_sensor_def(SENSOR_NAME)
    with dg.instance_for_test() as instance:
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
        assert not first.run_requests and "calibration:arev" in json.loads(first.cursor)
        cal = project / "data" / "calibration" / "arev.jsonl"
        cal.write_text(cal.read_text()[: len(cal.read_text()) // 2])  # half written: not valid jsonl
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs, cursor=first.cursor))
        cursor = json.loads(tick.cursor)
        cursor["calibration:arev"]["since"] -= 3600  # settled, but still half written
        tick = sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, definitions=defs, cursor=json.dumps(cursor))
        )
        assert not tick.run_requests
        shutil.copy2(ROOT / "data" / "calibration" / "arev.jsonl", cal)
        with cal.open("a") as f:
            f.write(json.dumps({"text": "arev:abc=cba"}) + "\n")
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs, cursor=tick.cursor))
        cursor = json.loads(tick.cursor)
        cursor["calibration:arev"]["since"] -= 3600
        tick = sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, definitions=defs, cursor=json.dumps(cursor))
        )
        assert len(tick.run_requests) == 1
        assert keys(tick.run_requests[0].asset_selection) == {
            "calibration/arev",
            "activations/base__arev",
            "activations/a__arev",
            "importance/a__arev",
            "allocation/guided",
            "merged/guided",
        }
