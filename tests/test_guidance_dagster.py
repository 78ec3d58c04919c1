"""Data-guided merging through Dagster on a copy of the ci zoo: every statistic, allocation and
coefficient map against its formula, the merges against direct computations, statistics shared
across recipes (no second forward pass), and a calibration edit rebuilding exactly its dependents."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_project

from merge_dag.core.checkpoint import Checkpoint
from merge_dag.dagster.definitions import ALL_JOB, build_definitions
from merge_dag.dagster.resources import MergeDagResource
from merge_dag.guidance.activations import ActivationStats
from merge_dag.guidance.regmean import regmean_checkpoint
from merge_dag.lineage.store import LineageStore

ROOT = Path(__file__).resolve().parents[1]
CI = "data/models/ci"
MODELS3 = f"""
models:
  - {{model: {CI}/arev, calibration: arev}}
  - {{model: {CI}/sort, calibration: sort}}
  - {{model: {CI}/ashift, calibration: ashift}}
"""
RECIPES = {
    "ties_lewis": f"""
name: ties_lewis
merge_method: ties
base_model: {CI}/base
models:
  - {{model: {CI}/arev, calibration: arev}}
  - {{model: {CI}/sort, calibration: sort}}
parameters: {{weight: 1.0, density: 0.5, lambda: 1.0}}
guidance:
  sparsity: {{method: lewis, gamma: 0.2, epsilon: 0.9, mean_density: 0.5}}
evals: [zoo_arev]
""",
    "ta_sens": f"""
name: ta_sens
merge_method: task_arithmetic
base_model: {CI}/base
{MODELS3}
parameters: {{weight: 1.0, lambda: 0.6}}
guidance:
  coefficients: {{method: sens, temperature: 3}}
""",
    "ta_aim": f"""
name: ta_aim
merge_method: task_arithmetic
base_model: {CI}/base
{MODELS3}
parameters: {{weight: 1.0, lambda: 0.6}}
guidance:
  aim: {{calibration: arev, omega: 0.4}}
""",
    "ta": f"""
name: ta
merge_method: task_arithmetic
base_model: {CI}/base
{MODELS3}
parameters: {{weight: 1.0, lambda: 0.6}}
""",
    "regmean": f"""
name: regmean
merge_method: linear
models:
  - {{model: {CI}/arev, calibration: arev}}
  - {{model: {CI}/sort, calibration: sort}}
parameters: {{weight: 1.0}}
guidance:
  regmean: {{a: 0.9}}
