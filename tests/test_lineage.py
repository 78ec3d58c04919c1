"""The DuckDB lineage store and `merge-dag audit`, on real database files: schema, upserts, provenance
trees, lookups, audit text (with and without database records), and several processes writing the
one file at once, as Dagster's multiprocess executor does."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from merge_dag.cli import main as cli_main
from merge_dag.core.errors import MergeDagError
from merge_dag.lineage import engine as engine_mod
from merge_dag.lineage.audit import audit, format_audit
from merge_dag.lineage.batch import Batch
from merge_dag.lineage.store import LineageLockTimeout, LineageStore

LINEAGE_DIR = Path(engine_mod.__file__).parent
TABLES = {"meta", "artifacts", "edges", "events", "metrics", "runs", "spool_ingested"}

FP = {
    name: "sha256:" + (c * 64)
    for name, c in (("base", "0"), ("add", "a"), ("rev", "b"), ("recipe", "c"), ("tasks", "d"))
}
KEY = {name: c * 64 for name, c in (("tv_add", "1"), ("tv_rev", "2"), ("merged", "3"), ("eval", "4"))}
RECIPE = {
    "merge_method": "ties",
    "base_model": "data/models/ci/base",
    "models": [
        {"model": "data/models/ci/add", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "data/models/ci/rev", "parameters": {"weight": 0.7}},
    ],
    "parameters": {"lambda": 1.0},
    "seed": 0,
    "name": "ties",
    "evals": ["add"],
}


def sid(kind: str, fp: str) -> str:
    return f"{kind}-{fp.removeprefix('sha256:')[:16]}"


def aid(kind: str, key: str) -> str:
    return f"{kind}-{key[:16]}"


def artifact_kw(kind, name, key, path=None, params=None, code="-", run="run-1", nbytes=None) -> dict:
    return dict(
        artifact_id=aid(kind, key.removeprefix("sha256:")),
        kind=kind,
        name=name,
        key_hash=key,
        path=None if path is None else str(path),
        bytes=nbytes,
        code_version=code,
        params=params or {},
        run_id=run,
        data_version=key,
    )


def artifact(*args, **kwargs) -> Batch:
    return Batch().artifact(**artifact_kw(*args, **kwargs))


def edge(parent, child, role, fp) -> Batch:
    return Batch().edge(parent_id=parent, child_id=child, role=role, fingerprint=fp)


def event(artifact_id, step, ev="materialized", run="run-1") -> Batch:
    return Batch().event(artifact_id=artifact_id, run_id=run, step=step, event=ev, seconds=0.5)


def batch(*parts: Batch) -> Batch:
    return sum(parts, Batch())


def build_graph(store: LineageStore, root: Path) -> dict[str, str]:
    """sources -> two task vectors -> a ties merge -> its eval, recorded as the Dagster steps do."""
    ids = {}
    folders = {}
    for name in ("base", "add", "rev"):
        folders[name] = root / "models" / "ci" / name
        folders[name].mkdir(parents=True)
        ids[name] = sid("model", FP[name])
        store.write(
            batch(
                artifact("model", f"ci_{name}", FP[name], folders[name]),
                event(ids[name], f"model/ci_{name}", "observed"),
            )
        )
    recipe_file = root / "recipes" / "ties.yaml"
    recipe_file.parent.mkdir(parents=True)
    recipe_file.write_text("merge_method: ties\n")
    ids["recipe"] = sid("recipe", FP["recipe"])
    ids["tasks"] = sid("tasks", FP["tasks"])
    store.write(
        batch(artifact("recipe", "ties", FP["recipe"], recipe_file), artifact("tasks", "eval_tasks", FP["tasks"]))
    )
    for expert in ("add", "rev"):
        key = KEY[f"tv_{expert}"]
        ids[f"tv_{expert}"] = aid("task_vector", key)
        folder = root / "artifacts" / "task_vector" / f"ci_{expert}-{key[:16]}"
        folder.mkdir(parents=True)
        store.write(
            batch(
                artifact("task_vector", f"ci_{expert}", key, folder, code="tv0123456789"),
                edge(ids["base"], ids[f"tv_{expert}"], "base", FP["base"]),
                edge(ids[expert], ids[f"tv_{expert}"], "expert", FP[expert]),
                event(ids[f"tv_{expert}"], f"task_vector/ci_{expert}"),
            )
        )
    merged = root / "artifacts" / "merged" / f"ties-{KEY['merged'][:16]}"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"x" * 10)
    ids["merged"] = aid("merged", KEY["merged"])
    store.write(
        batch(
            artifact("merged", "ties", KEY["merged"], merged, {"recipe": RECIPE}, "a1b2c3d4e5f6", nbytes=2_100_000),
            edge(ids["recipe"], ids["merged"], "recipe", FP["recipe"]),
            edge(ids["base"], ids["merged"], "base", FP["base"]),
            edge(ids["tv_add"], ids["merged"], "expert", KEY["tv_add"]),
            edge(ids["tv_rev"], ids["merged"], "expert", KEY["tv_rev"]),
            event(ids["merged"], "merged/ties"),
        )
    )
    ids["eval"] = aid("eval", KEY["eval"])
    store.write(
        batch(
            artifact("eval", "merged_ties", KEY["eval"], root / "artifacts" / "eval", code="ev1"),
            edge(ids["merged"], ids["eval"], "model", KEY["merged"]),
            edge(ids["tasks"], ids["eval"], "tasks", FP["tasks"]),
            event(ids["eval"], "eval/merged_ties"),
            Batch()
            .metric(
                artifact_id=ids["eval"],
                task="add",
                metric="exact_match",
                value=0.61,
                stderr=0.03,
                n=200,
                model="merged/ties",
            )
            .metric(
                artifact_id=ids["eval"],
                task="rev",
                metric="exact_match",
                value=0.25,
                stderr=None,
                n=None,
                model="merged/ties",
            ),
        )
    )
    ids["merged_path"] = str(merged)
    return ids


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "nested" / "lineage.duckdb"


@pytest.fixture
def graph(tmp_path, db):
    store = LineageStore(db)
    return store, build_graph(store, tmp_path / "data")


def tables(path: Path) -> set[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
            ).fetchall()
        }
    finally:
        con.close()


# ----------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------


def test_schema_is_created_once_idempotently_and_lives_in_schema_sql(db):
    store = LineageStore(db)
    assert not db.exists()
    assert store.artifact("x") is None and store.events() == []  # reading creates nothing
    assert not db.exists()
    store.ensure_schema()
    assert db.is_file() and tables(db) == TABLES
    store.write(artifact("model", "m", FP["base"]))
    engine_mod._schema_ready.clear()  # as a fresh process would: the schema runs again over existing data
    LineageStore(db).ensure_schema()
    LineageStore(db).ensure_schema()
    assert tables(db) == TABLES
    assert len(store.artifacts()) == 1
    assert store.query("SELECT value FROM meta WHERE key = 'schema_version'") == [{"value": "1"}]
    # every table is declared in schema.sql and nowhere else
    sql = (LINEAGE_DIR / "schema.sql").read_text()
    assert {m.lower() for m in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", sql)} == TABLES
    for py in LINEAGE_DIR.glob("*.py"):
        assert "CREATE TABLE" not in py.read_text().upper(), py


def test_lineage_package_imports_no_dagster():
    code = (
        "import sys, merge_dag.lineage, merge_dag.lineage.command, merge_dag.lineage.audit; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'dagster'], 'dagster imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for py in LINEAGE_DIR.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+dagster", py.read_text(), re.M), py


def test_a_deleted_database_file_comes_back_with_its_schema(db):
    store = LineageStore(db)
    store.write(Batch().event(artifact_id="a", run_id="r", step="s", event="observed"))
    db.unlink()
    store.write(Batch().event(artifact_id="a", run_id="r", step="s", event="observed"))  # schema cache is stale
    assert len(store.events()) == 1


# ----------------------------------------------------------------------------------------------
# writes
# ----------------------------------------------------------------------------------------------


def test_upserts_keep_first_sighting_and_events_accumulate(db, tmp_path):
    store = LineageStore(db)
    kw = artifact_kw(
        "merged", "ties", KEY["merged"], tmp_path / "a", {"recipe": {"merge_method": "ties"}}, "c1", "run-1", 10
    )
    store.write(Batch().artifact(**kw))
    first = store.artifact(kw["artifact_id"])
    time.sleep(0.01)
    store.write(Batch().artifact(**dict(kw, path=None, bytes=20, run_id="run-2")))
    again = store.artifact(kw["artifact_id"])
    assert again["created_at"] == first["created_at"] and again["last_seen_at"] > first["last_seen_at"]
    assert again["run_id"] == "run-1"  # the run that created it
    assert again["path"] == str(tmp_path / "a")  # a None does not erase what is known
    assert again["bytes"] == 20 and again["params"] == {"recipe": {"merge_method": "ties"}}
    assert len(store.artifacts()) == 1

    for fp in (None, "sha256:f", "sha256:f"):
        store.write(Batch().edge(parent_id="p", child_id=kw["artifact_id"], role="base", fingerprint=fp))
    store.write(Batch().edge(parent_id="p", child_id=kw["artifact_id"], role="expert", fingerprint="sha256:e"))
    rows = store.query("SELECT role, fingerprint FROM edges ORDER BY role")
    assert rows == [{"role": "base", "fingerprint": "sha256:f"}, {"role": "expert", "fingerprint": "sha256:e"}]

    for ev in ("materialized", "cache_hit", "cache_hit"):
        store.write(
            Batch().event(artifact_id=kw["artifact_id"], run_id="run-2", step="merged/ties", event=ev, seconds=1.5)
        )
    assert [e["event"] for e in store.events(run_id="run-2")] == ["materialized", "cache_hit", "cache_hit"]
    with pytest.raises(ValueError, match="event must be one of"):
        store.write(Batch().event(artifact_id="x", run_id=None, step="s", event="built"))

    store.record_run(run_id="run-2", started_at=1_700_000_000.0, status="running", job="all")
    store.record_run(run_id="run-2", started_at=None, status="running")  # a step: keeps the start
    store.record_run(run_id="run-2", finished_at=1_700_000_100.0, status="success")
    store.record_run(run_id="run-2", status="running")  # late step: no regression
    (run,) = store.runs()
    assert run["status"] == "success" and run["job"] == "all"
    assert (run["finished_at"] - run["started_at"]).total_seconds() == 100
    assert run["recomputed"] == 1 and run["cache_hits"] == 2


def test_a_batch_is_one_transaction(db):
    store = LineageStore(db)
    store.write(batch())
    assert not db.exists()  # an empty batch writes nothing, not even the schema
    with pytest.raises(ValueError, match="lineage edge: parent_id, child_id and role are required"):
        artifact("model", "m", FP["base"]).edge(parent_id="p", child_id="", role="base", fingerprint=None)
    good = artifact("model", "m", FP["base"])
    assert len(good) == 1 and len(good + event("x", "model/m")) == 2 and len(good) == 1  # + copies
    with pytest.raises(duckdb.Error):
        store.transaction(good.statements + [("INSERT INTO nowhere VALUES (1)", [])])
    assert store.artifacts() == []  # the failing statement rolled the whole batch back
    store.write(batch(artifact("model", "m", FP["base"]), event(sid("model", FP["base"]), "model/m", "observed")))
    assert len(store.artifacts()) == 1 and len(store.events()) == 1


def test_records_as_data_are_validated_before_anything_is_written(db):
    """The pure core returns lineage records as plain data (core.gguf_import.lineage_ops)."""
    store = LineageStore(db)
    kw = artifact_kw("model", "m", FP["base"])
    with pytest.raises(ValueError, match="unknown record 'record_nonsense'"):
        store.write(Batch.from_records([("artifact", kw), ("record_nonsense", {})]))
    with pytest.raises(ValueError, match="lineage edge: .*missing 3 required keyword-only arguments"):
        store.write(Batch.from_records([("artifact", kw), ("edge", {"parent_id": "p"})]))
    with pytest.raises(ValueError, match=r"each record is \(kind, kwargs\)"):
        Batch.from_records(["artifact"])
    assert store.artifacts() == [] and not db.exists()  # validated before anything was written
    store.write(
        Batch.from_records(
            [
                ("record_artifact", kw),
                ("event", dict(artifact_id=kw["artifact_id"], run_id=None, step="model/m", event="observed")),
            ]
        )
    )
    assert [a["artifact_id"] for a in store.artifacts()] == [kw["artifact_id"]] and len(store.events()) == 1
    assert (
        Batch.from_records([("artifact", kw)]).statements[0][0] == artifact("model", "m", FP["base"]).statements[0][0]
    )


def test_metrics_round_trip(db):
    store = LineageStore(db)
    store.write(artifact("eval", "merged_ties", KEY["eval"]))
    e = aid("eval", KEY["eval"])
    store.write(
        Batch().metric(
            artifact_id=e, task="add", metric="exact_match", value=0.61, stderr=0.03, n=200, model="merged/ties"
        )
    )
    store.write(
        Batch().metric(
            artifact_id=e, task="add", metric="exact_match", value=0.61, stderr=0.03, n=200, model="merged/ties"
        )
    )
    store.write(Batch().metric(artifact_id=e, task="sort", metric="acc", value=1, stderr=None, n=None))
    rows = store.metrics(e)
    assert [(r["task"], r["metric"], r["value"], r["stderr"], r["n"], r["model"], r["kind"]) for r in rows] == [
        ("add", "exact_match", 0.61, 0.03, 200, "merged/ties", "eval"),
        ("sort", "acc", 1.0, None, None, None, "eval"),
    ]
    assert store.metrics() == rows and store.metrics("nothing") == []


def test_run_summary_counts_per_kind(graph):
    store, ids = graph
    store.write(
        batch(
            event(ids["merged"], "merged/ties", "cache_hit", "run-2"),
            event(ids["tv_add"], "task_vector/ci_add", "cache_hit", "run-2"),
            event(ids["eval"], "eval/merged_ties", "materialized", "run-2"),
            Batch().run(run_id="run-2", status="success"),
        )
    )
    s = store.run_summary("run-2")
    assert s["materialized"] == {"eval": 1} and s["cache_hit"] == {"merged": 1, "task_vector": 1}
    assert (s["recomputed"], s["cache_hits"], s["status"]) == (1, 2, "success")
    assert str(s) == "1 materialized (eval 1), 2 cache hits (merged 1, task_vector 1)"
    first = store.run_summary("run-1")
    assert first["materialized"] == {"task_vector": 2, "merged": 1, "eval": 1} and first["observed"] == {"model": 3}
    assert first["status"] == "unknown"  # never recorded in runs, yet seen in run_stats through its events
    assert {r["run_id"]: (r["recomputed"], r["cache_hits"]) for r in store.runs()} == {"run-1": (4, 0), "run-2": (1, 2)}


# ----------------------------------------------------------------------------------------------
# provenance and lookups
# ----------------------------------------------------------------------------------------------


def test_provenance_walks_two_levels_with_roles_and_fingerprints(graph):
    store, ids = graph
    tree = store.provenance(ids["merged"])
    assert tree["params"] == {"recipe": RECIPE} and tree["code_version"] == "a1b2c3d4e5f6"
    assert [(i["role"], i["node"]["artifact_id"], i["fingerprint"]) for i in tree["inputs"]] == [
        ("recipe", ids["recipe"], FP["recipe"]),
        ("base", ids["base"], FP["base"]),
        ("expert", ids["tv_add"], KEY["tv_add"]),
        ("expert", ids["tv_rev"], KEY["tv_rev"]),
    ]
    tv = tree["inputs"][2]["node"]
    assert [(i["role"], i["node"]["name"], i["fingerprint"]) for i in tv["inputs"]] == [
        ("base", "ci_base", FP["base"]),
        ("expert", "ci_add", FP["add"]),
    ]
    assert tv["inputs"][0]["node"]["source"] and tv["inputs"][0]["node"]["inputs"] == []
    # metrics of the evals run on the merge come with it
    assert [(m["task"], m["value"], m["eval_id"]) for m in tree["metrics"]] == [
        ("add", 0.61, ids["eval"]),
        ("rev", 0.25, ids["eval"]),
    ]
    # the eval's own tree reaches the sources through the merge: three levels
    ev = store.provenance(ids["eval"])
    assert ev["inputs"][0]["node"]["inputs"][2]["node"]["inputs"][1]["node"]["name"] == "ci_add"
    with pytest.raises(MergeDagError, match="no artifact"):
        store.provenance("merged-nothing")


def test_provenance_is_cycle_safe_and_marks_missing_parents(db):
    store = LineageStore(db)
    store.write(
        batch(
            artifact("merged", "a", "a" * 64),
            artifact("merged", "b", "b" * 64),
            edge(aid("merged", "a" * 64), aid("merged", "b" * 64), "base", "a" * 64),
            edge(aid("merged", "b" * 64), aid("merged", "a" * 64), "base", "b" * 64),
            edge("model-gone", aid("merged", "a" * 64), "expert", "sha256:9"),
        )
    )
    tree = store.provenance(aid("merged", "a" * 64))
    b = tree["inputs"][0]["node"]
    assert b["name"] == "b" and b["inputs"][0]["node"]["cycle"] and b["inputs"][0]["node"]["name"] == "a"
    assert tree["inputs"][1]["node"] == {"artifact_id": "model-gone", "missing": True, "inputs": [], "metrics": []}
    text = format_audit(tree)
    assert "cycle" in text and "model-gone: not in the lineage database" in text


def test_find_by_id_prefix_path_and_name(graph, tmp_path, monkeypatch):
    store, ids = graph
    assert store.find(ids["merged"])["artifact_id"] == ids["merged"]
    assert store.find(ids["merged"][:12])["artifact_id"] == ids["merged"]  # prefix of the id
    assert store.find(KEY["merged"][:10])["artifact_id"] == ids["merged"]  # prefix of the content key
    assert store.find("0" * 12)["artifact_id"] == ids["base"]  # prefix of a fingerprint
    with pytest.raises(MergeDagError, match="prefix of 2 artifacts"):
        store.find("task_vector-")
    merged = Path(ids["merged_path"])
    assert store.find(str(merged))["artifact_id"] == ids["merged"]
    assert store.find(merged / "model.safetensors")["artifact_id"] == ids["merged"]  # a file inside it
    link = tmp_path / "latest"
    link.symlink_to(merged)
    assert store.find(link)["artifact_id"] == ids["merged"]
    monkeypatch.chdir(merged.parent)
    assert store.find(merged.name)["artifact_id"] == ids["merged"]  # relative path
    # "ties" names both the recipe and the merge: the merge wins; kind/name picks either
    assert store.find("ties")["artifact_id"] == ids["merged"]
    assert store.find("recipe/ties")["artifact_id"] == ids["recipe"]
    assert store.find("ci_add")["kind"] in ("model", "task_vector")
    assert store.find("task_vector/ci_add")["artifact_id"] == ids["tv_add"]
    assert store.find("nothing-like-it") is None and store.find("") is None
    # by name: the most recently seen wins
    time.sleep(0.01)
    store.write(artifact("merged", "ties", "5" * 64, params={"recipe": {"merge_method": "ties"}}))
    assert store.find("ties")["artifact_id"] == aid("merged", "5" * 64)
    store.write(Batch().event(artifact_id=ids["merged"], run_id="r", step="merged/ties", event="cache_hit"))
    store.write(artifact("merged", "ties", KEY["merged"], merged, {"recipe": RECIPE}))  # cache hit
    assert store.find("ties")["artifact_id"] == ids["merged"]
    assert store.names("merged") == ["ties"]


# ----------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------


def test_audit_text_has_fingerprints_params_and_metrics(graph):
    store, ids = graph
    text = audit(store, "ties")
    lines = text.splitlines()
    assert lines[0].startswith(f"merged/ties  {ids['merged']}  (2.1 MB, created ")
    assert "run run-1" in lines[0]
    assert "method ties" in text and "code a1b2c3d4e5f6" in text and "params {lambda: 1.0}" in text
    assert "data/models/ci/add {weight: 1.0, density: 0.5}" in text and "seed 0" in text
    assert "metrics: add/exact_match 0.61 ± 0.03 (n=200), rev/exact_match 0.25" in text
    for fp in (*FP.values(), KEY["tv_add"], KEY["tv_rev"]):
        if fp != FP["tasks"]:
            assert fp in text, fp
    assert FP["tasks"] not in text  # the eval's input is not the merge's
    # two levels: the experts' own inputs are indented under them
    assert any(re.match(rf"  ├─ expert task_vector/ci_add\s+{KEY['tv_add']}", ln) for ln in lines)
    assert any(re.match(rf"  │   ├─ base\s+model/ci_base\s+{FP['base']}", ln) for ln in lines)
    assert any(re.match(rf"  │   └─ expert model/ci_add\s+{FP['add']}", ln) for ln in lines)
    assert any(re.match(rf"      └─ expert model/ci_rev\s+{FP['rev']}", ln) for ln in lines)
    assert any(re.match(rf"  ├─ recipe recipe/ties\s+{FP['recipe']}\s+\S*ties.yaml$", ln) for ln in lines)
    assert text == audit(store.path, ids["merged"])  # by path of the database, by id


def test_audit_of_a_folder_through_merge_dag_json(graph, tmp_path):
    store, ids = graph
    merged = Path(ids["merged_path"])
    card = {
        "merge_dag_version": "0.1.0",
        "code_version": "a1b2c3d4e5f6",
        "method": "ties",
        "recipe": RECIPE,
        "recipe_file": "data/recipes/ties.yaml",
        "out_dtype": "float32",
        "seed": 0,
        "tensor_count": 12,
        "inputs": [
            {"role": "base", "model": "ci/base", "path": "/m/base", "fingerprint": FP["base"]},
            {"role": "expert", "model": "ci/add", "path": "/m/add", "fingerprint": FP["add"]},
            {"role": "expert", "model": "ci/rev", "path": "/m/rev", "fingerprint": FP["rev"]},
        ],
        "artifact_id": ids["merged"],
        "name": "ties",
    }
    (merged / "merge_dag.json").write_text(json.dumps(card))
    assert audit(store, merged) == audit(store, "ties")
    # a copy somewhere else is traced through its merge_dag.json, and says it is a copy
    copy = tmp_path / "shipped" / "ties-final"
    copy.mkdir(parents=True)
    (copy / "merge_dag.json").write_text(json.dumps(card))
    text = audit(store, copy)
    assert text.startswith(audit(store, "ties")) and "is a copy" in text and str(merged) in text
    assert store.find(copy)["artifact_id"] == ids["merged"]
    # without any record: a database that does not know the id, and no database at all
    for other in (LineageStore(tmp_path / "empty.duckdb"), tmp_path / "absent" / "lineage.duckdb"):
        if isinstance(other, LineageStore):
            other.ensure_schema()
        text = audit(other, copy)
        assert f"no record of {ids['merged']}" in text
        assert "method ties" in text and "params {lambda: 1.0}" in text and "data/recipes/ties.yaml" in text
        for name in ("base", "add", "rev"):
            assert FP[name] in text
    assert not (tmp_path / "absent").exists()  # auditing did not create a database
    # a folder merged outside the pipeline: no id in its merge_dag.json
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "merge_dag.json").write_text(json.dumps({k: v for k, v in card.items() if k != "artifact_id"}))
    assert "names no artifact id" in audit(store, bare)


def test_audit_says_what_is_known_when_nothing_matches(graph, tmp_path):
    store, _ = graph
    with pytest.raises(
        MergeDagError, match=r"no artifact matches 'nope' in .*lineage.duckdb; known merged models: ties"
    ):
        audit(store, "nope")
    with pytest.raises(MergeDagError, match="there is no lineage database"):
        audit(tmp_path / "none.duckdb", "ties")


def test_audit_command(graph, capsys, monkeypatch, tmp_path):
    store, ids = graph
    assert cli_main(["audit", "ties", "--db", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert out == audit(store, "ties")
    monkeypatch.setenv("MERGE_DAG_DB", str(store.path))
    assert cli_main(["audit", ids["merged"][:14], "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["artifact_id"] == ids["merged"] and tree["inputs"][1]["fingerprint"] == FP["base"]
    assert cli_main(["audit", "nope"]) == 2
    assert "known merged models: ties" in capsys.readouterr().err
    monkeypatch.delenv("MERGE_DAG_DB")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    LineageStore("data/lineage.duckdb").write(batch(artifact("merged", "here", "7" * 64)))
    assert cli_main(["audit", "here"]) == 0  # default: data/lineage.duckdb under the current directory
    assert capsys.readouterr().out.startswith("merged/here")


# ----------------------------------------------------------------------------------------------
# several processes, one file
# ----------------------------------------------------------------------------------------------

WRITERS, PER_WRITER = 4, 50


def _writer(db: str, w: int, start, results) -> None:
    if w % 2:  # half the writers as on a system without flock: DuckDB's lock and back-off only
        engine_mod.fcntl = None
    try:
        _write_many(db, w, start, results)
    except BaseException as e:  # reported to the test, which would otherwise wait for the result
        results.put({"writer": w, "error": repr(e)})
        raise


def _write_many(db: str, w: int, start, results) -> None:
    store = LineageStore(db)
    start.wait()
    t0 = time.monotonic()
    for i in range(PER_WRITER):
        a = f"task_vector-w{w}-{i:03d}"
        store.write(
            Batch()
            .artifact(
                artifact_id=a,
                kind="task_vector",
                name=f"w{w}_{i}",
                key_hash=f"{w}:{i}",
                path=None,
                bytes=i,
                code_version="c",
                params={"i": i},
                run_id="run-mp",
            )
            .edge(parent_id="model-base", child_id=a, role="base", fingerprint="sha256:0")
            .event(artifact_id=a, run_id="run-mp", step=f"task_vector/w{w}_{i}", event="materialized")
            .run(run_id="run-mp", started_at=None, status="running", job="all")
        )
        if i % 10 == 0:
            assert store.artifact(a)["params"] == {"i": i}  # reads interleave with the other writers
    results.put({"writer": w, "seconds": time.monotonic() - t0, **store.stats})


def test_parallel_processes_write_one_file_without_loss(tmp_path):
    db = tmp_path / "lineage.duckdb"
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(db), w, start, results)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let every process import and reach the start line (spawn)
    start.set()
    stats = [results.get(timeout=120) for _ in procs]
    assert not [s for s in stats if "error" in s]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    store = LineageStore(db)
    arts = store.artifacts("task_vector")
    assert len(arts) == WRITERS * PER_WRITER == len({a["artifact_id"] for a in arts})
    assert store.query("SELECT count(*) AS n FROM edges")[0]["n"] == WRITERS * PER_WRITER
    events = store.events(run_id="run-mp")
    assert len(events) == WRITERS * PER_WRITER == len({e["id"] for e in events})
    summary = store.run_summary("run-mp")
    assert summary["materialized"] == {"task_vector": WRITERS * PER_WRITER} and summary["status"] == "running"
    # the writers really did contend: queued on the flock, and retried DuckDB's lock
    assert sum(s["queued"] for s in stats) > 0 and sum(s["retries"] for s in stats) > 0
    for s in sorted(stats, key=lambda s: s["writer"]):
        print(
            f"writer {s['writer']} ({'DuckDB lock only' if s['writer'] % 2 else 'flock'}): "
            f"{s['operations']} operations in {s['seconds']:.1f} s, queued {s['queued']}, "
            f"{s['retries']} retries, "
            f"waited {s['waited_s']:.1f} s in all, longest {s['max_wait_s']:.2f} s"
        )


def _hold_lock(db: str, locked, seconds: float) -> None:
    con = duckdb.connect(db)
    con.execute("BEGIN TRANSACTION")
    con.execute(
        "INSERT INTO artifacts (artifact_id, kind, name, key_hash, created_at, last_seen_at) "
        "VALUES ('model-held', 'model', 'held', 'sha256:h', now()::TIMESTAMP, now()::TIMESTAMP) ON CONFLICT DO NOTHING"
    )
    locked.set()
    time.sleep(seconds)
    con.execute("COMMIT")
    con.close()


def test_reader_waits_for_a_writer_in_another_process_then_reads(tmp_path):
    db = tmp_path / "lineage.duckdb"
    LineageStore(db).ensure_schema()
    ctx = mp.get_context("spawn")
    locked = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(db), locked, 2.0))
    p.start()
    try:
        assert locked.wait(60)
        t0 = time.monotonic()
        impatient = LineageStore(db, lock_timeout=0.3)
        with pytest.raises(LineageLockTimeout, match=re.escape(str(db))):
            impatient.artifact("model-held")
        assert impatient.stats["retries"] > 0
        patient = LineageStore(db)
        row = patient.artifact("model-held")  # retried until the writer committed and let go
        waited = time.monotonic() - t0
    finally:
        p.join(timeout=30)
    assert row is not None and row["name"] == "held"
    assert patient.stats["retries"] > 0 and 1.0 < waited < 30
    # and a write waits the same way
    p = ctx.Process(target=_hold_lock, args=(str(db), locked, 1.0))
    locked.clear()
    p.start()
    try:
        assert locked.wait(60)
        with pytest.raises(LineageLockTimeout):
            LineageStore(db, lock_timeout=0.2).write(
                Batch().event(artifact_id="model-held", run_id=None, step="s", event="observed")
            )
        LineageStore(db).write(Batch().event(artifact_id="model-held", run_id=None, step="s", event="observed"))
    finally:
        p.join(timeout=30)
    assert len(LineageStore(db).events()) == 1


# ---------------------------------------------------------------------------------------------
# the spool: lineage written as files by workers, ingested by one writer
# ---------------------------------------------------------------------------------------------

TABLE_ROWS = {
    "artifacts": "SELECT artifact_id, kind, name, key_hash, path, bytes, data_version, created_at, run_id, "
    "code_version, params_json FROM artifacts ORDER BY artifact_id",
    "edges": "SELECT parent_id, child_id, role, fingerprint FROM edges ORDER BY ALL",
    "events": "SELECT artifact_id, run_id, step, event, seconds, recorded_at FROM events ORDER BY ALL",
    "metrics": "SELECT artifact_id, model, task, metric, value, stderr, n FROM metrics ORDER BY ALL",
    "runs": "SELECT run_id, job, started_at, finished_at, status FROM runs ORDER BY ALL",
}


def spool_batches(tmp_path) -> list[Batch]:
    """A merge's records in three batches (as three steps write them), with fixed times."""
    from datetime import datetime

    at = datetime(2026, 1, 2, 3, 4, 5, 678901)
    merged = artifact_kw("merged", "ties", KEY["merged"], tmp_path / "m", {"recipe": RECIPE}, "c1", "run-1", 10)
    return [
        Batch(at=at)
        .artifact(**artifact_kw("model", "base", FP["base"]))
        .edge(parent_id="gguf-x", child_id=sid("model", FP["base"]), role="gguf", fingerprint=None),
        Batch(at=at)
        .artifact(**merged)
        .edge(parent_id=sid("model", FP["base"]), child_id=merged["artifact_id"], role="base", fingerprint=FP["base"])
        .event(artifact_id=merged["artifact_id"], run_id="run-1", step="merged/ties", event="materialized", seconds=2)
        .run(run_id="run-1", status="running", job="merge_all"),
        Batch(at=at).metric(
            artifact_id=merged["artifact_id"], task="add", metric="acc", value=0.5, stderr="N/A", n=12, model="m"
        ),
    ]


