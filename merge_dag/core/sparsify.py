"""Sparsifying a task vector: the one primitive behind ties, dare, breadcrumbs and della.

    sparsify(delta, density, method, gamma=..., epsilon=..., rescale=..., generator=..., base=None)

works IN PLACE on a float32 tensor and returns it. With `base`, the tensor holds a model's
weights and first becomes its task vector `tensor - base` (fused into the first pass). Methods,
named as in mergekit:

- ``magnitude`` (TIES): keep the k = max(1, int(density * numel)) entries of largest magnitude.
- ``random`` (DARE): keep each entry independently with probability `density`.
- ``magnitude_outliers`` (breadcrumbs): rank by magnitude, drop the int(gamma * numel) largest
  (fewer if that would leave less than the target), then the smallest, keeping int(density * numel).
- ``della_magprune`` (DELLA): along dim 1 (each row of a matrix; a vector is one row), the keep
  probability rises linearly with the magnitude rank, from density - epsilon for the smallest
  entry to density + epsilon for the largest; one Bernoulli draw per entry. density +/- epsilon
  must lie in (0, 1) (ValueError otherwise, as in mergekit).

``rescale`` is mergekit's: after masking, multiply by L1(before) / L1(after) so the task vector
keeps its L1 norm (skipped when either norm is below 1e-7). density >= 1 leaves the task vector
untouched (and unscaled), as in mergekit.

Ranking is a total order: magnitude first, then position in the flattened tensor (for della:
within the row), the smaller index ranking higher among equal magnitudes for top-k and lower for
della's ranks. So ties at the threshold never keep more than k entries and results repeat
exactly. (mergekit breaks ties by whatever torch.argsort returns; a tie set is all one magnitude,
so only which of the tied entries survive can differ, never how many.)

Speed: top-k is a selection, not a sort, on the float bits: |x| as an int32 (sign bit cleared)
orders like |x|. On a large tensor (SAMPLE_MIN_N entries or more) a strided sample of 2**16
entries at most brackets the k-th largest magnitude: bit patterns [lo, hi] around the sample's
quantile, 4.5 standard errors either side. One pass (with the base subtraction fused in) then
histograms |x|'s bits with one bin per pattern of the bracket and lane-spread bins for the
entries below and above it (scatter_add_ of ones), which pins the k-th largest exactly whenever
it lies in the bracket. When it does not (a sample that misleads; checked, never assumed), or
the bracket would be wider than BRACKET_MAX patterns, or the tensor is small, the two-pass radix
select runs: a histogram of the top 16 bits finds the bucket that holds the k-th largest, a
histogram of the low 16 bits of that one bucket pins it. Both give the same cut, so the mask
never depends on the path or the sample. Masking is torch.hardshrink (keeps |x| > lambda);
when only some of the entries tied at the threshold are kept, the masking pass counts ties chunk
by chunk and keeps the first ones. TIES does not mask in a pass of its own: it takes each cut
(magnitude_cut) and masks chunk by chunk inside its sign election (each_masked_chunk).
Everything runs in cache-sized chunks (merge_dag.core.chunks) on the CPU (the whole tensor on an
accelerator) with preallocated buffers, so no temporary is ever the size of the
tensor, and with one intra-op thread: thousands of small parallel regions are what makes a
2-core machine under load crawl. della needs every entry's rank: it sorts each row (rows are
short), chunk by chunk. Randomness comes only from the torch.Generator passed in.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .chunks import (
    chunk_generators,
    chunk_size,
    chunked_sum,
    constant,
    ones_i64,
    run_segments,
    scratch,
    segments,
    spans,
    workers,
)

MAGNITUDE = "magnitude"
RANDOM = "random"
MAGNITUDE_OUTLIERS = "magnitude_outliers"
DELLA = "della_magprune"
METHODS = (MAGNITUDE, RANDOM, MAGNITUDE_OUTLIERS, DELLA)
ALIASES = {
    "topk": MAGNITUDE,
    "ties": MAGNITUDE,
    "dare": RANDOM,
    "bernoulli": RANDOM,
    "breadcrumbs": MAGNITUDE_OUTLIERS,
    "della": DELLA,
}

L1_EPS = 1e-7  # mergekit's rescale guard
_ABS = 0x7FFFFFFF  # clears the sign bit of a float32 seen as int32
_HI_BINS = 1 << 15  # top 16 bits of a non-negative float32: 0 .. 32767
_LO_BINS = (1 << 16) + 2  # low 16 bits inside one top bucket, plus "below" (0) and "above" (65537)
_P_ONE = 1 << 31  # int32 random_() draws uniformly from [0, 2**31)
_INF = float("inf")


def _f32(bits: int) -> float:
    """The float32 whose bit pattern is `bits`, as an exact Python float."""
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


# ---- exact top-k by radix select ----------------------------------------------------------------
@dataclass(frozen=True)
class TopCut:
    """The k largest magnitudes of a flat tensor, ties broken by position.

    Keeps every entry with |x| > lam_gt, plus the first `need` entries (in flat order) whose |x|
    has the bit pattern t_bits (lam_ge, the float just below, keeps them in hardshrink).
    need < 0: no partial tie set; lam_gt alone decides. seg_need: how many of those tied
    entries each segment of `segs` keeps."""

    lam_gt: float
    lam_ge: float = 0.0
    t_bits: int = 0
    need: int = -1
    segs: tuple[tuple[int, int], ...] = ()
    seg_need: tuple[int, ...] = ()

    @property
    def keeps_all(self) -> bool:
        return self.lam_gt == -_INF

    @property
    def keeps_none(self) -> bool:
        return self.lam_gt == _INF


KEEP_ALL = TopCut(-_INF)
KEEP_NONE = TopCut(_INF)


class Deltas:
    """A task vector `x - base` (or `x`), read chunk by chunk as float32: how every top-k pass and
    every masked loop below reads it.

    In place (`stream=False`; x is float32, contiguous): the first pass subtracts base into x, which
    becomes its task vector (as sparsify promises), and `settled()` says so; later passes read x.
    Streamed (`stream=True`): x and base stay as they are, in any float dtype (the engine's bf16
    read buffers), and every pass recomputes x - base in float32 into a chunk-sized buffer, so no
    float32 copy of the tensor is ever made: each pass reads 2 bytes per input entry instead of
    casting, writing and re-reading 4. The values are the same bits either way (cast, then subtract).
    """

    def __init__(self, x: torch.Tensor, base: Optional[torch.Tensor] = None, stream: bool = False):
        if base is not None and base.numel() != x.numel():
            raise ValueError(f"base shape {list(base.shape)} differs from {list(x.shape)}")
        self.x = x.reshape(-1)
        self.base = base.reshape(-1) if base is not None else None
        self.stream = stream

    def chunk(self, s: int, e: int, buf: torch.Tensor, b32: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Entries [s, e) as float32. Streamed: computed into `buf` (b32: the base's entries [s, e)
        already in float32, shared by several task vectors); in place: x's own entries (the base
        subtracted into them until settled())."""
        if not self.stream:
            v = self.x[s:e]
            if self.base is not None:
                v.sub_(self.base[s:e])
            return v
        d = buf[: e - s]
        if self.base is None:
            return d.copy_(self.x[s:e])
        if b32 is None:
            b32 = scratch("deltas:base", e - s, torch.float32, d.device).copy_(self.base[s:e])
        if self.x.dtype == torch.float32:
            return torch.sub(self.x[s:e], b32, out=d)
        return d.copy_(self.x[s:e]).sub_(b32)

    def sample(self, off: int, stride: int, runs: int, out: torch.Tensor) -> torch.Tensor:
        """The SAMPLE_RUN entries from off + i * stride on, for i < runs, into `out` (runs x SAMPLE_RUN)."""

        def runs_of(t: torch.Tensor) -> torch.Tensor:
            return t[off : off + runs * stride].view(runs, stride)[:, :SAMPLE_RUN]

        out.copy_(runs_of(self.x))
        if self.base is not None:
            out.sub_(runs_of(self.base))  # in float32 (a bf16 base is cast exactly)
        return out

    def settled(self) -> None:
        """A whole pass is done: in place, x now holds the task vector."""
        if not self.stream:
            self.base = None

    def materialize(self) -> None:
        """In place: finish x -= base now (nothing to do when streamed)."""
        if not self.stream and self.base is not None:
            self.x.sub_(self.base)
            self.base = None