""",
}

ALL_BUILT = {
    "activations/ci_base__arev",
    "activations/ci_arev__arev",
    "activations/ci_base__sort",
    "activations/ci_sort__sort",
    "importance/ci_arev__arev",
    "importance/ci_sort__sort",
    "allocation/ties_lewis",
    "sensitivity/ci_arev__arev",
    "sensitivity/ci_sort__sort",
    "sensitivity/ci_ashift__ashift",
    "coefficients/ta_sens",
    "alignment/ci_arev__arev__and__ci_ashift__ashift__and__ci_sort__sort",
    "grams/ci_arev__arev",
    "grams/ci_sort__sort",
    "task_vector/ci_arev",
    "task_vector/ci_sort",
    "task_vector/ci_ashift",
    "merged/ties_lewis",
    "merged/ta_sens",
    "merged/ta_aim",
    "merged/ta",
    "merged/regmean",
    "eval/merged_ties_lewis",
    "eval/model_ci_base",
    "eval/model_ci_arev",
    "eval/model_ci_sort",
    "leaderboard/leaderboard",
}
AREV_DEPENDENTS = {
    "activations/ci_base__arev",
    "activations/ci_arev__arev",
    "importance/ci_arev__arev",
    "allocation/ties_lewis",
    "merged/ties_lewis",
    "eval/merged_ties_lewis",
    "leaderboard/leaderboard",
    "sensitivity/ci_arev__arev",
    "coefficients/ta_sens",
    "alignment/ci_arev__arev__and__ci_ashift__ashift__and__ci_sort__sort",  # the alignment reads arev's texts
    "merged/ta_sens",
    "merged/ta_aim",  # AIM: the base's statistics on arev
    "grams/ci_arev__arev",
    "merged/regmean",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, ci_zoo):
    root = make_project(
        tmp_path_factory.mktemp("guided"),
        {f"{n}.yaml": t for n, t in RECIPES.items()},
        models=("base", "arev", "ashift", "sort"),
    )
    PROJECT_ROOT[:] = [root]
    return root


def run_all(root: Path, instance):
    res = MergeDagResource(
        root=str(root), eval_limit=12, db_path=str(root / "data" / "lineage.duckdb"), calibration_batch_size=16
    )
    result = build_definitions(root, resource=res).resolve_job_def(ALL_JOB).execute_in_process(instance=instance)
    assert result.success
    return result


def events(root: Path, run_id: str, kind: str) -> set[str]:
    return {
        e["step"] for e in LineageStore(root / "data" / "lineage.duckdb").events(run_id=run_id) if e["event"] == kind
    }


PROJECT_ROOT: list[Path] = []  # the module's project folder, set by the `project` fixture


def artifact(result, *key: str, root: Path | None = None) -> Path:
    """The artifact folder of an asset's materialization (metadata paths are relative to the project)."""
    for ev in result.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        if tuple(mat.asset_key.path) == key:
            path = Path(mat.metadata["path"].value)
            assert not path.is_absolute(), path
            return (root or PROJECT_ROOT[0]) / path
    raise KeyError(key)


def result_json(result, *key: str) -> dict:
    return json.loads((artifact(result, *key) / "result.json").read_text())


@pytest.fixture(scope="module")
def first_run(project, instance):
    return run_all(project, instance)


def test_first_run_builds_each_statistic_once(project, first_run):
    assert events(project, first_run.run_id, "materialized") == ALL_BUILT
    assert all(c.passed for c in first_run.get_asset_check_evaluations())


def test_activation_statistics_match_a_direct_forward_pass(project, first_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats = ActivationStats.load(artifact(first_run, "activations", "ci_arev__arev"))
    folder = project / CI / "arev"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    texts = [
        json.loads(line)["text"] for line in (project / "data" / "calibration" / "arev.jsonl").read_text().splitlines()
    ]
    captured = []
    name = "model.layers.1.mlp.down_proj.weight"
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: captured.append(a[0][0]))
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding at all
            model(**tok(t, return_tensors="pt"))
    h.remove()
    x = torch.cat(captured)
    assert stats.count[name] == x.shape[0]
    torch.testing.assert_close(stats.sumsq[name], (x * x).sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.maxabs[name], x.abs().amax(0), rtol=1e-5, atol=1e-6)


