"""The mergekit-only methods against mergekit 0.1.5's own outputs on the same inputs.

tests/fixtures/mergekit_0_1_5 holds four tiny float32 Llama-shaped models, one recipe per case and
the tensors `mergekit-yaml` wrote for it (regenerate with that folder's generate.py, run by a side
virtualenv's python that has mergekit 0.1.5; see its docstring). Here merge_dag merges the same
recipe, unchanged, through the engine, and every output tensor must equal mergekit's to float32
rounding (they are bit for bit equal here). Also each method's contract, its parameter errors,
and its written definition on hand-made cases, including where mergekit is random
(arcee_fusion's quartiles of tensors above 1,000,000 entries)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from test_methods import assert_close, run

from merge_dag.core.engine import merge, plan_merge
from merge_dag.core.errors import MergeInputError, RecipeError
from merge_dag.core.methods import get_method
from merge_dag.core.recipe import load_recipe, parse_recipe

FIX = Path(__file__).resolve().parent / "fixtures" / "mergekit_0_1_5"
NEW = ["nearswap", "sce", "arcee_fusion", "karcher", "multislerp", "nuslerp"]
FIXTURE_METHODS = {
    p.stem: yaml.safe_load(p.read_text())["merge_method"] for p in sorted((FIX / "recipes").glob("*.yaml"))
}
CASES = sorted(c for c, m in FIXTURE_METHODS.items() if m in NEW)


def test_fixtures_cover_every_method_and_say_where_they_came_from():
    assert set(NEW) <= set(FIXTURE_METHODS.values())
    for case in FIXTURE_METHODS:
        with safe_open(str(FIX / "outputs" / f"{case}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["mergekit"] == "0.1.5" and meta["torch"].startswith("2.13.0") and meta["case"] == case


@pytest.mark.parametrize("case", CASES)
def test_equals_mergekit_0_1_5(case, tmp_path):
    recipe = load_recipe(FIX / "recipes" / f"{case}.yaml", root=FIX)
    merge(recipe, tmp_path / "out")
    got = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(str(f)))
    want = load_file(str(FIX / "outputs" / f"{case}.safetensors"))
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        assert got[name].dtype == torch.float32, name
        diff = (got[name] - ref).abs().max().item()
        assert diff <= 2e-6 * max(1.0, ref.abs().max().item()), f"{case}: {name}: max abs diff {diff:.3g}"
    # the case is not trivial: the merge differs from every input
    for key in ("base", "a", "b", "c"):
        sd = load_file(str(FIX / "inputs" / key / "model.safetensors"))
        assert any(not torch.allclose(got[n], sd[n], atol=1e-6) for n in want), (case, key)


def test_memory_estimate_counts_the_methods_work_copies():
    # largest tensor: 16 x 8 = 128 float32 entries (512 bytes), read as float32 (512 bytes raw)
    sce = plan_merge(load_recipe(FIX / "recipes" / "sce.yaml", root=FIX))  # base + 3 models
    assert sce.estimated_peak_bytes() == (4 + 3 * 3 + 3) * 512 + 4 * 512
    swap = plan_merge(load_recipe(FIX / "recipes" / "nearswap.yaml", root=FIX))  # base + 1 model
    assert swap.estimated_peak_bytes() == (2 + 2) * 512 + 2 * 512


def bad_recipe(tmp_path, method, params, n_models=1):
    models = [
        {"model": "inputs/a", "parameters": {"weight": 1.0}},
        {"model": "inputs/b", "parameters": {"weight": 1.0}},
    ]
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {"merge_method": method, "base_model": "inputs/base", "models": models[:n_models], "parameters": params}
        )
    )
    return path


def recipe_with(method, models, base=True, params=None, weights=False):
    return parse_recipe(
        {
            "merge_method": method,
            **({"base_model": "inputs/base"} if base else {}),
            "models": [
                {"model": f"inputs/{m}", **({"parameters": {"weight": 1.0}} if weights else {})} for m in models
            ],
            "parameters": params or {},
        },
        root=FIX,
    )


# ==== nearswap ====
def test_nearswap_contract_and_errors(tmp_path):
    m = get_method("nearswap")
    assert m.requires_base and m.min_models == m.max_models == 1 and m.param("t").required and not m.randomized
    for t in (0, -0.1):
        path = bad_recipe(tmp_path, "nearswap", {"t": t})
        with pytest.raises(RecipeError, match=f"{path}: parameters.t: must be > 0, got {t}"):
            load_recipe(path, root=FIX)
    with pytest.raises(RecipeError, match="nearswap takes at most 1"):
        recipe_with("nearswap", "ab", params={"t": 0.1})


def test_nearswap_definition():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0, 5.0])
    other = torch.tensor([0.05, 0.2, -0.4, 1.0, 5.0 + 1e-6])
    got = run("nearswap", base, [other], t=0.1)
    # |d| = .05 < t: swapped; .2: w = .5; .4: w = .25; equal: unchanged; tiny difference: swapped
    assert_close(got, torch.tensor([0.05, 0.1, -0.1, 1.0, 5.0 + 1e-6]))


# ==== sce ====
def test_sce_contract_and_errors(tmp_path):
    m = get_method("sce")
    assert m.requires_base and m.min_models == 1 and m.max_models is None and not m.randomized
    assert m.param("select_topk").default == 1.0 and m.param("int8_mask").default is False
    path = bad_recipe(tmp_path, "sce", {"select_topk": 1.5})
    with pytest.raises(RecipeError, match=f"{path}: parameters.select_topk: must be in \\[0, 1\\], got 1.5"):
        load_recipe(path, root=FIX)
    with pytest.raises(RecipeError, match="base_model: required by merge_method 'sce'"):
        recipe_with("sce", "ab", base=False)


def test_sce_weights_and_erasure_by_hand():
    base = torch.zeros(4)
    d1 = torch.tensor([1.0, 1.0, -2.0, 0.0])
    d2 = torch.tensor([-1.0, 3.0, 2.0, 0.0])
    w1, w2 = (1 + 1 + 4) / 4, (1 + 9 + 4) / 4
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    # elected signs: sums 0 (+), 4 (+), 0 (+), 0 (+); entry 0: only d1 agrees; entry 2: only d2; entry 3: none
    assert_close(run("sce", base, [d1, d2]), torch.tensor([1.0, (w1 * 1 + w2 * 3) / (w1 + w2), 2.0, 0.0]))
    # select_topk 0.5: variances 1, 1, 4, 0 (3 non-zero) -> the top int(1.5) = 1 entry survives
    assert_close(run("sce", base, [d1, d2], select_topk=0.5), torch.tensor([0.0, 0.0, 2.0, 0.0]))
    assert torch.equal(run("sce", base, [d1, d2], select_topk=0.0), base)
    # tiny task vectors (sum of mean squares < 1e-6): equal weights, as in mergekit
    small = run("sce", base, [d1 * 1e-4, d2 * 1e-4])
    assert_close(small, torch.tensor([1e-4, 2e-4, 2e-4, 0.0]), atol=1e-9)


# ==== arcee_fusion ====
def test_arcee_fusion_contract():
    m = get_method("arcee_fusion")
    assert m.requires_base and m.min_models == m.max_models == 1 and m.params == () and not m.randomized
    with pytest.raises(RecipeError, match="base_model: required by merge_method 'arcee_fusion'"):
        recipe_with("arcee_fusion", "a", base=False)
    with pytest.raises(RecipeError, match="arcee_fusion takes at most 1"):
        recipe_with("arcee_fusion", "ab")


def test_arcee_fusion_uses_exact_quartiles_on_large_tensors():
    # mergekit samples 1,000,000 scores above that size; merge_dag takes the exact order statistics
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1100, 1000, generator=g)
    other = base + 0.1 * torch.randn(1100, 1000, generator=g)
    got = run("arcee_fusion", base, [other])
    p, q = torch.softmax(other, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    score = (other - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = torch.sort(score.reshape(-1)).values
    n = s.numel()
    q1, q2, q3 = (s[int(math.floor(f * (n - 1)))] for f in (0.25, 0.5, 0.75))
    keep = score >= q2 + 1.5 * (q3 - q1)
    assert 0 < keep.sum() < n
    assert torch.equal(got, torch.where(keep, other, base))


# ==== karcher ====
def test_karcher_contract_and_errors(tmp_path):
    m = get_method("karcher")
    assert not m.requires_base and not m.optional_base and m.min_models == 1 and not m.randomized
    assert m.param("max_iter").default == 10 and m.param("tol").default == 1e-5
    for params, msg in (
        ({"max_iter": 2.5}, "parameters.max_iter: must be a whole number >= 0, got 2.5"),
        ({"tol": -1}, "parameters.tol: must be >= 0, got -1"),
    ):
        path = bad_recipe(tmp_path, "karcher", params)
        with pytest.raises(RecipeError, match=f"{path}: {msg}"):
            load_recipe(path, root=FIX)


def test_karcher_of_two_is_the_arc_midpoint_times_the_mean_norm():
    e0, e1 = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    assert_close(run("karcher", None, [e0, e1]), 3.0 * torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]), atol=1e-5)
    z = torch.zeros(3)
    assert torch.equal(run("karcher", None, [z, z]), z)
    a = torch.randn(4, 5)
    assert torch.equal(run("karcher", None, [a]), a)


# ==== multislerp ====
def test_multislerp_contract_and_errors(tmp_path):
    m = get_method("multislerp")
    assert not m.requires_base and m.optional_base and m.min_models == 1 and m.max_models is None
    assert m.param("weight").required and m.param("weight").per_model and not m.randomized
    assert m.param("normalize_weights").default is True and m.param("eps").default == 1e-8
    path = bad_recipe(tmp_path, "multislerp", {"eps": -1}, n_models=2)
    with pytest.raises(RecipeError, match=f"{path}: parameters.eps: must be >= 0, got -1"):
        load_recipe(path, root=FIX)


def test_multislerp_single_input_antipodal_pair_and_errors():
    a = torch.randn(4, 3)
    assert torch.equal(run("multislerp", None, [a], [{"weight": 2.0}]), a)
    got = run("multislerp", None, [a, -a], [{"weight": 1.0}, {"weight": 1.0}])  # mean 0: the linear mix
    assert_close(got, torch.zeros_like(a))
    with pytest.raises(MergeInputError, match="multislerp: tensor 'model.layers.0.mlp.up_proj.weight'"):
        run("multislerp", None, [a, -a, a, -a], [{"weight": 1.0}] * 4)
    with pytest.raises(RecipeError, match="sum to 0"):
        run("multislerp", None, [a, 2 * a], [{"weight": 1.0}, {"weight": -1.0}])
    # a tensor no expert changed: zero task vectors, the base comes back (mergekit raises here)
    assert torch.equal(run("multislerp", a, [a.clone(), a.clone(), a.clone()], [{"weight": 1.0}] * 3), a)
    assert run("multislerp", None, [torch.empty(0, 3)] * 3, [{"weight": 1.0}] * 3).shape == (0, 3)


# ==== nuslerp ====
def test_nuslerp_contract_and_errors(tmp_path):
    m = get_method("nuslerp")
    assert not m.requires_base and m.optional_base and m.min_models == m.max_models == 2 and not m.randomized
    assert m.param("weight").required and m.param("weight").per_model
    assert m.param("nuslerp_flatten").default is True and m.param("nuslerp_row_wise").default is False
    path = bad_recipe(tmp_path, "nuslerp", {"nuslerp_flatten": "yes"}, n_models=2)
    with pytest.raises(RecipeError, match=f"{path}: parameters.nuslerp_flatten: must be true or false"):
        load_recipe(path, root=FIX)
    for base in (False, True):  # with a base, the base is not a third model
        with pytest.raises(RecipeError, match="nuslerp takes at most 2"):
            recipe_with("nuslerp", "abc", base=base, weights=True)
    recipe_with("nuslerp", "ab", weights=True)
    recipe_with("nuslerp", ["base", "a", "b"], weights=True)  # the base listed under models too


def test_nuslerp_weights_give_t_and_colinear_falls_back_to_lerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert_close(run("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": 0.0}]), a)
    assert_close(run("nuslerp", None, [a, b], [{"weight": 0.0}, {"weight": 2.0}]), b, atol=1e-5)
    assert_close(
        run("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}]),  # |sum| < 1e-6: t = 0.5
        run("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": 1.0}]),
    )
    assert_close(run("nuslerp", None, [a, 3 * a], [{"weight": 1.0}, {"weight": 1.0}]), 2 * a)
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # the arc's midpoint, norm 1
    assert_close(
        run("nuslerp", None, [e0, e1], [{"weight": 1.0}, {"weight": 1.0}]),
        torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]),
    )
    base = torch.randn(6, 5, generator=g)  # with a base: on the task vectors
    assert_close(
        run("nuslerp", base, [base + a, base + b], [{"weight": 1.0}, {"weight": 3.0}]),
        base + run("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}]),
        atol=1e-5,
    )