def top_cuts(
    flat: torch.Tensor, ks: Sequence[int], base: Optional[torch.Tensor] = None, stream: bool = False
) -> list[TopCut]:
    """For each k, the cut keeping exactly the k largest magnitudes of `flat` (1-D float32), or of
    flat - base.

    Linear time. Large tensors: a sample brackets the thresholds and one histogram pass over the
    bracket finds them exactly (see `select`); otherwise, or when the bracket misses, the radix
    select: one histogram pass over the top 16 bits of |x| and one over the low 16 bits of the
    bucket(s) holding the thresholds; several ks share the passes (breadcrumbs needs two).
    With `base`, flat -= base is done in the first pass; with `stream` (see Deltas) flat and base
    are left as they are (any float dtype) and only the cuts come back."""
    return select(flat, ks, base, stream=stream)[0]


def select(
    flat: torch.Tensor,
    ks: Sequence[int],
    base: Optional[torch.Tensor] = None,
    bracket: "Optional[tuple[int, int]] | str" = "sample",
    stream: bool = False,
) -> tuple[list[TopCut], str]:
    """top_cuts, and which path found the cuts: "trivial" (every k is 0 or >= n), "bracket" (one
    pass), "fallback" (the bracket missed: the radix select after it) or "radix".

    `bracket`: "sample" (from a sample when the tensor is large enough), None (radix only) or an
    explicit (lo, hi) pair of |x| bit patterns (tests force the paths with it)."""
    src = Deltas(flat, base, stream)
    n = src.x.numel()
    cuts: list[Optional[TopCut]] = [None] * len(ks)
    todo = []
    for j, k in enumerate(ks):
        if k <= 0:
            cuts[j] = KEEP_NONE
        elif k >= n:
            cuts[j] = KEEP_ALL
        else:
            todo.append(j)
    if not todo:
        src.materialize()
        return cuts, "trivial"  # type: ignore[return-value]

    path = "radix"
    if bracket == "sample":
        bracket = sample_bracket(src, [ks[j] for j in todo]) if n >= SAMPLE_MIN_N else None
    if bracket is not None:
        lo, hi = bracket  # type: ignore[misc]
        if not 0 <= lo <= hi < lo + BRACKET_MAX:
            raise ValueError(f"bracket {bracket}: need 0 <= lo <= hi < lo + {BRACKET_MAX}")
        found = _bracket_cuts(src, [ks[j] for j in todo], lo, hi)
        src.settled()
        if found is not None:
            for j, cut in zip(todo, found):
                cuts[j] = cut
            return cuts, "bracket"  # type: ignore[return-value]
        path = "fallback"
    _radix_cuts(src, ks, todo, cuts)
    return cuts, path  # type: ignore[return-value]