def test_allocation_is_the_lewis_formula_and_the_merge_uses_it(project, first_run):
    alloc = result_json(first_run, "allocation", "ties_lewis")
    base_ck = Checkpoint(project / CI / "base")
    sizes = {n: base_ck.info(n).numel for n in base_ck.tensor_names}
    for expert, cal in (("arev", "arev"), ("sort", "sort")):
        imp = result_json(first_run, "importance", f"ci_{expert}__{cal}")
        # importance by hand: ||W * sqrt(sumsq / N)||_F, from the statistics and the weights
        st = ActivationStats.load(artifact(first_run, "activations", f"ci_{expert}__{cal}"))
        ck = Checkpoint(project / CI / expert)
        for n in list(st.names)[:4]:
            w = ck.get(n, dtype=torch.float32)
            assert imp["expert"][n] == pytest.approx(
                float((w.abs() * (st.sumsq[n] / st.count[n]).sqrt()).norm()), rel=1e-5
            )
        # shift normalised per module type, rescaled into [gamma, epsilon], shifted to mean density 0.5
        d = {n: abs(imp["expert"][n] - imp["base"][n]) for n in imp["base"]}
        types = {n: n.split(".", 3)[3] for n in d}
        tot = {t: sum(v for n, v in d.items() if types[n] == t) for t in set(types.values())}
        d = {n: v / tot[types[n]] for n, v in d.items()}
        lo, hi = min(d.values()), max(d.values())
        d = {n: 0.2 + (v - lo) / (hi - lo) * 0.7 for n, v in d.items()}
        got = alloc["densities"][f"{CI}/{expert}"]
        c = got[next(iter(got))] - d[next(iter(got))]
        for n in d:
            assert got[n] == pytest.approx(min(1, max(0.01, d[n] + c)), abs=1e-9)
        mean = sum(got[n] * sizes[n] for n in got) / sum(sizes[n] for n in got)
        assert mean == pytest.approx(0.5, abs=1e-6)
    # the merged checkpoint is the engine's TIES with exactly these densities
    from merge_dag.core.engine import execute, plan_merge
    from merge_dag.core.recipe import load_recipe
    from merge_dag.guidance.apply import guided_recipe

    recipe = load_recipe(project / "data" / "recipes" / "ties_lewis.yaml", root=project)
    plan = plan_merge(guided_recipe(recipe, alloc["densities"], None, 4))
    step = next(s for s in plan.steps if s.name == "model.layers.2.self_attn.v_proj.weight")
    assert step.sources[0].params["density"] == alloc["densities"][f"{CI}/arev"][step.name]
    assert next(s for s in plan.steps if s.name == "model.embed_tokens.weight").sources[0].params["density"] == 0.5
    out = execute(plan, project / "direct_ties_lewis", progress=False)
    merged = Checkpoint(artifact(first_run, "merged", "ties_lewis"))
    for n in out_names(out):
        assert torch.equal(merged.get(n), Checkpoint(out.out_dir).get(n)), n


def out_names(result) -> list[str]:
    return Checkpoint(result.out_dir).tensor_names


def test_coefficients_are_the_sens_formula_and_the_merge_uses_them(project, first_run):
    co = result_json(first_run, "coefficients", "ta_sens")
    experts = [f"{CI}/{e}" for e in ("arev", "sort", "ashift")]
    sens = {
        e: result_json(first_run, "sensitivity", f"ci_{e.rsplit('/', 1)[1]}__{e.rsplit('/', 1)[1]}")["sensitivity"]
        for e in experts
    }
    g = co["alignment"]
    # the alignment is its own asset (streamed, one model at a time): the in-memory computation's numbers
    from merge_dag.guidance.calibration import load_batches, load_tokenizer
    from merge_dag.guidance.model import load_model
    from merge_dag.guidance.sens import alignment

    assert result_json(first_run, "alignment", "ci_arev__arev__and__ci_ashift__ashift__and__ci_sort__sort")[
        "alignment"
    ] == {i: {j: pytest.approx(g[i][j], rel=1e-12) for j in experts} for i in experts}
    tok = load_tokenizer(project / CI / "base")
    cal = project / "data" / "calibration"
    tasks = {e: load_batches(cal / f"{e.rsplit('/', 1)[1]}.jsonl", tok, 16) for e in experts}
    direct = alignment({e: load_model(project / e) for e in experts}, tasks)
    assert g == {i: {j: pytest.approx(direct[i][j], rel=1e-9) for j in experts} for i in experts}
    assert all(g[i][i] == 0 for i in experts) and all(g[i][j] > 0 for i in experts for j in experts if i != j)
    a = {i: sum(math.exp(-g[i][j]) for j in experts if j != i) / 2 for i in experts}
    tau = {i: a[i] / (sum(a.values()) / 3) for i in experts}
    assert co["tau"] == pytest.approx(tau)
    for layer in ("0", "3"):
        alpha = {e: sens[e][layer] / math.sqrt(sum(v * v for v in sens[e].values())) for e in experts}
        z = {e: math.exp(alpha[e] * tau[e] / 3) for e in experts}
        for e in experts:
            assert co["sigma"][e][layer] == pytest.approx(z[e] / sum(z.values()), rel=1e-9)
    # merged = base + lambda * sum_i K sigma_i^l delta_i
    name = "model.layers.3.mlp.up_proj.weight"
    base = Checkpoint(project / CI / "base").get(name, dtype=torch.float32)
    want = base + 0.6 * sum(
        3 * co["sigma"][e]["3"] * (Checkpoint(project / e).get(name, dtype=torch.float32) - base) for e in experts
    )
    got = Checkpoint(artifact(first_run, "merged", "ta_sens")).get(name, dtype=torch.float32)
    torch.testing.assert_close(got, want.to(got.dtype).float(), rtol=0, atol=1e-2 * float(base.abs().max()) / 256)


