#!/usr/bin/env python
"""Generic-text calibration against in-task calibration, for RegMean and LEWIS on the real zoo (issue 18,
item 3). Run `merge-dag zoo --size real` first; everything runs through Dagster in the data folder
data/real/generic (its own recipes; tasks, eval and calibration linked to data/real's), like
bench/real_tune.py.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/generic_vs_task.py [--dry-run]

The procedure, stated once: the recipes data/real/recipes/regmean.yaml and ties_lewis.yaml (their
hyperparameters chosen on validation by bench/real_tune.py, each expert calibrated on its own task's
32 training rows) are scored on the test split (100 questions per task, exact match) beside their
twins regmean_generic.yaml and ties_lewis_generic.yaml, which differ only in the calibration set:
every expert reads data/real/calibration/generic.jsonl (32 paragraphs of Python standard-library
docstrings, no task's text; written by bench/generic_calibration.py); and beside the plain twins
linear.yaml and ties.yaml. Nothing is tuned for the generic set. Standard errors are binomial per
task; a difference of averages carries the two rows' errors combined as if independent.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import real_tune as rt  # noqa: E402  (bench/real_tune.py: sweep folder, Dagster run)

TASKS = rt.TASKS
RECIPES = ("linear", "regmean", "regmean_generic", "ties", "ties_lewis", "ties_lewis_generic")
PAIRS = (
    ("regmean", "linear"),
    ("regmean_generic", "linear"),
    ("regmean_generic", "regmean"),
    ("ties_lewis", "ties"),
    ("ties_lewis_generic", "ties"),
    ("ties_lewis_generic", "ties_lewis"),
)


def load(name: str) -> dict:
    import yaml

    path = ROOT / "data" / "real" / "recipes" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such recipe")
    return yaml.safe_load(path.read_text())


def se(p: float, n: int = 100) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "real" / "generic")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "generic_vs_task.json")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    recipes = {name: load(name) for name in RECIPES}
    for name, r in recipes.items():
        if name.endswith("_generic") and not all(
            m.get("calibration") == "data/real/calibration/generic.jsonl" for m in r["models"]
        ):
            raise SystemExit(f"error: data/real/recipes/{name}.yaml: every model must read the generic set")
    if args.dry_run:
        for name, r in recipes.items():
            print(name, json.dumps({k: r.get(k) for k in ("merge_method", "parameters", "guidance", "models")}))
        return 0
    if not (ROOT / rt.MODELS / "zoo.json").is_file():
        print(f"error: {ROOT / rt.MODELS}: no real zoo; build it with `merge-dag zoo --size real`", file=sys.stderr)
        return 2
    rt.sweep_folder(args.work)
    t0 = time.perf_counter()
    scores = rt.run_sweep(args.work, recipes)
    seconds = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"procedure": __doc__, "seconds": seconds, "test": scores}, indent=1))

    def avg_se(name: str) -> tuple[float, float]:
        vals = [scores[name][f"real_{t}"] for t in TASKS]
        return sum(vals) / len(vals), math.sqrt(sum(se(v) ** 2 for v in vals)) / len(vals)

    print("\n| recipe | " + " | ".join(TASKS) + " | avg ± SE |\n|---|" + "---:|" * (len(TASKS) + 1))
    for name in RECIPES:
        if name not in scores:
            print(f"| {name} | " + " | ".join("—" for _ in TASKS) + " | — |")
            continue
        cells = [f"{scores[name][f'real_{t}']:.2f} ± {se(scores[name][f'real_{t}']):.2f}" for t in TASKS]
        a, e = avg_se(name)
        print(f"| {name} | " + " | ".join(cells) + f" | {a:.3f} ± {e:.3f} |")
    print("\n| difference | Δ avg ± SE | Δ / SE |\n|---|---:|---:|")
    for x, y in PAIRS:
        if x in scores and y in scores:
            (ax, ex), (ay, ey) = avg_se(x), avg_se(y)
            d, e = ax - ay, math.hypot(ex, ey)
            print(f"| {x} − {y} | {d:+.3f} ± {e:.3f} | {d / e if e else float('nan'):+.1f} |")
    print(f"\n{seconds:.0f} s; scores in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