def table_rows(db: Path) -> dict[str, list[dict]]:
    store = LineageStore(db)
    return {t: store.query(sql) for t, sql in TABLE_ROWS.items()}


def test_spooled_batches_ingest_to_exactly_the_rows_of_a_direct_write_once(tmp_path):
    from merge_dag.lineage.spool import LineageSpool, SpoolingLineageStore, ingest

    direct = LineageStore(tmp_path / "direct.duckdb")
    for b in spool_batches(tmp_path):
        direct.write(b)
    worker = SpoolingLineageStore(tmp_path / "spooled.duckdb", tmp_path / "spool")
    for b in spool_batches(tmp_path):
        worker.write(b)
    worker.write(Batch())  # nothing to say: no file
    assert not (tmp_path / "spooled.duckdb").exists()  # the worker never opened the database
    files = LineageSpool(tmp_path / "spool").files()
    assert len(files) == 3 and not list((tmp_path / "spool").glob(".*"))  # no temporary file left

    store = LineageStore(tmp_path / "spooled.duckdb")
    assert str(ingest(store, tmp_path / "spool")) == "3 spooled lineage file(s) ingested, 0 already in the database"
    assert table_rows(tmp_path / "spooled.duckdb") == table_rows(tmp_path / "direct.duckdb")
    assert sum(len(r) for r in table_rows(tmp_path / "direct.duckdb").values()) == 7
    # a second ingest (another writer, a sensor after the coordinator) adds nothing
    again = ingest(store, tmp_path / "spool")
    assert (again.ingested, again.already) == (0, 3)
    assert table_rows(tmp_path / "spooled.duckdb") == table_rows(tmp_path / "direct.duckdb")
    assert len(store.query("SELECT * FROM spool_ingested")) == 3


def test_an_unreadable_spool_file_is_one_line_and_the_others_are_ingested(tmp_path):
    from merge_dag.lineage.spool import LineageSpool, ingest

    spool = LineageSpool(tmp_path / "spool")
    for b in spool_batches(tmp_path):
        spool.put(b)
    bad = tmp_path / "spool" / "00000000T000000000000-1-bad.json"
    bad.write_text('{"id": "x", "records": [["artifact", {"kind": "merged"}]]')  # cut short
    result = ingest(LineageStore(tmp_path / "l.duckdb"), tmp_path / "spool")
    assert result.ingested == 3 and len(result.errors) == 1
    assert result.errors[0].startswith(f"lineage spool file {bad}: ")
    assert len(LineageStore(tmp_path / "l.duckdb").events()) == 1