def test_aim_relaxes_the_plain_merge_by_the_bases_activations(project, first_run):
    st = ActivationStats.load(artifact(first_run, "activations", "ci_base__arev"))
    plain, aim = Checkpoint(artifact(first_run, "merged", "ta")), Checkpoint(artifact(first_run, "merged", "ta_aim"))
    base = Checkpoint(project / CI / "base")
    name = "model.layers.0.self_attn.o_proj.weight"
    m = st.sumabs[name] / st.count[name]
    factor = 1 - (m / m.max()) * (1 - 0.4)
    b = base.get(name, dtype=torch.float32)
    want = b + (plain.get(name, dtype=torch.float32) - b) * factor.unsqueeze(0)
    torch.testing.assert_close(aim.get(name, dtype=torch.float32), want.to(aim.info(name).dtype).float())
    assert torch.equal(aim.get("model.embed_tokens.weight"), plain.get("model.embed_tokens.weight"))
    card = json.loads((artifact(first_run, "merged", "ta_aim") / "merge_dag.json").read_text())
    assert card["aim"]["omega"] == 0.4 and card["guidance"]["recipe"]["aim"]["calibration"] == "arev"


def test_regmean_solves_each_linear_from_the_gram_matrices(project, first_run):
    grams = [ActivationStats.load(artifact(first_run, "grams", f"ci_{e}__{e}")) for e in ("arev", "sort")]
    name = "model.layers.2.mlp.gate_proj.weight"
    ws = [Checkpoint(project / CI / e).get(name, dtype=torch.float32) for e in ("arev", "sort")]
    gs = []
    for st in grams:
        g = st.gram_sum(name) / st.count[name]
        gs.append(0.9 * g + 0.1 * torch.diag(torch.diagonal(g)))
    want = sum(w @ g for w, g in zip(ws, gs)) @ torch.linalg.inv(sum(gs))
    got = Checkpoint(artifact(first_run, "merged", "regmean")).get(name, dtype=torch.float32)
    torch.testing.assert_close(got, want.to(torch.float32), rtol=2e-2, atol=2e-3)
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(
        Checkpoint(artifact(first_run, "merged", "regmean")).get(emb, dtype=torch.float32),
        sum(Checkpoint(project / CI / e).get(emb, dtype=torch.float32) for e in ("arev", "sort")) / 2,
    )


def test_a_second_recipe_reusing_a_calibration_set_runs_no_forward_pass(project, instance, first_run):
    extra = project / "data" / "recipes" / "ties_lewis_b.yaml"
    extra.write_text(
        RECIPES["ties_lewis"]
        .replace("name: ties_lewis", "name: ties_lewis_b")
        .replace("epsilon: 0.9", "epsilon: 0.7")
        .replace("evals: [zoo_arev]", "")
    )
    try:
        after = run_all(project, instance)
        assert events(project, after.run_id, "materialized") == {"allocation/ties_lewis_b", "merged/ties_lewis_b"}
        assert {s for s in events(project, after.run_id, "cache_hit") if s.startswith("activations/")} == {
            "activations/ci_base__arev",
            "activations/ci_arev__arev",
            "activations/ci_base__sort",
            "activations/ci_sort__sort",
        }
    finally:
        extra.unlink()


