"""A merge split into tensor-range parts (merge_dag.core.parts, and merged/<recipe> with `parts:` in
Dagster) writes exactly what the one-step merge writes."""

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
from conftest import make_project

from merge_dag.core.checkpoint import INDEX_NAME, plan_shards
from merge_dag.core.engine import execute, out_tensors, plan_merge
from merge_dag.core.errors import MergeInputError
from merge_dag.core.fingerprint import checkpoint_fingerprint
from merge_dag.core.parts import PartError, execute_part, finalize_parts, plan_parts, split_sizes
from merge_dag.core.recipe import parse_recipe
from merge_dag.core.task_vector import compute_task_vector

ROOT = Path(__file__).resolve().parents[1]
SHARD = 12000  # bytes: the tiny bf16 models below give 7 shards
CARD = {"artifact_id": "merged-0123456789abcdef", "name": "split"}


pytestmark = pytest.mark.usefixtures("fp_cache")


def recipe(fam, method: str, **extra):
    body = {
        "merge_method": method,
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam["e0"]), "parameters": {"weight": 0.7}},
            {"model": str(fam["e1"]), "parameters": {"weight": [1.0, 0.2]}},
            {"model": str(fam["e2"]), "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 0.9, **({"density": 0.4} if method == "ties" else {})},
        **extra,
    }
    return parse_recipe(body)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def split_merge(plan, staging: Path, out: Path, parts: int, order=None, shard_size=SHARD):
    for k in order if order is not None else reversed(range(parts)):  # any order
        execute_part(plan, staging, k, parts, shard_size)
    return finalize_parts(plan, staging, out, parts, dict(CARD), shard_size=shard_size)


