"""TSV-M (arXiv 2412.00081), Iso-C and Iso-CTS (arXiv 2502.04959) against plain-torch transcriptions
of the papers' algorithms, written here independently of merge_dag's code (float64, stacked bases
without padding), per 2-D weight matrix; other tensors fall back to the mean task vector, as the
papers' code does. Also through the engine on a tiny Llama-shaped model (every tensor of a recipe)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_methods import assert_close, run

from merge_dag.core.engine import merge
from merge_dag.core.errors import RecipeError
from merge_dag.core.methods import get_method
from merge_dag.core.recipe import load_recipe

FIX = Path(__file__).resolve().parent / "fixtures" / "mergekit_0_1_5"


REFS = {}  # method -> its paper's algorithm, transcribed below


def polar(a):
    """Nearest orthogonal matrix (Procrustes): P Q^T from a = P S Q^T."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def experts(shape, n, seed=0, common=0.5):
    """base and n experts whose task vectors share one component (as fine-tunes of one base do)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g) * 0.1
    return base, [base + common * shared + 0.1 * (1 + i) * torch.randn(shape, generator=g) for i in range(n)]


# ==== tsv_merge ====
def ref_tsv(base, xs, lam=1.0):
    """TSV-M, Gargiulo et al. 2025, Alg. 1 / Sec. 4: per task keep the top 1/T of the singular
    triplets, concatenate, orthogonalize U and V (Procrustes), D = U_perp S V_perp^T."""
    ds = [x.double() - base.double() for x in xs]
    if base.dim() != 2:
        return (base.double() + lam * sum(ds) / len(ds)).float()
    k = min(base.shape) // len(ds)
    us, ss, vs = [], [], []
    for d in ds:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    merged = polar(u) @ torch.diag(s) @ polar(v).T
    return (base.double() + lam * merged).float()


REFS["tsv_merge"] = ref_tsv


def test_tsv_of_one_task_is_its_task_vector():
    base, xs = experts((18, 11), 1, seed=5)
    assert_close(run("tsv_merge", base, xs), xs[0], rtol=1e-4, atol=1e-5)


def test_tsv_merged_bases_are_orthonormal_and_keep_each_tasks_singular_values():
    base, xs = experts((24, 16), 2, seed=6)
    d = run("tsv_merge", base, xs) - base
    s = torch.linalg.svdvals(d)
    want = torch.cat([torch.linalg.svdvals(x - base)[:8] for x in xs]).sort(descending=True).values
    assert_close(s, want, rtol=1e-4, atol=1e-5)  # U_perp, V_perp orthonormal: S is the spectrum


def test_tsv_matrix_smaller_than_the_task_count_falls_back_to_the_mean():
    base, xs = experts((2, 9), 3, seed=7)  # r = 2 < T = 3: no rank to share
    assert_close(run("tsv_merge", base, xs, **{"lambda": 0.5}), base + 0.5 * sum(x - base for x in xs) / 3, atol=1e-6)


# ==== iso_c ====
def ref_iso_c(base, xs, lam=1.0):
    """Iso-C, Marczak et al. 2025, Sec. 4.1: SVD of the task-arithmetic sum, every singular value
    replaced by their mean."""
    ds = [x.double() - base.double() for x in xs]
    if base.dim() != 2:
        return (base.double() + lam * sum(ds) / len(ds)).float()
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    return (base.double() + lam * u @ torch.diag(torch.full_like(s, s.mean().item())) @ vh).float()


REFS["iso_c"] = ref_iso_c


def test_iso_c_spectrum_is_flat_and_spans_the_sum():
    base, xs = experts((24, 16), 3)
    d = run("iso_c", base, xs) - base
    s = torch.linalg.svdvals(d)
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-4)
    total = sum(x - base for x in xs)
    assert abs(s.mean().item() - torch.linalg.svdvals(total).mean().item()) < 1e-4
    # same left singular subspace as the task-arithmetic sum
    u = torch.linalg.svd(total, full_matrices=False).U
    assert_close(u @ u.T @ d, d, atol=1e-4)


# ==== iso_cts ====
def ref_iso_cts(base, xs, lam=1.0, fraction=0.8):
    """Iso-CTS, Marczak et al. 2025, Sec. 4.2 / Alg. 1: the top-k common subspace of the sum; per
    task the top (r - k) / T directions of the task matrix with the common subspace projected out;
    concatenate, orthogonalize, isotropic spectrum (mean of the kept singular values)."""
    ds = [x.double() - base.double() for x in xs]
    if base.dim() != 2:
        return (base.double() + lam * sum(ds) / len(ds)).float()
    t = len(ds)
    r = min(base.shape)
    k = int(r * fraction)
    k = r - round((r - k) / t) * t  # the authors' rounding, so the rest splits evenly
    if k < 0:
        k += t
    per = (r - k) // t
    u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
    uc, sc, vc = u[:, :k], s[:k], vh[:k].T
    us, ss, vs = [uc], [sc], [vc]
    for d in ds:
        dp = d - uc @ uc.T @ d
        ui, si, vhi = torch.linalg.svd(dp, full_matrices=False)
        us.append(ui[:, :per])
        ss.append(si[:per])
        vs.append(vhi[:per].T)
    s_all = torch.cat(ss)
    merged = s_all.mean() * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T
    return (base.double() + lam * merged).float()


REFS["iso_cts"] = ref_iso_cts


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_iso_cts_subspace_fractions(fraction, n):
    base, xs = experts((30, 22), n, seed=10 + n)
    got = run("iso_cts", base, xs, common_space_fraction=fraction)
    assert_close(got, ref_iso_cts(base, xs, fraction=fraction), rtol=1e-4, atol=1e-5)


def test_subspace_sizes():
    from merge_dag.core.methods.iso_cts import subspace_sizes

    assert subspace_sizes(16, 3, 0.8) == (13, 1)  # int(12.8) = 12; round(4/3) * 3 = 3 -> k = 13
    assert subspace_sizes(100, 4, 0.8) == (80, 5)
    assert subspace_sizes(3, 2, 0.0) == (1, 1)  # round(1.5) = 2 -> 4 > r: one fewer per task
    assert subspace_sizes(8, 3, 1.0) == (8, 0)
    for r in range(1, 40):
        for t in range(1, 6):
            for f in (0.0, 0.3, 0.8, 1.0):
                k, s = subspace_sizes(r, t, f)
                assert k >= 0 and s >= 0 and k + t * s == r, (r, t, f)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, xs = experts((20, 12), 3, seed=4)
    assert_close(run("iso_cts", base, xs, common_space_fraction=1.0), run("iso_c", base, xs), rtol=1e-4, atol=1e-5)


def test_iso_cts_bad_fraction_names_the_file_and_key(tmp_path):
    assert get_method("iso_cts").param("common_space_fraction").default == 0.8
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "iso_cts",
                "base_model": "inputs/base",
                "models": [{"model": "inputs/a"}],
                "parameters": {"common_space_fraction": 1.5},
            }
        )
    )
    with pytest.raises(RecipeError, match=f"{path}: parameters.common_space_fraction: must be in \\[0, 1\\], got 1.5"):
        load_recipe(path, root=FIX)


# ==== every spectral method ====
@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("shape", [(24, 16), (10, 30), (16, 16), (20,), (3, 4, 5)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_the_paper(name, shape, n):
    base, xs = experts(shape, n, seed=n)
    lam = 0.8
    got = run(name, base, xs, **{"lambda": lam})
    assert_close(got, REFS[name](base, xs, lam), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFS))
def test_contracts(name):
    m = get_method(name)
    assert m.requires_base and m.min_models == 1 and not m.randomized
    assert m.param("lambda").default == 1.0 and not m.param("lambda").per_model
    assert m.param("weight") is None


@pytest.mark.parametrize("name", sorted(REFS))
def test_models_take_no_weight(name, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": name,
                "base_model": "inputs/base",
                "models": [{"model": "inputs/a", "parameters": {"weight": 1.0}}],
            }
        )
    )
    with pytest.raises(RecipeError, match=f"{path}: models\\[0\\].parameters.weight: unknown parameter for {name}"):
        load_recipe(path, root=FIX)


# through the engine: every tensor of a model
@pytest.mark.parametrize("name", sorted(REFS))
def test_whole_model_through_the_engine(name, tmp_path):
    params = {"lambda": 0.7} | ({"common_space_fraction": 0.5} if name == "iso_cts" else {})
    recipe = {
        "merge_method": name,
        "base_model": "inputs/base",
        "parameters": params,
        "models": [{"model": "inputs/a"}, {"model": "inputs/b"}, {"model": "inputs/c"}],
        "dtype": "float32",
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    merge(load_recipe(path, root=FIX), tmp_path / "out")
    got = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(str(f)))
    sds = [load_file(str(FIX / "inputs" / k / "model.safetensors")) for k in ("base", "a", "b", "c")]
    kw = {"fraction": 0.5} if name == "iso_cts" else {}
    assert sorted(got) == sorted(sds[0])
    for n, t in got.items():
        assert_close(t, REFS[name](sds[0][n], [sd[n] for sd in sds[1:]], 0.7, **kw), rtol=1e-4, atol=1e-5)
