"""Where a merge's time goes: wall-clock timers around each stage of `merge_dag.core.merge.execute`.

    PYTHONPATH=. .venv/bin/python bench/merge_profile.py bench/.cache/recipes/ties.yaml /tmp/out

(run bench/merge_bench.py once first: it builds the models and writes the recipes). Each line is
the seconds spent inside one function, summed over every call and every thread, so stages that
run on the read-ahead and writer threads overlap the main thread's and the lines do not add up to
the wall time. "main: waiting" is the main thread blocked on the reader or the writer: the merge
is I/O-bound when it is large.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import merge_dag.core.checkpoint as C
import merge_dag.core.merge as M
from merge_dag.core.plan import plan_merge
from merge_dag.core.recipe import load_recipe

T: dict[str, float] = collections.defaultdict(float)
_lock = threading.Lock()


def timed(key, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            with _lock:
                T[key] += time.perf_counter() - t

    return wrapper


def main(recipe: str, out: Path) -> None:
    C.Checkpoint.get = timed("reader: file reads (Checkpoint.get)", C.Checkpoint.get)
    C.CheckpointWriter.write = timed("writer: file writes (CheckpointWriter.write)", C.CheckpointWriter.write)
    C.CheckpointWriter.commit = timed("main: commit (fsync + rename)", C.CheckpointWriter.commit)
    M._sha256 = timed("sha256 of tensors (reader: inputs not in the cache; writer: output)", M._sha256)
    M._all_finite = timed("NaN/Inf checks (reader: inputs; main: output)", M._all_finite)
    M._read_raw = timed("reader: _read_raw (reads + hashes + checks)", M._read_raw)
    M._merge_one = timed("main: _merge_one (casts + method + checks)", M._merge_one)
    M.input_fingerprints = timed("main: input fingerprints", M.input_fingerprints)
    M.checkpoint_fingerprint = timed("main: output fingerprint", M.checkpoint_fingerprint)
    real_result = Future.result

    def result(self, *a, **k):
        if threading.current_thread() is not threading.main_thread():
            return real_result(self, *a, **k)
        t = time.perf_counter()
        try:
            return real_result(self, *a, **k)
        finally:
            with _lock:
                T["main: waiting on the reader or the writer"] += time.perf_counter() - t

    Future.result = result
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    plan = plan_merge(load_recipe(recipe), device="cpu")
    T["main: plan"] = time.perf_counter() - t0
    plan.method.merge = timed(f"main: {plan.method.name}.merge (the arithmetic)", plan.method.merge)
    M.execute(plan, out, progress=False)
    wall = time.perf_counter() - t0
    ru = os.times()
    print(f"wall {wall:.2f} s, user {ru.user:.2f} s, sys {ru.system:.2f} s, load average {os.getloadavg()}")
    for k, v in sorted(T.items()):
        print(f"{v:8.2f} s  {k}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