def test_a_second_sens_recipe_reuses_the_alignment(project, instance, first_run):
    extra = project / "data" / "recipes" / "ta_sens_b.yaml"
    recipe = RECIPES["ta_sens"].replace("name: ta_sens", "name: ta_sens_b")
    extra.write_text(recipe.replace("temperature: 3", "temperature: 2"))
    try:
        after = run_all(project, instance)
        assert events(project, after.run_id, "materialized") == {"coefficients/ta_sens_b", "merged/ta_sens_b"}
        assert "alignment/ci_arev__arev__and__ci_ashift__ashift__and__ci_sort__sort" in events(
            project, after.run_id, "cache_hit"
        )
    finally:
        extra.unlink()


def test_editing_a_calibration_file_rebuilds_exactly_its_dependents(project, instance, first_run):
    run_all(project, instance)
    cal = project / "data" / "calibration" / "arev.jsonl"
    original = cal.read_text()
    cal.write_text(original + json.dumps({"text": "arev:abcdefgh=hgfedcba"}) + "\n")
    try:
        after = run_all(project, instance)
        assert events(project, after.run_id, "materialized") == AREV_DEPENDENTS
        assert events(project, after.run_id, "cache_hit") == ALL_BUILT - AREV_DEPENDENTS
    finally:
        cal.write_text(original)


def test_sequential_wanda_statistics_are_their_own_assets(tmp_path):
    from merge_dag.project import load_project

    (tmp_path / "data" / "recipes").mkdir(parents=True)
    shutil.copytree(ROOT / "data" / "calibration", tmp_path / "data" / "calibration")
    plain = RECIPES["ties_lewis"].replace("evals: [zoo_arev]", "")
    (tmp_path / "data" / "recipes" / "a.yaml").write_text(plain)
    (tmp_path / "data" / "recipes" / "b.yaml").write_text(
        plain.replace("name: ties_lewis", "name: seq").replace(
            "mean_density: 0.5}", "mean_density: 0.5, sequential: true}"
        )
    )
    p = load_project(tmp_path)
    assert set(p.activations) == {
        "ci_base__arev",
        "ci_arev__arev",
        "ci_base__sort",
        "ci_sort__sort",
        "ci_base__arev__seqwanda50",
        "ci_arev__arev__seqwanda50",
        "ci_base__sort__seqwanda50",
        "ci_sort__sort__seqwanda50",
    }
    assert p.importances["ci_arev__arev__seqwanda50"].base.sequential == 0.5
    assert set(p.calibrations) == {"arev", "sort"}


def test_guidance_pages_show_heatmaps_saved_in_the_artifact(project, first_run):
    """allocation, coefficients, sensitivity and importance draw a PNG into their own artifact folder
    and show it inline (a data URI) in their metadata; the allocation panels are the densities."""
    import base64

    from merge_dag.charts import allocation_panels

    files = {
        "allocation": "allocation.png",
        "coefficients": "coefficients.png",
        "sensitivity": "sensitivity.png",
        "importance": "shift.png",
    }
    seen = set()
    for ev in first_run.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        kind = mat.asset_key.path[0]
        if kind in files:
            png = artifact(first_run, *mat.asset_key.path) / files[kind]
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 120_000
            md = mat.metadata["heatmap"].value
            assert md.endswith(f"(data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})")
            seen.add(kind)
    assert seen == set(files)
    dens = result_json(first_run, "allocation", "ties_lewis")["densities"]
    panels = {p.title: p for p in allocation_panels(dens)}
    assert set(panels) == {
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    }
    up = panels["mlp.up_proj"]
    assert up.rows == ["arev", "sort"] and up.cols == ["0", "1", "2", "3"]
    for i, expert in enumerate(("arev", "sort")):
        for j in range(4):
            assert up.values[i][j] == dens[f"{CI}/{expert}"][f"model.layers.{j}.mlp.up_proj.weight"]