def _radix_cuts(src: Deltas, ks: Sequence[int], todo: list[int], cuts: list[Optional[TopCut]]) -> None:
    """The radix select: fills cuts[j] for j in todo (0 < ks[j] < n)."""
    n = src.x.numel()
    step = min(chunk_size(src.x), n)
    with workers(src.x) as w:
        segs = segments(n, step, w)
        hist_c = _hi_histogram(src, step, segs)
        src.settled()
        from_top = hist_c.flip(0).cumsum(0)  # from_top[i]: count in buckets >= 32767 - i

        where: dict[int, tuple[int, int]] = {}  # j -> (bucket, count strictly above it)
        for j in todo:
            k = ks[j]
            i = int(torch.searchsorted(from_top, k))  # first i with from_top[i] >= k
            bucket = _HI_BINS - 1 - i
            above = int(from_top[i - 1]) if i > 0 else 0
            if above + int(hist_c[bucket]) == k:  # the whole bucket is kept: done
                cuts[j] = TopCut(_f32((bucket << 16) - 1))
            else:
                where[j] = (bucket, above)
        if not where:
            return
        per_seg = _lo_histograms(src, step, segs, sorted({b for b, _ in where.values()}))

    for j, (bucket, above) in where.items():
        cuts[j] = _cut_in_bucket(ks[j], bucket, above, per_seg, segs)


def _hi_histogram(src: Deltas, step: int, segs: list[tuple[int, int]]) -> torch.Tensor:
    """Counts of the top 16 bits of |x| over the whole tensor (on the CPU)."""
    dev = src.x.device

    def pass1(_i: int, lo: int, hi: int) -> torch.Tensor:
        buf = scratch("topk:bits", min(step, hi - lo), torch.int32, dev)
        idx = scratch("topk:idx", buf.numel(), torch.int64, dev)
        dbuf = scratch("topk:delta", buf.numel(), torch.float32, dev)
        ones = ones_i64(buf.numel(), dev)
        hist = torch.zeros(_HI_BINS, dtype=torch.int64, device=dev)
        for s, e in spans(lo, hi, step):
            b, ix = buf[: e - s], idx[: e - s]
            torch.bitwise_and(src.chunk(s, e, dbuf).view(torch.int32), _ABS, out=b)
            b.bitwise_right_shift_(16)
            ix.copy_(b)
            hist.scatter_add_(0, ix, ones[: e - s])  # counts; twice as fast as bincount on the CPU
        return hist

    return sum(run_segments(segs, pass1)).cpu()


def _lo_histograms(
    src: Deltas, step: int, segs: list[tuple[int, int]], buckets: list[int]
) -> list[dict[int, torch.Tensor]]:
    """Per segment, for each bucket: counts of the low 16 bits of the |x| inside it (bin 0 = below
    the bucket, 65537 = above it), on the CPU."""
    dev = src.x.device

    def pass2(_i: int, lo: int, hi: int) -> dict[int, torch.Tensor]:
        buf = scratch("topk:bits", min(step, hi - lo), torch.int32, dev)
        buf2 = scratch("topk:bits2", buf.numel(), torch.int32, dev)
        idx = scratch("topk:idx", buf.numel(), torch.int64, dev)
        dbuf = scratch("topk:delta", buf.numel(), torch.float32, dev)
        ones = ones_i64(buf.numel(), dev)
        low = {b: torch.zeros(_LO_BINS, dtype=torch.int64, device=dev) for b in buckets}
        for s, e in spans(lo, hi, step):
            b = buf[: e - s]
            b2 = buf2[: e - s]
            ix = idx[: e - s]
            torch.bitwise_and(src.chunk(s, e, dbuf).view(torch.int32), _ABS, out=b)
            for bucket in buckets:
                torch.sub(b, (bucket << 16) - 1, out=b2)
                b2.clamp_(0, _LO_BINS - 1)
                ix.copy_(b2)
                low[bucket].scatter_add_(0, ix, ones[: e - s])
        return {b: h.cpu() for b, h in low.items()}

    return run_segments(segs, pass2)


