"""Cache-sized chunks and the threads that run them: the plumbing under every elementwise loop.

A method that combines whole tensors writes its formula for one chunk [s, e) and hands it to
`each_chunk`; everything else lives here:

- `chunk_size`: CPU_CHUNK elements on the CPU (1 MiB of float32, stays in L2), the whole tensor on
  an accelerator (one kernel per op is fastest there).
- `workers`: inside this block every torch op runs on one intra-op thread (thousands of small
  parallel regions are what makes a 2-core machine under load crawl); the chunks are spread over
  at most MAX_WORKERS threads of our own instead.
- `segments` / `run_segments`: [0, n) cut into one contiguous run of whole chunks per worker, run
  concurrently (the first in the calling thread), results in order.

Results never depend on the chunking of elementwise work; sums over chunks (`chunked_sum`) add the
chunk sums in order, so they repeat exactly for a given CPU_CHUNK.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

CPU_CHUNK = 1 << 18  # elements per chunk on the CPU: 1 MiB of float32, stays in L2
MAX_WORKERS = 4  # chunk-segment threads at most (and never more than torch's threads)

R = TypeVar("R")


def chunk_size(t: torch.Tensor) -> int:
    """Elements per chunk: cache-sized on the CPU, the whole tensor on an accelerator."""
    return CPU_CHUNK if t.device.type == "cpu" else max(1, t.numel())


def spans(lo: int, hi: int, step: int) -> Iterator[tuple[int, int]]:
    for s in range(lo, hi, step):
        yield s, min(hi, s + step)


_local = threading.local()
_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _forget_pool_after_fork() -> None:
    # a forked child has none of the parent's pool threads: start a fresh pool on first use
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()
    _local.__dict__.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


@contextmanager
def workers(t: torch.Tensor) -> Iterator[int]:
    """Chunk loops inside this block run on one intra-op thread each; yields how many segment
    workers to use (torch's thread count when entered, at most MAX_WORKERS; 1 off the CPU).
    Nested uses (same thread) share the outer setting."""
    outer = getattr(_local, "workers", None)
    if outer is not None:
        yield outer
        return
    if t.device.type != "cpu":
        yield 1
        return
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    _local.workers = max(1, min(MAX_WORKERS, n))
    try:
        yield _local.workers
    finally:
        _local.workers = None
        if n > 1:
            torch.set_num_threads(n)


def scratch(tag: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of n elements for this thread's temporary use, reused from call to call with
    the same tag, dtype and device (on the CPU; elsewhere a fresh one). A fresh multi-MB buffer is
    fresh pages from the kernel: allocating the chunk buffers anew for every tensor cost a TIES
    merge of a 374M model 3 million page faults. Buffers alive at the same time in one thread need
    distinct tags; contents are undefined."""
    if torch.device(device).type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    cache = _local.__dict__.setdefault("scratch", {})
    key = (tag, dtype)
    b = cache.get(key)
    if b is None or b.numel() < n:
        b = cache[key] = torch.empty(max(n, CPU_CHUNK), dtype=dtype)
    return b[:n]


def ones_i64(n: int, device: torch.device) -> torch.Tensor:
    """n int64 ones (read-only): the increments of a scatter_add_ histogram; reused per thread."""
    return constant("ones", n, torch.int64, device, lambda m, dt: torch.ones(m, dtype=dt))


def constant(
    tag: str, n: int, dtype: torch.dtype, device: torch.device, make: Callable[[int, torch.dtype], torch.Tensor]
) -> torch.Tensor:
    """The first n entries of make(m, dtype) (read-only, m >= n; make(m)[:n] must not depend on m),
    built once per thread, tag and dtype on the CPU and kept (elsewhere built afresh)."""
    if torch.device(device).type != "cpu":
        return make(n, dtype).to(device)
    cache = _local.__dict__.setdefault("scratch", {})
    key = ("const", tag, dtype)
    b = cache.get(key)
    if b is None or b.numel() < n:
        b = cache[key] = make(max(n, CPU_CHUNK), dtype)
    return b[:n]


def segments(n: int, step: int, n_workers: int) -> list[tuple[int, int]]:
    """[0, n) cut into at most n_workers contiguous runs of whole chunks."""
    n_chunks = max(1, math.ceil(n / step))
    w = max(1, min(n_workers, n_chunks))
    per = math.ceil(n_chunks / w)
    return [(i * per * step, min(n, (i + 1) * per * step)) for i in range(w) if i * per * step < n]


def _in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # this pool thread's own OpenMP setting
    return fn(*args)


def run_segments(segs: Sequence[tuple[int, int]], fn: Callable[[int, int, int], Any]) -> list[Any]:
    """fn(index, lo, hi) for each segment, concurrently (the first in the calling thread)."""
    global _pool
    if len(segs) <= 1:
        return [fn(0, *segs[0])] if segs else []
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_WORKERS - 1, thread_name_prefix="merge-dag-chunks")
    futures = [_pool.submit(_in_worker, fn, i, lo, hi) for i, (lo, hi) in enumerate(segs) if i > 0]
    first = fn(0, *segs[0])
    return [first] + [f.result() for f in futures]


_scratch = scratch  # each_chunk's parameter `scratch` shadows the function


def each_chunk(t: torch.Tensor, fn: Callable[..., R], scratch: int = 0) -> list[R]:
    """fn(s, e, *bufs) for every chunk [s, e) of `t`, spread over the workers; fn's results in order.

    `t` is 1-D (chunks of entries) or 2-D (chunks of whole rows: [s, e) index rows). `bufs` are
    `scratch` tensors of t's dtype and device, one chunk long (each segment allocates them once),
    sliced to e - s: the chunk's temporaries, so none is ever the size of the tensor."""
    if t.dim() not in (1, 2):
        raise ValueError(f"each_chunk: expected a 1-D or 2-D tensor, got shape {list(t.shape)}")
    n = t.shape[0]
    row = t.shape[1:]
    step = max(1, min(chunk_size(t) // max(1, row.numel()), n))

    def work(_i: int, lo: int, hi: int) -> list[R]:
        m, r = min(step, hi - lo), row.numel()
        bufs = [_scratch(f"each_chunk:{j}", m * r, t.dtype, t.device).view(m, *row) for j in range(scratch)]
        return [fn(s, e, *(b[: e - s] for b in bufs)) for s, e in spans(lo, hi, step)]

    with workers(t) as w:
        parts = run_segments(segments(n, step, w), work)
    return [r for part in parts for r in part]


def chunk_generators(
    generator: Optional[torch.Generator], n_chunks: int, device: torch.device
) -> list[Optional[torch.Generator]]:
    """One generator per chunk, seeded in order from `generator` (the global RNG if None)."""
    seeds = torch.randint(
        0,
        2**62,
        (n_chunks,),
        generator=generator,
        dtype=torch.int64,
        device=generator.device if generator is not None else "cpu",
    ).tolist()
    gens = []
    for sd in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(sd)
        gens.append(g)
    return gens


def chunked_sum(flat: torch.Tensor, fn: Callable[[int, int, torch.Tensor], torch.Tensor]) -> float:
    """sum over [0, n) of fn(s, e, out): each chunk's float32 values (written into the chunk-sized
    buffer `out`) summed by torch, the chunk sums added in order in double (no big temporary)."""
    total = 0.0
    for v in each_chunk(flat, lambda s, e, out: float(fn(s, e, out).sum()), scratch=1):
        total += v  # in order (Python's sum() of floats compensates, which would change the bits)
    return total
