"""The sparsification primitive against references written from the math (sort-based, simple)."""

import math

import pytest
import torch

from merge_dag.core import chunks
from merge_dag.core import sparsify as sp
from merge_dag.core.sparsify import sparsify, top_cuts

MANY_CHUNKS = 97  # the chunk size of conftest's `chunking` fixture in its "many-chunks" run


@pytest.fixture()
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# ---- references -----------------------------------------------------------------------------------
def ref_order(x: torch.Tensor) -> torch.Tensor:
    """Flat indices by decreasing magnitude; equal magnitudes by increasing index."""
    return torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices


def ref_topk(x: torch.Tensor, density: float) -> torch.Tensor:
    n = x.numel()
    k = max(1, int(density * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ref_order(x)[:k]] = True
    return x * mask.view(x.shape)


def ref_breadcrumbs(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = x.numel()
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)  # fewer outliers if the target needs them
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ref_order(x)[n_top : n_top + target]] = True
    return x * mask.view(x.shape)


def l1_rescaled(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    before, after = x.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    # torch.allclose (torch.testing's first call costs seconds of imports)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol), (
        f"max abs diff {(got - want).abs().max().item():.3g}"
    )


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ---- magnitude (ties) --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 29), (4, 5, 6), (3000,)])
@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_magnitude_equals_sorted_topk(chunking, shape, density):
    torch.manual_seed(sum(shape) + int(density * 1000))
    x = torch.randn(shape)
    want = ref_topk(x, density)
    got = sparsify(x.clone(), density, "magnitude")
    assert torch.equal(got, want)
    assert int((got != 0).sum()) == max(1, int(density * x.numel()))


@pytest.mark.parametrize("seed", range(6))
def test_magnitude_ties_keep_exactly_k_first_by_position(chunking, seed):
    torch.manual_seed(seed)
    n = [50, 500, 3001][seed % 3]
    x = torch.randint(-4, 5, (n,)).float()  # integers: big tie sets at every threshold
    x[x == 0] = 3.0  # no zeros, so kept entries are visible
    for density in (0.05, 0.2, 0.37, 0.5, 0.81):
        k = max(1, int(density * n))
        got = sparsify(x.clone(), density, "magnitude")
        assert int((got != 0).sum()) == k  # never more than k, even with ties
        assert torch.equal(got, ref_topk(x, density))  # the first tied entries are the kept ones


def test_magnitude_with_zeros_and_negative_values(chunking):
    x = torch.tensor([0.0, -3.0, 0.0, 2.0, -2.0, 2.0, 0.0, 1.0, -0.0, 5.0])
    assert torch.equal(sparsify(x.clone(), 0.2, "magnitude"), torch.tensor([0, -3.0, 0, 0, 0, 0, 0, 0, 0, 5]))
    # ties at |x| = 2: -3 and 5, then the first of the three 2s (position 3) ...
    assert torch.equal(sparsify(x.clone(), 0.3, "magnitude"), torch.tensor([0, -3.0, 0, 2, 0, 0, 0, 0, 0, 5]))
    # ... or the first two (positions 3 and 4)
    assert torch.equal(sparsify(x.clone(), 0.4, "magnitude"), torch.tensor([0, -3.0, 0, 2, -2, 0, 0, 0, 0, 5]))
    # k reaches into the zeros: every non-zero is kept, the rest stays 0
    assert torch.equal(sparsify(x.clone(), 0.9, "magnitude"), x)


def test_magnitude_never_sorts(monkeypatch):
    """Top-k is a selection (histograms), not a sort."""

    def boom(*a, **k):
        raise AssertionError("sorted")

    x = torch.randn(300_000)
    want = ref_topk(x, 0.3)
    for name in ("sort", "argsort", "topk", "kthvalue", "msort"):
        monkeypatch.setattr(torch, name, boom)
        monkeypatch.setattr(torch.Tensor, name, boom)
    got = sparsify(x.clone(), 0.3, "magnitude")
    bc = sparsify(x.clone(), 0.3, "magnitude_outliers", gamma=0.05)
    monkeypatch.undo()
    assert torch.equal(got, want)
    assert torch.equal(bc, ref_breadcrumbs(x, 0.3, 0.05))