def _cut_in_bucket(
    k: int, bucket: int, above: int, per_seg: list[dict[int, torch.Tensor]], segs: list[tuple[int, int]]
) -> TopCut:
    """The cut keeping the k largest, whose threshold lies in `bucket` (`above` entries are larger)."""
    h = sum(ps[bucket] for ps in per_seg)[1 : _LO_BINS - 1]  # counts of low bits 0 .. 65535
    top = h.flip(0).cumsum(0)
    i = int(torch.searchsorted(top, k - above))
    lo16 = (1 << 16) - 1 - i
    t_bits = (bucket << 16) | lo16
    greater = above + (int(top[i - 1]) if i > 0 else 0)
    need = k - greater  # 1 <= need <= ties
    if t_bits == 0:  # threshold 0: the tied entries are zeros
        return TopCut(0.0)
    if need == int(h[lo16]):  # every tied entry is kept
        return TopCut(_f32(t_bits - 1))
    seg_need, left = [], need
    for ps in per_seg:
        take = min(left, int(ps[bucket][lo16 + 1]))
        seg_need.append(take)
        left -= take
    return TopCut(_f32(t_bits), _f32(t_bits - 1), t_bits, need, tuple(segs), tuple(seg_need))


# ---- exact top-k in one pass, from a sampled bracket ------------------------------------------------
SAMPLE_MIN_N = 1 << 16  # smaller tensors go straight to the radix select
SAMPLE_MAX = 1 << 16  # entries in the sample at most (one in 32 below that)
SAMPLE_RUN = 16  # the sample is runs of 16 consecutive entries (one cache line of float32 each)
BRACKET_Z = 4.5  # half-width of the bracket, in standard errors of the sample's quantile
BRACKET_MAX = 1 << 20  # the widest bracket (in |x| bit patterns) that one pass histograms exactly
_LANES = 8  # counts below and above the bracket go to 8 bins each, in turn (no store-to-load chain)


