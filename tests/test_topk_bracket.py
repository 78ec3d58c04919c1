"""Exact top-k from a sampled bracket (sparsify.select): the same mask as a sort-based reference on
adversarial inputs, on every path (one bracket pass, bracket missed -> radix fallback, radix)."""

import zlib

import pytest
import torch

from merge_dag.core import chunks
from merge_dag.core import sparsify as sp

N = sp.SAMPLE_MIN_N + 4099  # large enough for the sampled path (and not a round number)


_ORDERS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def ref_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The documented order: decreasing magnitude, equal magnitudes by increasing position."""
    key = id(x)
    if key not in _ORDERS or not torch.equal(_ORDERS[key][0], x):  # the last few tensors' orders
        if len(_ORDERS) > 4:
            _ORDERS.clear()
        _ORDERS[key] = (x.clone(), torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices)
    order = _ORDERS[key][1]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[: max(0, k)]] = True
    return mask


def run(x: torch.Tensor, ks: list[int], bracket="sample", base=None) -> tuple[list[torch.Tensor], str]:
    """Each k's kept entries (x with the rest zeroed) and the path select took."""
    flat = x.clone()
    cuts, path = sp.select(flat, ks, base, bracket)
    outs = []
    for cut in cuts:
        y = flat.clone()
        sp.apply_cuts(y, cut)
        outs.append(y)
    return outs, path


def check(x: torch.Tensor, ks: list[int], bracket="sample") -> str:
    outs, path = run(x, ks, bracket)
    for k, y in zip(ks, outs):
        want = torch.where(ref_mask(x, k), x, 0.0)  # (x * mask would turn a dropped inf into NaN)
        assert torch.equal(y, want), f"k={k} path={path}: {int((y != want).sum())} entries differ"
        assert torch.equal(y != 0, ref_mask(x, k) & (x != 0)), f"k={k} path={path}"
    return path


def bits_of(v: float) -> int:
    return int(torch.tensor([abs(v)], dtype=torch.float32).view(torch.int32))


def inputs(kind: str, dtype: torch.dtype, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind} {dtype} {n}".encode()))
    if kind == "gauss":
        x = torch.randn(n, generator=g) * 0.01
    elif kind == "ties":  # a handful of magnitudes: every threshold sits in a huge tie set
        x = torch.randint(-4, 5, (n,), generator=g).float() * 0.25
    elif kind == "equal":
        x = torch.full((n,), -0.375)
    elif kind == "zeros":  # mostly zeros (and negative zeros), a few values
        x = torch.randn(n, generator=g)
        x[torch.rand(n, generator=g) < 0.9] = 0.0
        x[::7] = -0.0
    elif kind == "tiny_values":  # subnormals and the smallest normals of the dtype
        x = torch.randn(n, generator=g) * torch.finfo(dtype).tiny
    else:
        raise ValueError(kind)
    return x.to(dtype).float()  # the values a bf16/fp16 checkpoint holds, in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["gauss", "ties", "equal", "zeros", "tiny_values"])
def test_same_mask_as_reference(dtype, kind):
    x = inputs(kind, dtype)
    n = x.numel()
    ks = [0, 1, n // 1000, int(0.3 * n), n // 2, n - 1, n, n + 5]
    for k in ks:
        check(x, [k])
        if 0 < k < n:  # the one-pass path forced, around the threshold, and a bracket that misses
            t = bits_of(float(x.abs()[ref_mask(x, k)].min()))
            assert check(x, [k], bracket=(max(0, t - 2), t + 2)) == "bracket"
            assert check(x, [k], bracket=(t + 1, t + 50)) == "fallback"
    check(x, [n - int(0.3 * n), int(0.01 * n)])  # breadcrumbs asks for two ks at once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gaussian_takes_the_one_pass_path(dtype):
    x = inputs("gauss", dtype, 1 << 19)  # a sample of 2**14: a bracket narrow enough
    for density in (0.1, 0.2, 0.3, 0.4):
        assert check(x, [int(density * x.numel())]) == "bracket"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 100])
def test_tiny_tensors(n):
    g = torch.Generator().manual_seed(n)
    for x in (torch.randn(n, generator=g), torch.randint(-1, 2, (n,), generator=g).float(), torch.zeros(n)):
        for k in sorted(set(range(0, n + 2, 1 if n < 20 else 7)) | {n - 1, n, n + 1}):
            check(x, [k])
            check(x, [k], bracket=None)
            if 0 < k < n:  # the bracket pass on a tiny tensor, forced (around the threshold)
                t = bits_of(float(x.abs()[ref_mask(x, k)].min()))
                assert check(x, [k], bracket=(max(0, t - 3), t + 3)) == "bracket"