def test_answer_only_statistics_are_their_own_assets_on_the_answer_tokens(tmp_path, instance):
    """`guidance.tokens: answer` names its own statistics (`__answer`), computes them on the answer
    tokens of prompt/answer rows, and leaves the plain recipe's statistics and cache keys alone."""
    import dagster as dg

    from merge_dag.guidance.calibration import load_batches, load_tokenizer
    from merge_dag.project import load_project

    plain = RECIPES["regmean"]
    answer = plain.replace("name: regmean", "name: regmean_answer").replace(
        "regmean: {a: 0.9}", "regmean: {a: 0.9}\n  tokens: answer"
    )
    for t in ("arev", "sort"):
        answer = answer.replace(f"calibration: {t}", f"calibration: {t}_qa")
    root = make_project(tmp_path, {"regmean.yaml": plain, "regmean_answer.yaml": answer})
    cal = root / "data" / "calibration"
    for task in ("arev", "sort"):
        rows = [json.loads(line)["text"] for line in (cal / f"{task}.jsonl").read_text().splitlines() if line]
        (cal / f"{task}_qa.jsonl").write_text(
            "".join(json.dumps({"prompt": t[: t.index("=") + 1], "answer": t[t.index("=") + 1 :]}) + "\n" for t in rows)
        )
    p = load_project(root)
    assert set(p.grams) == {"ci_arev__arev", "ci_sort__sort", "ci_arev__arev_qa__answer", "ci_sort__sort_qa__answer"}
    assert p.grams["ci_arev__arev_qa__answer"].row_settings == {"calibration_tokens": "answer"}
    assert p.grams["ci_arev__arev"].row_settings == {}  # the plain statistic's cache key has no new entry
    assert "tokens" not in p.recipes["regmean"].recipe.to_yaml_dict()["guidance"]
    res = MergeDagResource(root=str(root), db_path=str(root / "data" / "lineage.duckdb"), calibration_batch_size=16)
    keys = [dg.AssetKey(["grams", f"ci_{t}__{t}_qa__answer"]) for t in ("arev", "sort")]
    job = build_definitions(root, resource=res).resolve_job_def(ALL_JOB)
    keys.append(dg.AssetKey(["merged", "regmean_answer"]))
    result = job.execute_in_process(instance=instance, asset_selection=keys)
    assert result.success
    stats = []
    for t in ("arev", "sort"):
        st = ActivationStats.load(artifact(result, "grams", f"ci_{t}__{t}_qa__answer", root=root))
        batches = load_batches(cal / f"{t}_qa.jsonl", load_tokenizer(root / CI / t), batch_size=16, tokens="answer")
        n_answer = sum(b.selected_tokens for b in batches)
        assert n_answer < sum(b.tokens for b in batches)
        assert set(st.count.values()) == {n_answer} and st.meta["selected_tokens"] == n_answer
        assert st.meta["calibration_tokens"] == "answer"
        stats.append(st)
    direct = regmean_checkpoint([root / CI / "arev", root / CI / "sort"], stats, tmp_path / "direct", a=0.9)
    merged = Checkpoint(artifact(result, "merged", "regmean_answer", root=root))
    want = Checkpoint(direct)
    for n in want.tensor_names:
        assert torch.equal(merged.get(n), want.get(n)), n


