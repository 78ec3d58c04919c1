"""Scale-out on Celery through dagster-celery, with a real broker: redis-server on a loopback port and
two `merge-dag worker` processes (gpu: one step at a time, cpu), each in its own working directory,
sharing one artifacts folder. The ci demo graph through them has exactly the lineage of an in-process
run; torch steps ran on the gpu worker, the rest on the cpu worker; a merge whose worker process is
killed -9 part-way shows nothing under its final key, runs again, and the next run is all cache hits.
Skipped only where redis-server is not installed (CI installs it: .ci/run)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from _celery import children, have_redis, redis_server, start_worker, stop, wait_ready
from conftest import make_project

from merge_dag.cli import main as cli_main
from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.fingerprint import checkpoint_fingerprint
from merge_dag.dagster.definitions import ALL_JOB, build_definitions, reconstructable_merge_all
from merge_dag.dagster.resources import GPU_QUEUE, QUEUE_TAG
from merge_dag.lineage.audit import audit
from merge_dag.lineage.store import LineageStore

pytestmark = [
    pytest.mark.celery,
    pytest.mark.skipif(not have_redis(), reason="redis-server is not installed (.ci/run installs it)"),
    pytest.mark.timeout(1800),  # ~3 min in CI (2 cores); a loaded machine is slower
]

ROOT = Path(__file__).resolve().parents[1]
EVAL_LIMIT = "12"
GPU, CPU = "gpu@merge-dag-test", "cpu@merge-dag-test"


def test_worker_options_are_checked_in_one_line(capsys):
    assert cli_main(["worker", "--queue", "gpu", "--concurrency", "2"]) == 2
    assert capsys.readouterr().err == "error: --concurrency 2: a gpu worker takes one step at a time (1)\n"
    assert cli_main(["worker", "--queue", "cpu", "--concurrency", "0"]) == 2
    assert capsys.readouterr().err == "error: --concurrency 0: must be >= 1\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """redis + a gpu worker and a cpu worker (2 processes), in different working directories; the
    artifacts folder and the lineage database path are shared (the env of every process)."""
    base = tmp_path_factory.mktemp("celery")
    shared = base / "shared"
    env = {
        "MERGE_DAG_ARTIFACTS": str(shared / "artifacts"),
        "MERGE_DAG_DB": str(shared / "lineage.duckdb"),
        "MERGE_DAG_EVAL_LIMIT": EVAL_LIMIT,
        "MERGE_DAG_CACHE": str(base / "fp-cache"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    (base / "dagster_home").mkdir()
    with redis_server(base / "redis") as url:
        procs = {
            GPU: start_worker("gpu", url, base / "worker-gpu", env, GPU),
            CPU: start_worker("cpu", url, base / "worker-cpu", env, CPU, concurrency=2),
        }
        try:
            wait_ready(url, list(procs), list(procs.values()))
            with dg.instance_for_test(temp_dir=str(base / "dagster_home")) as instance:
                yield {"url": url, "procs": procs, "env": env, "shared": shared, "base": base, "instance": instance}
        finally:
            for p in procs.values():
                stop(p)
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def celery_run(root: Path, cluster) -> dg.ExecutionResult:
    return dg.execute_job(
        reconstructable_merge_all(root),
        instance=cluster["instance"],
        run_config={"execution": {"config": {"celery": {"broker": cluster["url"]}}}},
        raise_on_error=False,
    )


def worker_of_each_step(result) -> dict[str, str]:
    """step key -> the Celery worker (node name) that ran it, from dagster-celery's engine events."""
    out = {}
    for e in result.all_events:
        md = getattr(e.event_specific_data, "metadata", None) or {}
        if e.event_type_value == "ENGINE_EVENT" and "Celery worker" in md:
            out[e.step_key] = md["Celery worker"].value
    return out


LINEAGE_SQL = {
    "artifacts": "SELECT artifact_id, kind, name, key_hash, data_version, code_version, params_json, path "
    "FROM artifacts",
    "edges": "SELECT parent_id, child_id, role, fingerprint FROM edges",
    "events": "SELECT artifact_id, step, event FROM events",
    "metrics": "SELECT artifact_id, model, task, metric, value, stderr, n FROM metrics",
}


def lineage_rows(db: Path, artifacts: Path) -> dict[str, list]:
    """Every lineage row that does not depend on when or in which process it was written (paths
    inside the artifacts folder relative to it), sorted."""
    store = LineageStore(db)
    out = {}
    for table, sql in LINEAGE_SQL.items():
        rows = []
        for r in store.query(sql):
            r = {k: v.replace(str(artifacts), "<artifacts>") if isinstance(v, str) else v for k, v in r.items()}
            rows.append(tuple(sorted(r.items())))
        out[table] = sorted(rows)
    return out