def assert_no_output(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---------------------------------------------------------------------------------------------
# core
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_split_merge_is_byte_identical_to_one_step(tmp_path, family, method):
    plan = plan_merge(recipe(family, method))
    ref = execute(plan, tmp_path / "one-step", shard_size=SHARD, progress=False, card_extra=dict(CARD))
    want = digests(ref.out_dir)
    assert sum(n.endswith(".safetensors") for n in want) == 7
    assert {
        INDEX_NAME,
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "README.md",
        "merge_dag.json",
    } <= set(want)
    for parts in (1, 2, 3, 4):
        staging, out = tmp_path / f"staging-{parts}", tmp_path / f"split-{parts}"
        res = split_merge(plan, staging, out, parts)
        assert digests(out) == want, parts
        assert res.output_fingerprint == ref.output_fingerprint == checkpoint_fingerprint(out)
        assert res.fingerprints == ref.fingerprints
        assert res.card == ref.card and res.tensor_count == ref.tensor_count and res.bytes == ref.bytes
        assert not staging.exists()  # removed once the checkpoint is in place
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_finalize_reads_no_output_tensor_to_fingerprint_it(tmp_path, family, monkeypatch):
    """The parts hash what they write (manifest `output_digests`), like a one-step merge: finalize
    fingerprints the output without a second read of its shards."""
    import merge_dag.core.fingerprint as fp

    plan = plan_merge(recipe(family, "ties"))
    staging, out = tmp_path / "staging", tmp_path / "split"
    for k in range(3):
        execute_part(plan, staging, k, 3, SHARD)
    assert sum(len(json.loads(m.read_text())["output_digests"]) for m in staging.glob("*.json")) == len(plan.steps)
    real = fp.digest_tensor_file_range
    read = []

    def spy(info):
        read.append(info.file)
        return real(info)

    monkeypatch.setattr(fp, "digest_tensor_file_range", spy)
    res = finalize_parts(plan, staging, out, 3, dict(CARD), shard_size=SHARD)
    assert not [f for f in read if Path(f).parent == out]
    monkeypatch.setattr(fp, "digest_tensor_file_range", real)
    again = checkpoint_fingerprint(out)  # now from the digests cached with the shards
    assert res.output_fingerprint == again


def test_split_merge_through_task_vectors_is_byte_identical(tmp_path, family):
    """The Dagster layer reads experts as base + cached task vector: the same holds there."""
    tvs = {}
    for e in ("e0", "e1", "e2"):
        compute_task_vector(family["base"], family[e], tmp_path / f"tv-{e}")
        tvs[str(family[e])] = tmp_path / f"tv-{e}"
    plan = plan_merge(recipe(family, "ties"), task_vectors=tvs)
    ref = execute(plan, tmp_path / "one-step", shard_size=SHARD, progress=False, card_extra=dict(CARD))
    res = split_merge(plan, tmp_path / "staging", tmp_path / "split", 3)
    assert digests(tmp_path / "split") == digests(ref.out_dir)
    assert res.fingerprints == ref.fingerprints and res.output_fingerprint == ref.output_fingerprint


def test_parts_are_contiguous_whole_shards_of_roughly_equal_bytes(tmp_path, family):
    plan = plan_merge(recipe(family, "ties"))
    shards = plan_shards(out_tensors(plan), SHARD)
    for parts in (1, 2, 3, 4, 6):
        layout = plan_parts(plan, parts, SHARD)
        assert [i for lay in layout for i in lay.shards] == list(range(len(shards)))
        assert all(lay.shards for lay in layout)
        assert [t for lay in layout for t in lay.tensors] == [s.name for s in plan.steps]
        sizes = [lay.bytes for lay in layout]
        assert max(sizes) - min(sizes) <= max(sum(t.nbytes for t in s) for s in shards)
    assert split_sizes([10, 1, 1, 1, 10], 2) in ([(0, 2), (2, 5)], [(0, 3), (3, 5)])
    assert split_sizes([5, 5, 5, 5], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_sizes([5, 5], 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert split_sizes([1, 1, 1, 100], 2) == [(0, 3), (3, 4)]


def test_more_parts_than_shards_leaves_the_last_parts_empty(tmp_path, family):
    plan = plan_merge(recipe(family, "task_arithmetic"))
    ref = execute(plan, tmp_path / "one-step", shard_size="1GB", progress=False, card_extra=dict(CARD))
    layout = plan_parts(plan, 3, "1GB")
    assert [len(lay.shards) for lay in layout] == [1, 0, 0]
    staging = tmp_path / "staging"
    empty = execute_part(plan, staging, 2, 3, "1GB")
    assert empty.shards == [] and empty.tensor_count == 0
    assert json.loads(empty.manifest.read_text())["tensors"] == []
    split_merge(plan, staging, tmp_path / "split", 3, shard_size="1GB")
    assert digests(tmp_path / "split") == digests(ref.out_dir)


def test_missing_part_fails_finalize_naming_the_part(tmp_path, family):
    plan = plan_merge(recipe(family, "ties"))
    staging, out = tmp_path / "staging", tmp_path / "out"
    for k in (0, 2):
        execute_part(plan, staging, k, 3, SHARD)
    with pytest.raises(PartError, match=r"part 2 of 3: manifest .*part-00002-of-00003\.json is missing"):
        finalize_parts(plan, staging, out, 3, dict(CARD), shard_size=SHARD)
    assert_no_output(out)
    assert staging.exists()  # kept, so a retry only runs the missing part
    # a shard file lost after its part finished is found too
    execute_part(plan, staging, 1, 3, SHARD)
    lost = staging / plan_parts(plan, 3, SHARD)[2].shard_names[0]
    lost.unlink()
    with pytest.raises(PartError, match=r"part 3 of 3: shard file .*is missing"):
        finalize_parts(plan, staging, out, 3, dict(CARD), shard_size=SHARD)
    assert_no_output(out)


def test_a_retry_redoes_only_missing_or_stale_parts(tmp_path, family):
    plan = plan_merge(recipe(family, "ties"))
    staging = tmp_path / "staging"
    first = [execute_part(plan, staging, k, 3, SHARD) for k in range(3)]
    assert not any(r.skipped for r in first)
    lay = plan_parts(plan, 3, SHARD)
    (staging / lay[1].shard_names[-1]).unlink()  # part 2 lost a shard
    again = [execute_part(plan, staging, k, 3, SHARD) for k in range(3)]
    assert [r.skipped for r in again] == [True, False, True]
    # manifests of another plan (here: another shard size) are not taken as finished
    other = execute_part(plan, staging, 0, 3, SHARD // 2)
    assert not other.skipped
    with pytest.raises(PartError, match=r"part 1 of 3: .*written for another plan"):
        finalize_parts(plan, staging, tmp_path / "out", 3, dict(CARD), shard_size=SHARD)
    execute_part(plan, staging, 0, 3, SHARD)
    ref = execute(plan, tmp_path / "one-step", shard_size=SHARD, progress=False, card_extra=dict(CARD))
    finalize_parts(plan, staging, tmp_path / "out", 3, dict(CARD), shard_size=SHARD)
    assert digests(tmp_path / "out") == digests(ref.out_dir)


def test_identical_inputs_fail_finalize_like_one_step(tmp_path, family):
    copy = tmp_path / "copy-of-e0"
    shutil.copytree(family["e0"], copy)
    plan = plan_merge(recipe(dict(family, e2=copy), "task_arithmetic"))
    with pytest.raises(MergeInputError) as one_step:
        execute(plan, tmp_path / "one-step", shard_size=SHARD, progress=False)
    staging, out = tmp_path / "staging", tmp_path / "out"
    with pytest.raises(MergeInputError) as split:
        split_merge(plan, staging, out, 3)
    assert str(split.value) == str(one_step.value)
    assert "hold identical weights in every tensor" in str(split.value)
    assert_no_output(out)


# ---------------------------------------------------------------------------------------------
# Dagster: merged/<recipe> as prepare -> N part steps -> finalize
# ---------------------------------------------------------------------------------------------

TIES = """
merge_method: ties
base_model: data/models/ci/base
models:
  - model: data/models/ci/arev
  - model: data/models/ci/sort
parameters: {weight: 1.0, density: 0.5}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, ci_zoo):
    return make_project(
        tmp_path_factory.mktemp("parts-project"),
        {"whole.yaml": "name: whole\n" + TIES, "split.yaml": "name: split\nparts: 3\n" + TIES},
        data=("tasks", "eval"),
    )


def materialize(root: Path, instance: dg.DagsterInstance):
    from merge_dag.dagster.definitions import ALL_JOB, build_definitions
    from merge_dag.dagster.resources import MergeDagResource

    res = MergeDagResource(root=str(root), db_path=str(root / "data" / "lineage.duckdb"))
    result = build_definitions(root, resource=res).resolve_job_def(ALL_JOB).execute_in_process(instance=instance)
    assert result.success
    return result


def merged_metadata(result) -> dict[str, dict]:
    return {
        m.asset_key.path[1]: {k: v.value for k, v in m.metadata.items()}
        for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())
        if m.asset_key.path[0] == "merged"
    }


def part_steps(result) -> list[str]:
    return sorted(
        e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS" and ".part_" in (e.step_key or "")
    )


def test_split_asset_is_one_asset_with_the_same_shape(project):
    from merge_dag.dagster.assets.merges import merged_asset
    from merge_dag.dagster.definitions import build_definitions
    from merge_dag.project import load_project

    defs = build_definitions(project)
    graph = defs.resolve_assets_def(dg.AssetKey(["merged", "split"]))
    assert isinstance(graph.node_def, dg.GraphDefinition)
    assert not isinstance(defs.resolve_assets_def(dg.AssetKey(["merged", "whole"])).node_def, dg.GraphDefinition)
    p = load_project(project)
    one_step = merged_asset(p, p.recipes["split"])  # what parts: 1 would give the same recipe
    a, b = graph.specs_by_key[graph.key], one_step.specs_by_key[one_step.key]
    assert graph.key == one_step.key
    assert {d.asset_key for d in a.deps} == {d.asset_key for d in b.deps}
    assert (a.group_name, a.code_version, a.tags) == (b.group_name, b.code_version, b.tags)
    assert {n.pool for n in graph.node_def.node_defs if n.name != "finalize"} == {one_step.op.pool}
    assert [n.name for n in graph.node_def.node_defs] == [
        "prepare",
        "part_1_of_3",
        "part_2_of_3",
        "part_3_of_3",
        "finalize",
    ]


def test_split_asset_equals_one_step_and_hits_the_cache(project):
    with dg.instance_for_test() as instance:
        first = materialize(project, instance)
        md = merged_metadata(first)
        assert md["split"]["cache"] == md["whole"]["cache"] == "miss"
        assert md["split"]["output_fingerprint"] == md["whole"]["output_fingerprint"]
        split_dir, whole_dir = project / md["split"]["path"], project / md["whole"]["path"]
        assert (
            checkpoint_fingerprint(split_dir) == checkpoint_fingerprint(whole_dir) == md["split"]["output_fingerprint"]
        )
        assert len(list(split_dir.glob("*.safetensors"))) >= 3
        assert part_steps(first) == [
            "merged__split.part_1_of_3",
            "merged__split.part_2_of_3",
            "merged__split.part_3_of_3",
        ]
        done = [first.output_for_node(f"merged__split.part_{k}_of_3") for k in (1, 2, 3)]
        assert all(d["cache"] == "miss" and not d["skipped"] and d["shards"] for d in done)
        assert sum(d["tensor_count"] for d in done) == md["split"]["tensor_count"]
        card = json.loads((split_dir / "merge_dag.json").read_text())
        assert card["artifact_id"] == md["split"]["artifact_id"] and card["name"] == "split"
        assert set(md["split"]) == set(md["whole"])
        checks = {c.asset_key.path[1]: c.passed for c in first.get_asset_check_evaluations()}
        assert checks == {"split": True, "whole": True}
        assert list((project / "data" / "artifacts" / "_staging" / "merged").iterdir()) == []  # staging removed
        from merge_dag.lineage.store import LineageStore

        events = LineageStore(project / "data" / "lineage.duckdb").events(run_id=first.run_id)
        assert {e["step"] for e in events if e["event"] == "materialized"} >= {"merged/split", "merged/whole"}

        again = materialize(project, instance)
        md2 = merged_metadata(again)
        assert md2["split"]["cache"] == "hit" and md2["split"]["key"] == md["split"]["key"]
        mats = [e.event_specific_data.materialization for e in again.get_asset_materialization_events()]
        split_mat = next(m for m in mats if m.asset_key.path == ["merged", "split"])
        assert split_mat.tags["dagster/data_version"] == md["split"]["key"]
        assert part_steps(again) == part_steps(first)
        assert [again.output_for_node(f"merged__split.part_{k}_of_3") for k in (1, 2, 3)] == [
            {"part": k, "cache": "hit"} for k in (1, 2, 3)
        ]  # no part work
        events = LineageStore(project / "data" / "lineage.duckdb").events(run_id=again.run_id)
        assert {e["step"] for e in events if e["event"] == "cache_hit"} >= {"merged/split", "merged/whole"}
        assert not any(e["event"] == "materialized" for e in events)