def test_top_cuts_several_ks_and_edges():
    torch.manual_seed(3)
    x = torch.randint(-9, 10, (1000,)).float()
    ks = [0, 1, 10, 333, 999, 1000, 5000]
    cuts = top_cuts(x.clone(), ks)
    for k, cut in zip(ks, cuts):
        y = x.clone()
        sp.apply_cuts(y, cut)
        mask = torch.zeros(1000, dtype=torch.bool)
        mask[ref_order(x)[:k]] = True
        assert torch.equal(y, x * mask), k


def test_density_one_and_empty_tensors(chunking):
    x = torch.randn(10, 10)
    for method in sp.METHODS:
        assert torch.equal(sparsify(x.clone(), 1.0, method, rescale=True, generator=gen(0)), x)
        assert sparsify(torch.empty(0, 4), 0.5, method, generator=gen(0)).shape == (0, 4)
    base = torch.randn(10, 10)
    assert torch.equal(sparsify(x.clone(), 1.0, "magnitude", base=base), x - base)


@pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers", "random", "della_magprune"])
def test_fused_base_subtraction(chunking, method):
    torch.manual_seed(1)
    base, x = torch.randn(40, 30), torch.randn(40, 30)
    a = sparsify(x.clone(), 0.4, method, rescale=True, generator=gen(5), base=base)
    b = sparsify(x - base, 0.4, method, rescale=True, generator=gen(5))
    assert torch.equal(a, b)


def test_non_contiguous_input_is_sparsified_in_place():
    torch.manual_seed(2)
    x = torch.randn(30, 40)
    t = x.t()
    want = ref_topk(t.contiguous(), 0.25)
    out = sparsify(t, 0.25, "magnitude")
    assert out is t and torch.equal(t, want)


def test_magnitude_rescale_keeps_l1(chunking):
    torch.manual_seed(4)
    x = torch.randn(64, 48)
    got = sparsify(x.clone(), 0.2, "magnitude", rescale=True)
    assert_close(got, l1_rescaled(x, ref_topk(x, 0.2)), rtol=1e-6, atol=1e-7)
    assert_close(got.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


# ---- breadcrumbs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "density,gamma", [(0.3, 0.01), (0.3, 0.0), (0.5, 0.2), (0.9, 0.2), (0.05, 0.5), (0.99, 0.01), (0.2, 1.0)]
)
def test_breadcrumbs_equals_sorted_reference(chunking, density, gamma):
    torch.manual_seed(int(density * 100 + gamma * 10))
    for x in (torch.randn(41, 37), torch.randint(-6, 7, (1500,)).float()):
        got = sparsify(x.clone(), density, "magnitude_outliers", gamma=gamma)
        assert torch.equal(got, ref_breadcrumbs(x, density, gamma))


def test_breadcrumbs_drops_the_largest():
    x = torch.arange(1.0, 101.0)
    got = sparsify(x.clone(), 0.5, "breadcrumbs", gamma=0.1)
    assert torch.equal(got != 0, (x > 40) & (x <= 90))  # the top 10 are outliers, then 50 kept


# ---- random (dare) -------------------------------------------------------------------------------
def test_random_keep_fraction_values_and_rescale(chunking):
    torch.manual_seed(5)
    x = torch.randn(200, 150)
    for density in (0.1, 0.3, 0.9):
        got = sparsify(x.clone(), density, "random", generator=gen(7))
        kept = got != 0
        assert abs(kept.float().mean().item() - density) < 5 * math.sqrt(density * (1 - density) / x.numel())
        assert torch.equal(got[kept], x[kept])  # kept entries are untouched without rescale
        res = sparsify(x.clone(), density, "random", rescale=True, generator=gen(7))
        assert torch.equal(res != 0, kept)  # same draws under the same seed
        assert_close(res, l1_rescaled(x, got), rtol=1e-6, atol=1e-7)
        assert_close(res.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)