def sample_positions(n: int) -> tuple[int, int, int]:
    """(offset, stride, runs): the sample is the SAMPLE_RUN entries from offset + i * stride on,
    for i < runs (n >= 16 * SAMPLE_RUN). stride / SAMPLE_RUN is odd, so the runs of a matrix whose
    rows have a length divisible by a power of two start in every column that is a multiple of
    SAMPLE_RUN."""
    runs = max(1, min(SAMPLE_MAX, n // 32) // SAMPLE_RUN)
    blocks = max(1, n // (runs * SAMPLE_RUN))
    if blocks % 2 == 0:
        blocks -= 1
    stride = blocks * SAMPLE_RUN
    return (blocks // 2) * SAMPLE_RUN, stride, runs


def sample_bracket(src: Deltas, ks: Sequence[int]) -> Optional[tuple[int, int]]:
    """|x| bit patterns [lo, hi] that hold each k-th largest magnitude of the task vector `src`
    with high probability, from a strided sample; None when the bracket would be wider than
    BRACKET_MAX.

    The k-th largest of n is the (n - k)-th smallest; in a sample of m it sits near rank
    r = (n - k) m / n, give or take z sqrt(m q (1 - q)) (q = k / n, binomial). The sample's order
    statistics come from a histogram of their top 16 bits (no sort), so lo and hi are rounded out
    to whole 2**16-pattern buckets."""
    n = src.x.numel()
    off, stride, runs = sample_positions(n)
    m = runs * SAMPLE_RUN
    dev = src.x.device
    samp = scratch("topk:sample", m, torch.float32, dev)
    src.sample(off, stride, runs, samp.view(runs, SAMPLE_RUN))
    sb = samp.view(torch.int32).bitwise_and_(_ABS).bitwise_right_shift_(16)
    b_min, b_max = (int(v) for v in torch.aminmax(sb))
    ix = scratch("topk:sample_idx", m, torch.int64, dev)
    torch.sub(sb, b_min, out=ix)
    hist = scratch("topk:sample_hist", b_max - b_min + 1, torch.int64, dev).zero_()
    hist.scatter_add_(0, ix, ones_i64(m, dev))
    cum = hist.cumsum(0)  # cum[b]: sample entries in buckets <= b_min + b
    lo_b, hi_b = _HI_BINS, -1
    for k in ks:
        q = k / n
        r = (n - k) / n * m
        d = BRACKET_Z * math.sqrt(m * q * (1 - q)) + 1
        r_lo, r_hi = math.floor(r - d), math.ceil(r + d)
        # bucket of the sample's r-th smallest (0-based): the first b with cum[b] >= r + 1
        lo_b = min(lo_b, b_min + int(torch.searchsorted(cum, r_lo + 1)) if r_lo >= 0 else 0)
        hi_b = max(hi_b, b_min + int(torch.searchsorted(cum, r_hi + 1)) if r_hi < m else _HI_BINS - 1)
    lo, hi = lo_b << 16, (min(hi_b, _HI_BINS - 1) << 16) | 0xFFFF
    return (lo, hi) if hi - lo + 1 <= BRACKET_MAX else None


def _lanes(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return constant("lanes", n, dtype, device, lambda m, dt: (torch.arange(m) % _LANES).to(dt))


def _ones_i32(n: int, device: torch.device) -> torch.Tensor:
    return constant("ones", n, torch.int32, device, lambda m, dt: torch.ones(m, dtype=dt))


def _bracket_cuts(src: Deltas, ks: Sequence[int], lo: int, hi: int) -> Optional[list[TopCut]]:
    """The cuts keeping the k largest magnitudes (0 < k < n), in one pass (the first: in place, it
    also does x -= base), if every k-th largest |x| lies in the bit patterns [lo, hi]; else None.

    The pass histograms |x|'s bits b as clamp(b - lo + L, lane, W + L + 1 + lane) (W = hi - lo,
    L lanes, lane = position mod L): each pattern of the bracket has its own bin, entries below
    it fall in bins [0, L) and those above in the last L bins."""
    return _bracket_cuts_many([src], [ks], [(lo, hi)])[0]


def _bracket_cuts_many(
    srcs: Sequence[Deltas], kss: Sequence[Sequence[int]], brackets: Sequence[tuple[int, int]]
) -> list[Optional[list[TopCut]]]:
    """_bracket_cuts for several task vectors of one length at once, in one loop over the chunks:
    when they are streamed from one base, its chunk is read and cast once for all of them."""
    n = srcs[0].x.numel()
    dev = srcs[0].x.device
    shapes = []  # (lo, top, size) per task vector
    for lo, hi in brackets:
        top = _LANES + hi - lo + 1  # first bin above the bracket
        shapes.append((lo, top, top + _LANES))
    step = min(chunk_size(srcs[0].x), n)
    base = srcs[0].base
    shared = all(s.stream and s.base is base for s in srcs) and base is not None

    def one_pass(_i: int, s0: int, s1: int) -> list[torch.Tensor]:
        m = min(step, s1 - s0)
        b = scratch("topk:bits", m, torch.int32, dev)
        ix = scratch("topk:idx", m, torch.int64, dev)
        lane_lo = _lanes(m, torch.int32, dev)
        lane_hi = scratch("topk:lane_hi", m, torch.int32, dev)
        ones = _ones_i32(m, dev)
        dbuf = scratch("topk:delta", m, torch.float32, dev)
        b32 = scratch("topk:base", m, torch.float32, dev) if shared else None
        mine = [h[_i].zero_() for h in hists]
        for s, e in spans(s0, s1, step):
            c = e - s
            bc = b32[:c].copy_(base[s:e]) if b32 is not None else None  # type: ignore[index]
            bb = b[:c]
            for src, (lo, top, _), hist in zip(srcs, shapes, mine):
                torch.bitwise_and(src.chunk(s, e, dbuf, bc).view(torch.int32), _ABS, out=bb)
                bb.sub_(lo - _LANES)
                torch.clamp(bb, lane_lo[:c], torch.add(lane_lo[:c], top, out=lane_hi[:c]), out=bb)
                ix[:c].copy_(bb)
                hist.scatter_add_(0, ix[:c], ones[:c])
        return mine

    with workers(srcs[0].x) as nw:
        segs = segments(n, step, nw)
        # per task vector one histogram per segment, in this thread's buffers (a pool thread may
        # run two segments)
        hists = [
            scratch(f"topk:hists:{j}", len(segs) * size, torch.int32, dev).view(len(segs), size)
            for j, (_, _, size) in enumerate(shapes)
        ]
        per_seg = run_segments(segs, one_pass)
    out: list[Optional[list[TopCut]]] = []
    for j, (ks, (lo, top, size)) in enumerate(zip(kss, shapes)):
        seg_hists = [p[j] for p in per_seg]
        total = seg_hists[0]
        if len(seg_hists) > 1:  # summed into a reused buffer (a fresh multi-MB tensor is fresh pages)
            total = torch.sum(hists[j], 0, dtype=torch.int32, out=scratch("topk:total", size, torch.int32, dev))
        out.append(_cuts_from_histogram(ks, lo, top, total, seg_hists, segs))
    return out


def _cuts_from_histogram(
    ks: Sequence[int],
    lo: int,
    top: int,
    total: torch.Tensor,
    per_seg: list[torch.Tensor],
    segs: list[tuple[int, int]],
) -> Optional[list[TopCut]]:
    """The cuts from a bracket pass's histograms (see _bracket_cuts), or None if a threshold lies
    outside the bracket."""
    above = int(total[top:].sum())
    inside = total[_LANES:top]  # counts of the patterns lo .. hi
    n_inside = int(inside.sum(dtype=torch.int32))  # (counts of < 2**31 entries; int32 sums are 6x faster)
    cuts = []
    for k in ks:
        if not above < k <= above + n_inside:
            return None  # this threshold lies outside [lo, hi]
        i, greater = _from_top(inside, k - above)
        t_bits = lo + i
        greater += above
        need = k - greater  # 1 <= need <= ties
        if t_bits == 0:  # threshold 0: the tied entries are zeros
            cuts.append(TopCut(0.0))
        elif need == int(inside[i]):  # every tied entry is kept
            cuts.append(TopCut(_f32(t_bits - 1)))
        else:
            seg_need, left = [], need
            for h in per_seg:
                take = min(left, int(h[_LANES + i]))
                seg_need.append(take)
                left -= take
            cuts.append(TopCut(_f32(t_bits), _f32(t_bits - 1), t_bits, need, tuple(segs), tuple(seg_need)))
    return cuts


def _from_top(h: torch.Tensor, kk: int) -> tuple[int, int]:
    """(i, greater) with greater = sum(h[i + 1:]) < kk <= greater + h[i], for 1 <= kk <= sum(h):
    block sums first, so a long histogram is not cumsummed whole."""
    greater, off = 0, 0
    while h.numel() > 4096:
        nb = h.numel() // 1024
        head = h.numel() - nb * 1024  # the partial block is the lowest one
        sums = h[head:].view(nb, 1024).sum(1, dtype=h.dtype).flip(0).cumsum(0)  # from the top block down
        j = int(torch.searchsorted(sums, kk))
        if j == nb:  # in the partial block below the whole ones
            greater += int(sums[-1])
            kk -= int(sums[-1])
            h = h[:head]
        else:
            above = int(sums[j - 1]) if j > 0 else 0
            greater += above
            kk -= above
            start = head + (nb - 1 - j) * 1024
            off += start
            h = h[start : start + 1024]
    c = h.flip(0).cumsum(0)
    j = int(torch.searchsorted(c, kk))
    return off + h.numel() - 1 - j, greater + (int(c[j - 1]) if j > 0 else 0)


class Shrinker:
    """Applies one TopCut to consecutive chunks of one segment (it counts the kept ties)."""

    def __init__(self, cut: TopCut, seg: int, step: int, device: torch.device, tag: str = "keep"):
        self.cut = cut
        self.left = cut.seg_need[seg] if cut.need > 0 else 0
        if self.left > 0:
            self.buf = scratch(f"shrink:{tag}:bits", step, torch.int32, device)

    def __call__(self, x: torch.Tensor) -> None:
        """Zero, in place, the entries of this chunk (the next one in order) the cut drops."""
        cut = self.cut
        if cut.keeps_all:
            return
        if self.left <= 0:
            torch.hardshrink(x, cut.lam_gt, out=x)
            return
        m = x.numel()
        b = self.buf[:m]
        # min(| |x|'s bits - t_bits |, 1): 0 exactly at the tied entries, in int32 arithmetic
        # (|x|'s bits and t_bits lie in [0, 2**31): no overflow), 4x faster than eq + count_nonzero
        torch.bitwise_and(x.view(torch.int32), _ABS, out=b)
        b.sub_(cut.t_bits).abs_().clamp_(max=1)
        c = m - int(b.sum(dtype=torch.int32))
        if c <= self.left:
            torch.hardshrink(x, cut.lam_ge, out=x)
            self.left -= c
            return
        split = int((b == 0).nonzero()[self.left - 1, 0]) + 1
        head, tail = x[:split], x[split:]
        torch.hardshrink(head, cut.lam_ge, out=head)
        torch.hardshrink(tail, cut.lam_gt, out=tail)
        self.left = 0


def apply_cuts(flat: torch.Tensor, keep: TopCut, drop: Optional[TopCut] = None) -> None:
    """Zero, in place, every entry of `flat` outside `keep`, and (breadcrumbs) every entry in
    `drop` (a subset of `keep`: the outliers)."""
    n = flat.numel()
    if drop is None or drop.keeps_none:
        if keep.keeps_all:
            return
        if keep.need <= 0:
            torch.hardshrink(flat, keep.lam_gt, out=flat)
            return
    partial = keep if keep.need > 0 else drop
    step = min(chunk_size(flat), n)
    with workers(flat) as w:
        segs = list(partial.segs) if partial is not None and partial.need > 0 else segments(n, step, w)
        with_drop = drop is not None and not drop.keeps_none

        def work(i: int, lo: int, hi: int) -> None:
            keep_i = Shrinker(keep, i, step, flat.device)
            if with_drop:
                drop_i = Shrinker(drop, i, step, flat.device, "drop")
                tmp = scratch("apply_cuts:tmp", min(step, hi - lo), flat.dtype, flat.device)
            for s, e in spans(lo, hi, step):
                x = flat[s:e]
                if with_drop:
                    outliers = tmp[: e - s].copy_(x)
                    drop_i(outliers)  # only the largest entries remain
                    keep_i(x)
                    x.sub_(outliers)  # x - x = 0 exactly; x - 0 = x
                else:
                    keep_i(x)

        run_segments(segs, work)


def magnitude_cut(
    tensor: torch.Tensor, density: float, base: Optional[torch.Tensor] = None, stream: bool = False
) -> Optional[TopCut]:
    """sparsify(tensor, density, "magnitude", base=base) up to the masking: the returned cut says
    which entries the mask keeps (apply it with apply_cuts or, chunk by chunk inside another loop,
    with each_masked_chunk). In place, `tensor` becomes its task vector; with `stream` (see
    Deltas) tensor and base stay as they are, in any float dtype. None: this tensor is not
    contiguous (or its base is not), call sparsify instead."""
    if not tensor.is_contiguous() or (base is not None and not base.is_contiguous()):
        return None
    if base is not None and base.shape != tensor.shape:
        raise ValueError(f"base shape {list(base.shape)} differs from {list(tensor.shape)}")
    if density >= 1 or tensor.numel() == 0:
        if base is not None and not stream:
            tensor.sub_(base)
        return KEEP_ALL
    if density <= 0:
        if not stream:
            tensor.zero_()
        return KEEP_NONE
    flat = tensor.view(-1)
    with workers(tensor):
        (cut,) = top_cuts(flat, [max(1, int(density * flat.numel()))], base, stream)
    return cut


def magnitude_cuts(
    tensors: Sequence[torch.Tensor], densities: Sequence[float], base: torch.Tensor, stream: bool = False
) -> list[Optional[TopCut]]:
    """magnitude_cut of each tensor (one shape, one base): the same cuts, but the bracket passes of
    the large ones share one loop over the chunks, so a streamed base is read and cast once per
    chunk for all of them instead of once per tensor."""
    cuts: list[Optional[TopCut]] = [None] * len(tensors)
    todo = []  # (index, task vector, k, bracket)
    for j, (x, density) in enumerate(zip(tensors, densities)):
        n = x.numel()
        k = max(1, int(density * n))
        if 0 < density < 1 and k < n and n >= SAMPLE_MIN_N and x.is_contiguous() and base.is_contiguous():
            src = Deltas(x.view(-1), base.view(-1), stream)
            with workers(x):
                bracket = sample_bracket(src, [k])
            if bracket is not None:
                todo.append((j, src, k, bracket))
                continue
        cuts[j] = magnitude_cut(x, density, base, stream)  # small, trivial or a bracket too wide
    if todo:
        with workers(base):
            found = _bracket_cuts_many([t[1] for t in todo], [[t[2]] for t in todo], [t[3] for t in todo])
            for (j, src, k, _), f in zip(todo, found):
                src.settled()
                if f is None:  # the bracket missed: the radix select
                    one: list[Optional[TopCut]] = [None]
                    _radix_cuts(src, [k], [0], one)
                    f = one  # type: ignore[assignment]
                cuts[j] = f[0]  # type: ignore[index]
    return cuts


def each_masked_chunk(
    base: torch.Tensor,
    masked: Sequence[tuple[Deltas, TopCut]],
    fn: Callable[..., None],
    scratch_n: int = 0,
) -> None:
    """fn(s, e, bc, dcs, *bufs) for every chunk [s, e) of the 1-D tensor `base` (spread over the
    workers as chunks.each_chunk does): bc is the base's chunk as float32 and dcs[j] the chunk of
    task vector j of `masked` with the entries its cut drops zeroed. The masking of sparsify
    fused into the loop that reads the task vectors next, so no tensor is read and written once
    more just to be masked; same result as apply_cuts first.

    In place (the Deltas are not streamed; base is float32): bc and dcs are views of the tensors
    themselves (fn may update bc: the result lands in base). Streamed: `base` may be any float
    dtype; bc and dcs are chunk buffers, computed from the inputs for this chunk only, and fn
    stores the result wherever it wants."""
    n = base.numel()
    step = max(1, min(chunk_size(base), n))
    stream = any(d.stream for d, _ in masked)
    with workers(base) as w:
        # the chunks of the cuts that keep part of a tie set (they count ties segment by segment),
        # made where the cuts were (perhaps with another number of workers), else this block's
        segs = next((list(c.segs) for _, c in masked if c.need > 0), None) or segments(n, step, w)
        for d, cut in masked:
            if cut.need > 0 and list(cut.segs) != segs:  # cut from other chunking: mask up front
                if stream:
                    raise ValueError("each_masked_chunk: a streamed task vector's cut was made with other chunks")
                d.materialize()
                apply_cuts(d.x, cut)

        def work(i: int, lo: int, hi: int) -> None:
            m = min(step, hi - lo)
            bufs = [scratch(f"each_chunk:{j}", m, torch.float32, base.device) for j in range(scratch_n)]
            if stream:
                b32 = scratch("masked:base", m, torch.float32, base.device)
                dbufs = [scratch(f"masked:{j}", m, torch.float32, base.device) for j in range(len(masked))]
            else:
                dbufs = [None] * len(masked)
            shrink = [
                Shrinker(c, i, step, base.device, f"mask{j}") if list(c.segs) == segs or c.need <= 0 else None
                for j, (_, c) in enumerate(masked)
            ]
            for s, e in spans(lo, hi, step):
                bc = b32[: e - s].copy_(base[s:e]) if stream else base[s:e]
                dcs = []
                for (d, _), sh, db in zip(masked, shrink, dbufs):
                    dc = d.chunk(s, e, db, bc) if stream else d.chunk(s, e, db)
                    if sh is not None:
                        sh(dc)
                    dcs.append(dc)
                fn(s, e, bc, dcs, *(b[: e - s] for b in bufs))

        run_segments(segs, work)
        for d, _ in masked:
            d.settled()


# ---- the methods ---------------------------------------------------------------------------------
def _magnitude(flat: torch.Tensor, density: float, base: Optional[torch.Tensor]) -> None:
    (cut,) = top_cuts(flat, [max(1, int(density * flat.numel()))], base)
    apply_cuts(flat, cut)


def _magnitude_outliers(flat: torch.Tensor, density: float, gamma: float, base: Optional[torch.Tensor]) -> None:
    n = flat.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    # keep the ascending ranks [n_bot, n_bot + target) = top(n - n_bot) minus top(n - n_bot - target)
    big, out = top_cuts(flat, [n - n_bot, n - n_bot - target], base)
    apply_cuts(flat, big, out)


def _random(
    flat: torch.Tensor, density: float, generator: Optional[torch.Generator], base: Optional[torch.Tensor]
) -> None:
    n = flat.numel()
    step = min(chunk_size(flat), n)
    thresh = round(density * _P_ONE)
    gens = chunk_generators(generator, math.ceil(n / step), flat.device)
    bflat = base.reshape(-1) if base is not None else None

    def work(_i: int, lo: int, hi: int) -> None:
        r = scratch("random:draws", min(step, hi - lo), torch.int32, flat.device)
        keep = scratch("random:keep", r.numel(), torch.bool, flat.device)
        for s, e in spans(lo, hi, step):
            x = flat[s:e]
            if bflat is not None:
                x.sub_(bflat[s:e])
            rr, kk = r[: e - s], keep[: e - s]
            rr.random_(generator=gens[s // step])  # uniform on [0, 2**31)
            torch.lt(rr, thresh, out=kk)  # P(keep) = thresh / 2**31 = density
            x.mul_(kk)

    with workers(flat) as w:
        run_segments(segments(n, step, w), work)


def _della(tensor: torch.Tensor, density: float, epsilon: float, generator: Optional[torch.Generator]) -> None:
    if tensor.dim() <= 1:
        _della_rows(tensor.view(1, -1), density, epsilon, generator)
    elif tensor.dim() == 2:
        _della_rows(tensor, density, epsilon, generator)
    else:  # mergekit ranks along dim 1 for any rank >= 2: move it last, work on a copy, write back
        moved = tensor.movedim(1, -1).contiguous()
        _della_rows(moved.view(-1, moved.shape[-1]), density, epsilon, generator)
        tensor.copy_(moved.movedim(-1, 1))


def _della_rows(x: torch.Tensor, density: float, epsilon: float, generator: Optional[torch.Generator]) -> None:
    n_rows, length = x.shape
    dev = x.device
    # keep probability for ascending rank r = 0 .. L-1, in float32 like mergekit
    if length > 1:
        rank_norm = torch.arange(length, dtype=torch.float32, device=dev) / (length - 1)
        probs = (density - epsilon) + rank_norm * 2 * epsilon
    else:  # a single entry is both the smallest and the largest: the midpoint, density
        probs = torch.full((1,), density, dtype=torch.float32, device=dev)
    thresh = (probs.double() * _P_ONE).round().clamp_(0, _P_ONE - 1).to(torch.int32)
    per = max(1, chunk_size(x) // max(1, length))  # rows per chunk
    gens = chunk_generators(generator, math.ceil(n_rows / per), dev)

    def work(_i: int, lo: int, hi: int) -> None:
        for s, e in spans(lo, hi, per):
            xc = x[s:e]
            order = torch.sort(xc.abs(), dim=1, stable=True).indices
            r = torch.empty(xc.shape, dtype=torch.int32, device=dev).random_(generator=gens[s // per])
            keep_sorted = r < thresh
            keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
            xc.mul_(keep)

    with workers(x) as w:
        run_segments(segments(n_rows, per, w), work)


def abs_sum(flat: torch.Tensor) -> float:
    """sum |x|, chunk by chunk (see chunked_sum)."""
    return chunked_sum(flat, lambda s, e, out: torch.abs(flat[s:e], out=out))


def sparsify(
    tensor: torch.Tensor,
    density: float,
    method: str,
    *,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: bool = False,
    generator: Optional[torch.Generator] = None,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sparsify `tensor` in place (see the module docstring) and return it."""
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise ValueError(f"unknown sparsification method {method!r} (known: {', '.join(METHODS)})")
    if method == DELLA and 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1); got density {density:g}, epsilon {epsilon:g}")
    if base is not None and base.shape != tensor.shape:
        raise ValueError(f"base shape {list(base.shape)} differs from {list(tensor.shape)}")
    if density >= 1 or tensor.numel() == 0:
        return tensor.sub_(base) if base is not None else tensor
    if density <= 0:
        return tensor.zero_()
    if not tensor.is_contiguous():
        work = tensor.contiguous()
        sparsify(work, density, method, gamma=gamma, epsilon=epsilon, rescale=rescale, generator=generator, base=base)
        return tensor.copy_(work)

    flat = tensor.view(-1)
    with workers(tensor):
        if (rescale or method == DELLA) and base is not None:
            flat.sub_(base.reshape(-1))
            base = None
        before = abs_sum(flat) if rescale else 0.0
        if method == MAGNITUDE:
            _magnitude(flat, density, base)
        elif method == MAGNITUDE_OUTLIERS:
            _magnitude_outliers(flat, density, gamma, base)
        elif method == RANDOM:
            _random(flat, density, generator, base)
        else:
            _della(tensor, density, epsilon, generator)
        if rescale:
            after = abs_sum(flat)
            if before >= L1_EPS and after >= L1_EPS:
                # the float32 ratio of the two norms, as mergekit computes it
                scale = torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32)
                flat.mul_(float(scale))
    return tensor