def test_sample_that_misleads_falls_back_to_radix():
    """Every sampled entry is huge, so the bracket sits far above the real threshold."""
    x = inputs("gauss", torch.float32)
    off, stride, runs = sp.sample_positions(x.numel())
    x[off : off + runs * stride].view(runs, stride)[:, : sp.SAMPLE_RUN] = 1000.0
    k = int(0.3 * x.numel())
    assert check(x, [k]) == "fallback"
    # and a sample that sees only zeros: the bracket sits below the real threshold
    y = torch.zeros_like(x)
    y[1::2] = x[1::2]
    y[off : off + runs * stride].view(runs, stride)[:, : sp.SAMPLE_RUN] = 0.0
    assert check(y, [k]) == "fallback"


@pytest.mark.parametrize("kind", ["gauss", "ties", "zeros"])
def test_forced_brackets_hit_at_the_edges_and_miss_on_either_side(kind):
    x = inputs(kind, torch.bfloat16)
    n = x.numel()
    for k in (1, n // 3, n - 1):
        t = bits_of(float(x.abs().reshape(-1)[ref_mask(x, k)].min()))  # the k-th largest |x|
        assert check(x, [k], bracket=(t, t)) == "bracket"  # threshold exactly at both ends
        assert check(x, [k], bracket=(max(0, t - 5), t)) == "bracket"
        assert check(x, [k], bracket=(t, t + 5)) == "bracket"
        assert check(x, [k], bracket=(t + 1, t + 100)) == "fallback"  # bracket above it
        if t > 0:
            assert check(x, [k], bracket=(max(0, t - 100), t - 1)) == "fallback"  # below it


@pytest.mark.parametrize("bracket", ["sample", None, "miss"])
def test_fused_base_subtraction_on_every_path(bracket):
    n = 1 << 19
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
    x = (base + torch.randn(n, generator=g) * 0.002).bfloat16().float()
    k = int(0.3 * n)
    br = (0x7F000000, 0x7F000010) if bracket == "miss" else bracket
    flat = x.clone()
    cuts, path = sp.select(flat, [k], base, br)
    assert path == {"sample": "bracket", None: "radix", "miss": "fallback"}[bracket]
    assert torch.equal(flat, x - base)  # the task vector, whichever path subtracted it
    sp.apply_cuts(flat, cuts[0])
    assert torch.equal(flat, (x - base) * ref_mask(x - base, k))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ties_split_across_many_chunks_and_workers(monkeypatch, threads):
    """Tied entries at the threshold in every chunk of every worker: the first ones by position."""
    monkeypatch.setattr(chunks, "CPU_CHUNK", 997)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = inputs("ties", torch.bfloat16)
        for k in (1, 12345, int(0.3 * N), N - 7):
            t = bits_of(float(x.abs()[ref_mask(x, k)].min()))
            for bracket in ("sample", None, (t, t), (max(0, t - 2), t + 2)):
                check(x, [k], bracket)
    finally:
        torch.set_num_threads(old)


def test_explicit_bracket_too_wide_is_refused():
    with pytest.raises(ValueError, match="bracket"):
        sp.select(torch.ones(10), [3], None, (0, sp.BRACKET_MAX))
    with pytest.raises(ValueError, match="bracket"):
        sp.select(torch.ones(10), [3], None, (5, 4))


def test_infinities_and_extremes():
    x = inputs("gauss", torch.float32)
    x[5], x[700], x[9000] = float("inf"), float("-inf"), torch.finfo(torch.float32).max
    for k in (1, 2, 3, 4, int(0.5 * x.numel())):
        check(x, [k])


def test_sparsify_results_unchanged_by_the_bracket(monkeypatch):
    """sparsify's magnitude and breadcrumbs results are the same with the bracket path disabled."""
    x = inputs("ties", torch.bfloat16) + inputs("gauss", torch.bfloat16)
    a = sp.sparsify(x.clone(), 0.3, "magnitude")
    b = sp.sparsify(x.clone(), 0.3, "magnitude_outliers", gamma=0.02)
    monkeypatch.setattr(sp, "SAMPLE_MIN_N", 1 << 62)
    assert torch.equal(a, sp.sparsify(x.clone(), 0.3, "magnitude"))
    assert torch.equal(b, sp.sparsify(x.clone(), 0.3, "magnitude_outliers", gamma=0.02))


@pytest.mark.parametrize("threads", [1, 3])
def test_ties_masks_fused_into_the_combination_are_bit_identical(monkeypatch, threads):
    """magnitude_cut + combine_ties(cuts=...) (the mask applied chunk by chunk inside the sign
    election) gives the same bits as sparsify first, then combine_ties; partial tie sets included."""
    from merge_dag.core.methods._task_arithmetic_family import combine_ties

    monkeypatch.setattr(chunks, "CPU_CHUNK", 997)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1000, N):
            g = torch.Generator().manual_seed(n + threads)
            base = torch.randint(-3, 4, (n,), generator=g).float()
            experts = [base + torch.randint(-3, 4, (n,), generator=g).float() for _ in range(3)]
            weights = [1.0, 0.5, 2.0]
            xs, b1 = [e.clone() for e in experts], base.clone()
            with chunks.workers(b1):
                for x in xs:
                    sp.sparsify(x, 0.3, "magnitude", base=b1)
                combine_ties(b1, xs, weights, True, 0.7)
            ys, b2 = [e.clone() for e in experts], base.clone()
            with chunks.workers(b2):
                cuts = [sp.magnitude_cut(y, 0.3, b2) for y in ys]
                assert all(c is not None and c.need > 0 for c in cuts)  # partial tie sets
                combine_ties(b2, ys, weights, True, 0.7, cuts=cuts)
            assert torch.equal(b1.view(torch.int32), b2.view(torch.int32))
    finally:
        torch.set_num_threads(old)