def test_random_is_reproducible_and_seed_dependent(chunking):
    x = torch.randn(5000)
    a = sparsify(x.clone(), 0.5, "random", generator=gen(1))
    b = sparsify(x.clone(), 0.5, "random", generator=gen(1))
    c = sparsify(x.clone(), 0.5, "random", generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_draws_are_independent_per_entry():
    """Adjacent entries and chunk boundaries do not correlate: pairs are kept with p^2."""
    x = torch.ones(600_000)
    kept = sparsify(x, 0.5, "random", generator=gen(3)) != 0
    both = (kept[:-1] & kept[1:]).float().mean().item()
    assert abs(both - 0.25) < 0.005


def test_results_do_not_depend_on_thread_count(monkeypatch):
    monkeypatch.setattr(chunks, "CPU_CHUNK", 101)
    torch.manual_seed(6)
    x = torch.randint(-5, 6, (7000,)).float()
    old = torch.get_num_threads()
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            outs.append(
                [
                    sparsify(x.clone(), 0.3, m, gamma=0.05, rescale=True, generator=gen(9))
                    for m in ("magnitude", "magnitude_outliers", "random")
                ]
            )
            outs[-1].append(sparsify(x.view(70, 100).clone(), 0.4, "della", generator=gen(9)))
        finally:
            torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    assert torch.get_num_threads() == old


# ---- della -----------------------------------------------------------------------------------------
def test_della_keep_probability_rises_with_rank(chunking):
    rows, length, d, eps = 6000, 6, 0.5, 0.3
    g = torch.Generator().manual_seed(0)
    # each row holds a random permutation of magnitudes 1..6 with random signs
    mags = torch.argsort(torch.rand(rows, length, generator=g), dim=1).float() + 1
    x = mags * (torch.randint(0, 2, (rows, length), generator=g).float() * 2 - 1)
    got = sparsify(x.clone(), d, "della_magprune", epsilon=eps, generator=gen(4))
    kept = got != 0
    assert torch.equal(got[kept], x[kept])  # no rescale asked
    for r in range(length):
        p = d - eps + 2 * eps * r / (length - 1)
        freq = kept[mags == r + 1].float().mean().item()
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / rows), (r, freq, p)


def test_della_rescale_vector_and_single_entry_rows(chunking):
    torch.manual_seed(8)
    v = torch.randn(3000)
    got = sparsify(v.clone(), 0.4, "della", epsilon=0.1, rescale=True, generator=gen(1))
    assert_close(got.abs().sum(), v.abs().sum(), rtol=1e-5, atol=0)
    frac = (got != 0).float().mean().item()
    assert abs(frac - 0.4) < 0.05
    col = torch.randn(4000, 1)  # one entry per row: kept with probability density
    frac = (sparsify(col.clone(), 0.3, "della", epsilon=0.2, generator=gen(2)) != 0).float().mean().item()
    assert abs(frac - 0.3) < 0.04


def test_della_ranks_along_dim_1_for_3d():
    torch.manual_seed(9)
    x = torch.randn(5, 40, 3)
    a = sparsify(x.clone(), 0.5, "della", epsilon=0.2, generator=gen(3))
    rows = x.movedim(1, -1).reshape(15, 40)  # rank each (i, :, k) fibre
    b = sparsify(rows, 0.5, "della", epsilon=0.2, generator=gen(3)).reshape(5, 3, 40).movedim(-1, 1)
    assert torch.equal(a, b)


def test_della_rejects_epsilon_too_large():
    with pytest.raises(ValueError, match="density \\+/- epsilon"):
        sparsify(torch.randn(10), 0.9, "della", epsilon=0.15)
    with pytest.raises(ValueError, match="density \\+/- epsilon"):
        sparsify(torch.randn(10), 0.1, "della", epsilon=0.15)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown sparsification"):
        sparsify(torch.randn(3), 0.5, "nope")