# ---------------------------------------------------------------------------------------------
# the ci demo graph through two workers
# ---------------------------------------------------------------------------------------------


def test_ci_demo_graph_through_two_workers_has_the_lineage_of_an_in_process_run(cluster, ci_zoo, tmp_path):
    recipes = {p.name: p.read_text() for p in sorted((ROOT / "data" / "recipes").glob("*.yaml"))}
    root = make_project(tmp_path / "project", recipes, models=("base", "arev", "ashift", "sort"))
    inproc_art, inproc_db = tmp_path / "inproc" / "artifacts", tmp_path / "inproc" / "lineage.duckdb"

    # the reference: in-process, its own artifacts and database
    os.environ.update({"MERGE_DAG_ARTIFACTS": str(inproc_art), "MERGE_DAG_DB": str(inproc_db)})
    try:
        reference = build_definitions(root).resolve_job_def(ALL_JOB).execute_in_process(instance=cluster["instance"])
    finally:
        os.environ.update(cluster["env"])
    assert reference.success

    result = celery_run(root, cluster)
    assert result.success
    shared_art, shared_db = cluster["shared"] / "artifacts", cluster["shared"] / "lineage.duckdb"

    # routing: the torch steps ran on the gpu worker, every other step on the cpu worker
    job = build_definitions(root).resolve_job_def(ALL_JOB)
    expected = {
        name: GPU if node.tags.get(QUEUE_TAG) == GPU_QUEUE else CPU for name, node in job.graph.node_dict.items()
    }
    ran = worker_of_each_step(result)
    assert ran == expected
    assert {GPU, CPU} == set(ran.values()) and sum(w == GPU for w in ran.values()) >= 20
    # ... in the pool processes of those workers (the pid Dagster recorded at each step's start)
    pools = {name: set(children(p.pid)) for name, p in cluster["procs"].items()}
    for e in result.all_events:
        if e.event_type_value == "STEP_START":
            assert e.pid in pools[ran[e.step_key]], (e.step_key, e.pid, pools)
    # ... the gpu worker one step at a time
    spans = {}
    for r in cluster["instance"].all_logs(result.run_id):
        e = r.dagster_event
        if e and ran.get(e.step_key) == GPU and e.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            spans.setdefault(e.step_key, []).append(r.timestamp)
    assert set(spans) == {k for k, w in ran.items() if w == GPU} and all(len(t) == 2 for t in spans.values())
    intervals = sorted((min(t), max(t)) for t in spans.values())
    assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:]))

    # lineage: the workers spooled, the coordinator ingested; the rows are those of the in-process run
    celery_rows, reference_rows = lineage_rows(shared_db, shared_art), lineage_rows(inproc_db, inproc_art)
    assert celery_rows == reference_rows
    counts = {t: len(r) for t, r in celery_rows.items()}
    assert counts["events"] > 40 and counts["edges"] > 40 and counts["metrics"] > 0
    spooled = sorted((shared_art / "_lineage_spool").glob("*.json"))
    assert len(spooled) == len(LineageStore(shared_db).query("SELECT * FROM spool_ingested")) > 40
    # a re-ingest (the CLI; the sensors do the same) writes nothing twice
    assert cli_main(["ingest", "--root", str(root)]) == 0
    assert lineage_rows(shared_db, shared_art) == reference_rows
    # and the audit answers the same
    for name in (p.removesuffix(".yaml") for p in recipes):
        a = audit(LineageStore(shared_db), name).replace(str(shared_art), "<artifacts>")
        b = audit(LineageStore(inproc_db), name).replace(str(inproc_art), "<artifacts>")
        # when and in which run each database first saw an artifact differ; nothing else may
        when = re.compile(r"created \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC|run [0-9a-f]{8}\b")
        assert when.sub("", a) == when.sub("", b)
        assert f"merged/{name}" in a


# ---------------------------------------------------------------------------------------------
# a worker process killed -9 in the middle of a merge
# ---------------------------------------------------------------------------------------------

TA = """
name: ta
merge_method: task_arithmetic
base_model: data/models/ci/base
models:
  - model: data/models/ci/arev
  - model: data/models/ci/ashift
  - model: data/models/ci/sort
parameters: {weight: 1.0, lambda: 0.5}
"""