def test_robust_variants_are_recipe_options_computed_by_the_core(tmp_path, instance):
    """LEWIS `scaling: rank` + `clip_quantile` and Sens `normalize: layer` through Dagster equal the core
    functions on the statistics the run stored; the clipped importance is its own asset, and recipes
    without the options keep their settings (the new keys are left out while unset)."""
    import dagster as dg

    from merge_dag.core.recipe import CoefficientGuidance, SparsityGuidance
    from merge_dag.guidance import lewis, sens
    from merge_dag.project import load_project

    robust = (
        RECIPES["ties_lewis"]
        .replace("name: ties_lewis", "name: lewis_rank")
        .replace("mean_density: 0.5}", "mean_density: 0.5, scaling: rank, clip_quantile: 0.9}")
        .replace("evals: [zoo_arev]", "")
    )
    layer = (
        RECIPES["ta_sens"]
        .replace("name: ta_sens", "name: sens_layer")
        .replace("temperature: 3}", "temperature: 0.5, normalize: layer, alignment: false}")
    )
    recipes = {"lewis_rank.yaml": robust, "sens_layer.yaml": layer}
    root = make_project(tmp_path, recipes, models=("base", "arev", "ashift", "sort"))
    p = load_project(root)
    assert set(p.importances) == {"ci_arev__arev__clip0p9", "ci_sort__sort__clip0p9"}
    assert set(p.activations) == {"ci_base__arev", "ci_arev__arev", "ci_base__sort", "ci_sort__sort"}
    assert "scaling" not in SparsityGuidance().settings_dump()
    assert "normalize" not in CoefficientGuidance().settings_dump()
    assert SparsityGuidance(scaling="rank").settings_dump()["scaling"] == "rank"
    res = MergeDagResource(root=str(root), db_path=str(root / "data" / "lineage.duckdb"), calibration_batch_size=16)
    keys = [dg.AssetKey(["allocation", "lewis_rank"]), dg.AssetKey(["coefficients", "sens_layer"])]
    job = build_definitions(root, resource=res).resolve_job_def(ALL_JOB)
    result = job.execute_in_process(
        instance=instance,
        asset_selection=keys
        + [dg.AssetKey(["importance", n]) for n in p.importances]
        + [dg.AssetKey(["activations", n]) for n in p.activations]
        + [dg.AssetKey(["sensitivity", n]) for n in p.sensitivities],
    )
    assert result.success
    act = {n: ActivationStats.load(artifact(result, "activations", n, root=root)) for n in p.activations}
    ck = Checkpoint(root / CI / "base")
    sizes = {n: ck.info(n).numel for n in ck.tensor_names}
    alloc = artifact(result, "allocation", "lewis_rank", root=root)
    dens = json.loads((alloc / "result.json").read_text())["densities"]
    for e in ("arev", "sort"):
        ib = lewis.importance(act[f"ci_base__{e}"], root / CI / "base", clip_quantile=0.9)
        ie = lewis.importance(act[f"ci_{e}__{e}"], root / CI / e, clip_quantile=0.9)
        want = lewis.match_mean(lewis.rescale(lewis.shifts(ib, ie), 0.2, 0.9, "rank"), sizes, 0.5)
        assert dens[f"{CI}/{e}"] == pytest.approx(want, rel=1e-9)
        assert lewis.weighted_mean(dens[f"{CI}/{e}"], sizes) == pytest.approx(0.5, abs=1e-9)
    sigma = json.loads((artifact(result, "coefficients", "sens_layer", root=root) / "result.json").read_text())
    s = {}
    for e in ("arev", "sort", "ashift"):
        r = json.loads((artifact(result, "sensitivity", f"ci_{e}__{e}", root=root) / "result.json").read_text())
        s[f"{CI}/{e}"] = {int(k): v for k, v in r["sensitivity"].items()}
    want = sens.coefficients(s, {r: 1.0 for r in s}, 0.5, "layer")
    for r, c in sigma["sigma"].items():
        assert {int(k): v for k, v in c.items()} == pytest.approx(want[r], rel=1e-12)


