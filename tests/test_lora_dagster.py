"""LoRA experts through Dagster on a copy of the ci zoo's base: real peft adapters as the experts of
plain, glob and guided recipes (LEWIS, Sens-Merging, AIM, RegMean); merges equal to the core engine's,
statistics equal to a forward pass of peft's own merged model, lineage and audit naming base and
adapter, no dense expert written, and the sensor's settle + validate on adapter folders."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch
from conftest import make_project
from safetensors.torch import load_file, save_file
from test_lora import LINEARS, make_adapter, peft_merged

from merge_dag.core.engine import merge
from merge_dag.core.recipe import load_recipe
from merge_dag.dagster.definitions import ALL_JOB, build_definitions
from merge_dag.dagster.resources import MergeDagResource
from merge_dag.dagster.steps import resolve_path
from merge_dag.dagster.watch import evaluate_models, is_complete_checkpoint
from merge_dag.guidance.activations import ActivationStats
from merge_dag.lineage.audit import audit
from merge_dag.lineage.store import LineageStore
from merge_dag.project import load_project

from _models import load_all

ROOT = Path(__file__).resolve().parents[1]
CI = "data/models/ci"
LORA = "data/models/lora"
RECIPES = {
    "ta_lora": f"""
name: ta_lora
merge_method: task_arithmetic
base_model: {CI}/base
models:
  - {{lora: {LORA}/arev, calibration: arev, parameters: {{weight: 0.7}}}}
  - {{model: {CI}/base+{LORA}/sort, calibration: sort}}
parameters: {{weight: 1.0, lambda: 0.9}}
evals: [zoo_arev]
""",
    "ties_glob_lewis": f"""