def test_magnitude_cut_edges():
    x, base = torch.randn(50), torch.randn(50)
    y = x.clone()
    assert sp.magnitude_cut(y, 1.0, base) is sp.KEEP_ALL and torch.equal(y, x - base)
    y = x.clone()
    assert sp.magnitude_cut(y, 0.0, base) is sp.KEEP_NONE and not y.any()
    assert sp.magnitude_cut(torch.randn(5, 6).t(), 0.5) is None  # not contiguous: use sparsify


def test_magnitude_cuts_of_several_task_vectors_in_one_pass(monkeypatch):
    """magnitude_cuts (TIES's streamed prepare: one loop over the chunks for all experts) gives the
    cuts magnitude_cut gives one by one, with a bracket that misses (radix select) among them."""
    n = 1 << 21  # a sample of 2**16 entries: brackets narrow enough for the one-pass path
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16) for _ in range(2)]
    xs.append((base.float() + torch.randint(-2, 3, (n,), generator=g).float() * 0.001).to(torch.bfloat16))
    xs.append(base.clone()[:1000].reshape(10, 100))  # too small for a bracket: magnitude_cut itself
    densities = [0.3, 0.9, 0.5, 0.4]
    bases = [base, base, base, base[:1000].reshape(10, 100)]
    want = [sp.magnitude_cut(x, d, b, stream=True) for x, d, b in zip(xs, densities, bases)]
    assert want[2].need > 0  # a partial tie set
    got = sp.magnitude_cuts(xs[:3], densities[:3], base, stream=True)
    assert got == want[:3]
    assert sp.magnitude_cuts(xs[3:], densities[3:], bases[3], stream=True) == want[3:]
    real, calls, passes = sp.sample_bracket, [], []
    real_pass = sp._bracket_cuts_many

    def one_pass(srcs, kss, brackets):
        found = real_pass(srcs, kss, brackets)
        passes.append([f is not None for f in found])
        return found

    monkeypatch.setattr(sp, "_bracket_cuts_many", one_pass)
    assert sp.magnitude_cuts(xs[:3], densities[:3], base, stream=True) == want[:3]
    assert passes == [[True, True, True]]  # all three in one pass, every bracket hit

    def second_misses(src, ks):
        calls.append(1)
        return (0, 5) if len(calls) == 2 else real(src, ks)

    monkeypatch.setattr(sp, "sample_bracket", second_misses)
    assert sp.magnitude_cuts(xs[:3], densities[:3], base, stream=True) == want[:3]
    assert len(calls) == 3 and passes[-1] == [True, False, True]
