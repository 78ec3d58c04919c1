"""Where a merge's time goes: timers around each stage of `merge_dag.core.merge.execute`.

    PYTHONPATH=. .venv/bin/python bench/merge_profile.py bench/.cache/recipes/ties.yaml /tmp/out

(run bench/merge_bench.py once first: it builds the models and writes the recipes). Each line is
one function: the wall seconds spent inside it and the CPU seconds its thread used meanwhile,
summed over every call. Stages run on four threads (reader, main, writer, hasher) and overlap, so
the lines do not add up to the wall time; nested stages are counted in their callers too. "main:
waiting" is the main thread blocked on the reader or the writer.
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

T: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])  # key -> [wall, thread CPU]
_lock = threading.Lock()


def timed(key, fn):
    def wrapper(*a, **k):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            with _lock:
                T[key][0] += time.perf_counter() - t
                T[key][1] += time.thread_time() - c

    return wrapper


def main(recipe: str, out: Path) -> None:
    C.Checkpoint.get = timed("reader: file reads (Checkpoint.get)", C.Checkpoint.get)
    C.CheckpointWriter.write = timed("writer: file writes (CheckpointWriter.write)", C.CheckpointWriter.write)
    C.CheckpointWriter.commit = timed("main: commit (fsync + rename)", C.CheckpointWriter.commit)
    M.tensor_sha256 = timed("sha256 (reader: inputs not in the cache; hasher: the output)", M.tensor_sha256)
    M._all_finite = timed("NaN/Inf checks (reader: inputs of other methods; main: outputs)", M._all_finite)
    M._read_step = timed("reader: _read_step (reads, hashes, checks, prepare)", M._read_step)
    M._merge_one = timed("main: _merge_one (method + casts + checks)", M._merge_one)
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
                T["main: waiting on the reader or the writer"][0] += time.perf_counter() - t

    Future.result = result
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    plan = plan_merge(load_recipe(recipe), device="cpu")
    T["main: plan"][0] = time.perf_counter() - t0
    m = plan.method
    m.merge = timed(f"main: {m.name}.merge (float32 path: the arithmetic)", m.merge)
    m.prepare = timed(f"reader: {m.name}.prepare (streamed: e.g. TIES's top-k cuts)", m.prepare)
    m.merge_into = timed(f"main: {m.name}.merge_into (streamed: the arithmetic)", m.merge_into)
    M.execute(plan, out, progress=False)
    wall = time.perf_counter() - t0
    ru = os.times()
    print(f"wall {wall:.2f} s, user {ru.user:.2f} s, sys {ru.system:.2f} s, load average {os.getloadavg()}")
    print("  wall s    CPU s  stage")
    for k, (w, c) in sorted(T.items()):
        print(f"{w:8.2f} {c:8.2f}  {k}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