name: ties_glob_lewis
merge_method: ties
base_model: {CI}/base
models:
  - {{glob: {LORA}/*, calibration: arev}}
parameters: {{weight: 1.0, density: 0.5}}
guidance:
  sparsity: {{method: lewis, gamma: 0.2, epsilon: 0.9}}
""",
    "ta_sens_aim": f"""
name: ta_sens_aim
merge_method: task_arithmetic
base_model: {CI}/base
models:
  - {{lora: {LORA}/arev, calibration: arev}}
  - {{lora: {LORA}/sort, calibration: sort}}
parameters: {{weight: 1.0, lambda: 0.6}}
guidance:
  coefficients: {{method: sens, temperature: 3}}
  aim: {{calibration: arev, omega: 0.4}}
""",
    "regmean_lora": f"""
name: regmean_lora
merge_method: linear
models:
  - {{model: {CI}/base, lora: {LORA}/arev, calibration: arev}}
  - {{model: {CI}/base, lora: {LORA}/sort, calibration: sort}}
parameters: {{weight: 1.0}}
guidance:
  regmean: {{a: 0.9}}
""",
}


def _adapter(root: Path, name: str, seed: int) -> Path:
    return make_adapter(
        root / CI / "base",
        root / LORA / name,
        seed,
        r=4,
        lora_alpha=8,
        target_modules=LINEARS,
        use_rslora=seed % 2 == 0,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory, ci_zoo):
    root = make_project(
        tmp_path_factory.mktemp("lora_project"), {f"{n}.yaml": t for n, t in RECIPES.items()}, models=("base",)
    )
    _adapter(root, "arev", 11)
    _adapter(root, "sort", 12)
    return root


@pytest.fixture(scope="module")
def first_run(project):
    with dg.instance_for_test() as inst:
        res = MergeDagResource(
            root=str(project),
            eval_limit=6,
            db_path=str(project / "data" / "lineage.duckdb"),
            calibration_batch_size=16,
            calibration_max_rows=32,
        )
        result = build_definitions(project, resource=res).resolve_job_def(ALL_JOB).execute_in_process(instance=inst)
        assert result.success
        yield result


def artifact(result, root: Path, *key: str) -> Path:
    """The artifact folder of asset `key` (metadata paths are relative to the project root)."""
    for ev in result.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        if tuple(mat.asset_key.path) == key:
            return Path(resolve_path(root, mat.metadata["path"].value))
    raise KeyError(key)


def built(result) -> set[str]:
    return {
        "/".join(ev.event_specific_data.materialization.asset_key.path)
        for ev in result.get_asset_materialization_events()
    }


def test_adapters_are_sources_not_task_vectors(project, first_run):
    p = load_project(project)
    m = p.models["lora_arev"]
    assert m.is_adapter and m.base == project / CI / "base" and m.base_name == "ci_base"
    assert not p.task_vectors  # an adapter's delta is computed per tensor inside the merge
    # the correctness checks pass (the score checks, not_below_base / no_task_collapsed, judge quality)
    evals = [
        c
        for c in first_run.get_asset_check_evaluations()
        if c.check_name in ("loads_and_matches_base", "embeddings_sane")
    ]
    assert evals and all(c.passed for c in evals)
    names = built(first_run)
    assert {
        "merged/ta_lora",
        "merged/ties_glob_lewis",
        "merged/ta_sens_aim",
        "merged/regmean_lora",
        "eval/model/lora_arev",
        "activations/lora_arev__arev",
        "sensitivity/lora_sort__sort",
        "alignment/lora_arev__arev__and__lora_sort__sort",
        "grams/lora_sort__sort",
        "importance/lora_sort__arev",
        "allocation/ties_glob_lewis",
    } <= names
    # nothing dense was written for an expert: every artifact is a merge, a statistic or an eval
    kinds = {p.name for p in (project / "data" / "artifacts").iterdir()}
    assert "task_vector" not in kinds


def test_merge_equals_the_core_engine_on_the_same_recipe(project, first_run):
    got = load_all(artifact(first_run, project, "merged", "ta_lora"))
    rec = load_recipe(project / "data" / "recipes" / "ta_lora.yaml", root=project)
    merge(rec, project / "direct")
    want = load_all(project / "direct")
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    # and the math, against peft's merge_and_unload
    base = load_all(project / CI / "base")
    ref = {k: peft_merged(project / CI / "base", project / LORA / k) for k in ("arev", "sort")}
    for n in list(base)[:6]:
        want_n = base[n] + 0.9 * (0.7 * (ref["arev"][n] - base[n]) + (ref["sort"][n] - base[n]))
        torch.testing.assert_close(got[n].float(), want_n, atol=1e-5, rtol=0)


def test_statistics_are_those_of_the_adapted_model(project, first_run):
    """activations/<adapter>: the same numbers as a forward pass of peft's merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = ActivationStats.load(artifact(first_run, project, "activations", "lora_arev__arev"))
    model = AutoModelForCausalLM.from_pretrained(project / CI / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, project / LORA / "arev").merge_and_unload().eval()
    tok = AutoTokenizer.from_pretrained(str(project / CI / "base"))
    texts = [
        json.loads(line)["text"] for line in (project / "data" / "calibration" / "arev.jsonl").read_text().splitlines()
    ][:32]
    captured = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: captured.append(a[0][0]))
    with torch.no_grad():
        for t in texts:
            model(**tok(t, return_tensors="pt"))
    h.remove()
    x = torch.cat(captured)
    name = "model.layers.1.mlp.down_proj.weight"
    assert stats.count[name] == x.shape[0]
    torch.testing.assert_close(stats.sumsq[name], (x * x).sum(0), rtol=1e-4, atol=1e-4)


def test_lineage_and_audit_show_base_and_adapter(project, first_run):
    store = LineageStore(project / "data" / "lineage.duckdb")
    text = audit(store, str(artifact(first_run, project, "merged", "ta_lora")))
    assert "lora/lora_arev" in text and "lora/lora_sort" in text
    assert "adapter/lora_arev" in text and "adapter/lora_sort" in text
    assert text.count("model/ci_base") >= 3  # the merge's base, and under each expert its base
    rows = {r["kind"] for r in store.artifacts()}
    assert {"adapter", "lora", "model"} <= rows
    card = json.loads((artifact(first_run, project, "merged", "ta_lora") / "merge_dag.json").read_text())
    assert {Path(i["adapter"]).name for i in card["inputs"] if "adapter" in i} == {"arev", "sort"}


def test_sensor_waits_for_a_complete_adapter(project, tmp_path):
    """A new adapter folder matched by a glob: half-written (config only, then a truncated weights
    file) it is not valid and triggers nothing however long it sits; complete, it triggers once."""
    p = load_project(project)
    _, cursor = evaluate_models(p, {}, now=0.0, settle_seconds=10)
    src = project / LORA / "sort"
    new = project / LORA / "zz_new"
    new.mkdir()
    shutil.copy(src / "adapter_config.json", new / "adapter_config.json")
    changed, cursor = evaluate_models(p, cursor, now=100.0, settle_seconds=10)
    assert changed == [] and "lora_zz_new" in cursor
    changed, cursor = evaluate_models(p, cursor, now=200.0, settle_seconds=10)
    assert changed == []  # settled, but no weights: not an adapter yet
    data = (src / "adapter_model.safetensors").read_bytes()
    (new / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    from merge_dag.project import ModelSource

    half = ModelSource("lora_zz_new", f"{CI}/base+{LORA}/zz_new", new, project / CI / "base", "ci_base")
    assert not is_complete_checkpoint(half)
    changed, cursor = evaluate_models(p, cursor, now=300.0, settle_seconds=10)
    changed, cursor = evaluate_models(p, cursor, now=400.0, settle_seconds=10)
    assert changed == []  # settled but truncated
    w = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v * 1.5 for k, v in w.items()}, str(new / "adapter_model.safetensors"))
    assert is_complete_checkpoint(half)
    changed, cursor = evaluate_models(p, cursor, now=500.0, settle_seconds=10)
    assert changed == []  # just changed: settling
    changed, cursor = evaluate_models(p, cursor, now=520.0, settle_seconds=10)
    assert changed == ["lora_zz_new"]
    changed, cursor = evaluate_models(p, cursor, now=600.0, settle_seconds=10)
    assert changed == []  # once
    shutil.rmtree(new)


def test_task_vector_asset_of_an_adapter_is_its_exact_delta(project, tmp_path):
    """The project registers no task vector for an adapter (the merge streams it), but the asset works
    for one when built: its float32 delta equals peft's merged weights minus the base."""
    from merge_dag.dagster.assets.task_vectors import task_vector_asset

    p = load_project(project)
    base, expert = p.models["ci_base"], p.models["lora_arev"]
    res = MergeDagResource(
        root=str(project), db_path=str(tmp_path / "lineage.duckdb"), artifacts_dir=str(tmp_path / "artifacts")
    )
    with dg.instance_for_test() as inst:
        result = dg.materialize(
            [task_vector_asset("lora_arev", base, expert)], resources={"merge_dag": res}, instance=inst
        )
        assert result.success
        folder = Path(
            resolve_path(
                project, result.asset_materializations_for_node("task_vector__lora_arev")[0].metadata["path"].value
            )
        )
    tv = load_all(folder)
    b = load_all(project / CI / "base")
    ref = peft_merged(project / CI / "base", project / LORA / "arev")
    for n, d in tv.items():
        torch.testing.assert_close(b[n] + d, ref[n], atol=1e-6, rtol=0, msg=n)


def test_merge_dag_merge_runs_guided_lora_recipes_like_the_project(project, first_run, monkeypatch, tmp_path):
    """`merge-dag merge` on guided recipes with LoRA experts (Sens + AIM, RegMean) writes the tensors of
    the project's merged/<recipe> (the statistics computed in memory through the same core code)."""
    from merge_dag.cli import main

    monkeypatch.chdir(project)
    for name in ("ta_sens_aim", "regmean_lora"):
        out = tmp_path / name
        batches = ["--calibration-batch-size", "16", "--calibration-max-rows", "32"]  # as the project's resource
        assert main(["merge", f"data/recipes/{name}.yaml", str(out), *batches, "--no-progress"]) == 0
        got = load_all(out)
        want = load_all(artifact(first_run, project, "merged", name))
        assert set(got) == set(want)
        for n in want:
            assert torch.equal(got[n], want[n]), (name, n)