def test_merge_dag_merge_runs_a_guided_recipe_like_the_project(project, first_run, monkeypatch, tmp_path, capsys):
    """`merge-dag merge` on each guided recipe, run inside the project, reads every statistic from the
    project's artifact store (the Dagster assets' artifacts, same keys: a cache hit each, nothing
    recomputed) and writes the same tensors as the Dagster project's merged/<recipe> (same calibration
    batch size); with --no-cache it computes them in memory through the same core code, same tensors."""
    from merge_dag.cli import main

    monkeypatch.chdir(project)
    for name in ("ties_lewis", "ta_sens", "ta_aim", "regmean"):
        out = tmp_path / name
        args = ["merge", f"data/recipes/{name}.yaml", str(out), "--calibration-batch-size", "16", "--no-progress"]
        assert main(args) == 0
        err = capsys.readouterr().err
        # inside the project: every statistic is the Dagster asset's artifact (same key), none recomputed
        assert "statistics: the project's cache" in err and ": cache hit " in err, err
        assert "(stored in the project's cache)" not in err, err
        got, want = Checkpoint(out), Checkpoint(artifact(first_run, "merged", name))
        assert got.tensor_names == want.tensor_names
        for n in want.tensor_names:
            assert torch.equal(got.get(n), want.get(n)), (name, n)
        card = json.loads((out / "merge_dag.json").read_text())
        assert card["guidance"]["statistics"], name
    nocache = ["merge", "data/recipes/regmean.yaml", str(tmp_path / "nc"), "--calibration-batch-size", "16"]
    assert main([*nocache, "--no-progress", "--no-cache"]) == 0
    assert "cache hit" not in capsys.readouterr().err  # --no-cache: computed in memory
    for n in Checkpoint(tmp_path / "regmean").tensor_names:
        assert torch.equal(Checkpoint(tmp_path / "nc").get(n), Checkpoint(tmp_path / "regmean").get(n)), n
    assert main(["merge", "data/recipes/ta_sens.yaml", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "guidance: coefficients: statistics computed before the merge" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    assert main(["merge", "data/recipes/ta_sens.yaml", str(tmp_path / "x"), "--calibration-batch-size", "0"]) == 2
    assert "--calibration-batch-size" in capsys.readouterr().err


def test_statistics_computed_from_the_shell_are_cache_hits_for_dagster(tmp_path, instance, monkeypatch, capsys):
    """The other direction: `merge-dag merge` inside a fresh project computes the Grams, sensitivities
    and alignment and stores them under the assets' keys; the next Dagster run of those assets
    records a cache hit for every one of them and builds nothing."""
    import dagster as dg

    from merge_dag.cli import main
    from merge_dag.project import load_project

    recipes = {"regmean.yaml": RECIPES["regmean"], "ta_sens.yaml": RECIPES["ta_sens"]}
    root = make_project(tmp_path / "p", recipes, models=("base", "arev", "ashift", "sort"))
    monkeypatch.chdir(root)
    for name in ("regmean", "ta_sens"):
        args = ["merge", f"data/recipes/{name}.yaml", str(tmp_path / name), "--calibration-batch-size", "16"]
        assert main([*args, "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "(stored in the project's cache)" in err and "cache hit" not in err, err
    p = load_project(root)
    keys = (
        [dg.AssetKey(["grams", n]) for n in p.grams]
        + [dg.AssetKey(["sensitivity", n]) for n in p.sensitivities]
        + [dg.AssetKey(["alignment", n]) for n in p.alignments]
    )
    assert len(keys) == 2 + 3 + 1
    res = MergeDagResource(root=str(root), db_path=str(root / "data" / "lineage.duckdb"), calibration_batch_size=16)
    job = build_definitions(root, resource=res).resolve_job_def(ALL_JOB)
    result = job.execute_in_process(instance=instance, asset_selection=keys)
    assert result.success
    assert events(root, result.run_id, "materialized") == set()
    assert events(root, result.run_id, "cache_hit") == {"/".join(k.path) for k in keys}