# the gpu worker of the fault test: the first merge it runs writes a marker (its pid, its staging
# folder) after 3 tensors and waits there to be killed; the merge run again after that goes through
PAUSE = """
import os, time
import merge_dag.dagster.assets.merges as merges
_execute = merges.execute
def execute(plan, target, **kw):
    marker = os.environ["MERGE_DAG_TEST_MARKER"]
    def on_tensor(done, total):
        if done == 3 and not os.path.exists(marker):
            with open(marker + ".tmp", "w") as f:
                f.write(f"{os.getpid()} {target}")
            os.rename(marker + ".tmp", marker)
            time.sleep(600)
    return _execute(plan, target, on_tensor=on_tensor, **kw)
merges.execute = execute
"""


def test_worker_killed_mid_merge_leaves_no_artifact_the_step_runs_again_then_all_cache_hits(cluster, ci_zoo, tmp_path):
    root = make_project(
        tmp_path / "project", {"ta.yaml": TA}, models=("base", "arev", "ashift", "sort"), data=("tasks",)
    )
    marker = tmp_path / "paused"
    env = {**cluster["env"], "MERGE_DAG_TEST_MARKER": str(marker)}
    name = "gpu-fault@merge-dag-test"
    # this test's gpu worker replaces the module's for the time of the test
    stop(cluster["procs"][GPU])
    worker = start_worker("gpu", cluster["url"], tmp_path / "worker", env, name, prelude=PAUSE)
    seen = {}

    def kill_when_paused() -> None:
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid, target = marker.read_text().split(" ", 1)
        merged = cluster["shared"] / "artifacts" / "merged"
        # the merge writes under hidden staging names beside the artifact and renames at the end
        staging = [p for p in merged.iterdir() if p.name.startswith(".") and ".ta-" in p.name]
        seen["staging"] = sorted(p.name for p in staging)
        seen["staging_files"] = sum(1 for d in staging for p in d.rglob("*") if p.is_file())
        seen["target_in_merged"] = Path(target).parent == merged and Path(target).name.startswith(".ta-")
        seen["final_while_writing"] = [p.name for p in merged.iterdir() if p.name.startswith("ta-")]
        seen["pool_pid"] = int(pid) in children(worker.pid)
        os.kill(int(pid), signal.SIGKILL)
        seen["killed"] = int(pid)

    try:
        wait_ready(cluster["url"], [name], [worker])
        killer = threading.Thread(target=kill_when_paused, daemon=True)
        killer.start()
        result = celery_run(root, cluster)
        killer.join(timeout=10)
        assert seen["pool_pid"] and seen["killed"] and seen["target_in_merged"], seen
        assert seen["staging"] and seen["staging_files"] > 0, seen  # it was writing
        assert seen["final_while_writing"] == []  # nothing under a final key while the merge was writing
        # Celery put the step back on its queue (acks_late, reject_on_worker_lost): it ran again, to the end
        assert result.success
        # (the killed attempt's events reached the instance, not the coordinator's result)
        starts = [
            r.dagster_event
            for r in cluster["instance"].all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_START)
            if r.dagster_event.step_key == "merged__ta"
        ]
        assert len(starts) == 2 and starts[0].pid == seen["killed"] and starts[1].pid != seen["killed"]
        (final,) = [p for p in (cluster["shared"] / "artifacts" / "merged").iterdir() if p.name.startswith("ta-")]
        store = LineageStore(cluster["shared"] / "lineage.duckdb")
        (mat,) = [e for e in store.events(run_id=result.run_id) if e["step"] == "merged/ta"]
        assert mat["event"] == "materialized" and store.find("ta")["path"] == str(final)
        # the merged checkpoint is whole: the fingerprint the step recorded is that of the files
        fp = {
            tuple(m.asset_key.path): m.metadata["output_fingerprint"].value
            for m in (e.event_specific_data.materialization for e in result.all_events if e.is_step_materialization)
            if m.asset_key.path[0] == "merged"
        }
        assert fp[("merged", "ta")] == checkpoint_fingerprint(final)
        assert len(Checkpoint(final).tensors) > 3
        # what stays is the killed attempt's hidden staging folder, and only that
        left = [p.name for p in final.parent.iterdir() if p.name.startswith(".") and ".ta-" in p.name]
        assert left and all(f".tmp-{seen['killed']}-" in n for n in left), left

        again = celery_run(root, cluster)
        assert again.success
        events = store.events(run_id=again.run_id)
        assert {e["event"] for e in events} == {"cache_hit", "observed"}
        assert {e["step"] for e in events if e["event"] == "cache_hit"} == {
            "task_vector/ci_arev",
            "task_vector/ci_ashift",
            "task_vector/ci_sort",
            "merged/ta",
        }
    finally:
        stop(worker)
        shutil.rmtree(tmp_path / "project", ignore_errors=True)
