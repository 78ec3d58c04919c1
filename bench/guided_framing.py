#!/usr/bin/env python
"""LEWIS and Sens-Merging on the real zoo, each in its own framing, faithful and robust variants side
by side (issue 18, items 1 and 2). Run `merge-dag zoo --size real` first; everything runs through
Dagster in the data folder data/real/framing (its own recipes; tasks, eval and calibration linked to
data/real's), like bench/real_tune.py.

    OMP_NUM_THREADS=1 .venv/bin/python bench/guided_framing.py [--dry-run]

The procedure, stated once:
1. LEWIS, multi-task framing of its paper: for each task T as the target, the three LoRA experts are
   merged with TIES at the density and lambda chosen for ties on validation by bench/real_tune.py
   (0.6, 1.0); LEWIS's statistics come from T's calibration set for every expert (`calibration:`
   of the sparsity block), and the merge is scored on T's test split only. Rows: ties, dare_ties (the
   same density and lambda), and LEWIS with (gamma, epsilon) = (0.3, 0.8), the point chosen on
   validation by real_tune.py, as `scaling: minmax` (faithful), `rank`, and `quantile` with
   `clip_quantile: 0.999` (the robust variants at their documented defaults: not tuned).
2. LEWIS, single-expert framing of its released configs: T's expert alone re-sparsified to density
   0.3 (lambda 1), T's calibration set, scored on T: ties and dare_ties (magnitude and random
   pruning) against the three LEWIS variants. Density 0.3 is fixed beforehand, not tuned.
3. Sens-Merging, multi-task framing of its paper: task arithmetic at the lambda chosen on validation
   (0.5), each expert calibrated on its own task; temperature T in {0.5, 2} chosen on the validation
   split (50 questions per task, mean exact match) for each `normalize` (l2: faithful, rms, layer);
   the chosen recipes and plain task arithmetic are then scored on the test split (100 per task).
AIM and RegMean are multi-task methods already measured in that framing by `merge-dag demo --size real`.
Standard errors: binomial per task; a difference of averages carries the two rows' errors combined.
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

import real_tune as rt  # noqa: E402  (bench/real_tune.py: sweep folder, Dagster run, yaml writer)
from real_table import latest_result, layer_means  # noqa: E402  (bench/real_table.py: the maps' numbers)

TASKS = rt.TASKS
TIES = {"density": 0.6, "lambda": 1.0}  # ties' validated point (data/real/recipes/ties.yaml)
TA_LAMBDA = 0.5  # task_arithmetic's validated lambda (data/real/recipes/task_arithmetic.yaml)
GAMMA, EPSILON = 0.3, 0.8  # LEWIS's validated point (data/real/recipes/ties_lewis.yaml)
SINGLE_DENSITY = 0.3
LEWIS_VARIANTS = {
    "minmax": {"scaling": "minmax"},
    "rank": {"scaling": "rank"},
    "quantile_clip": {"scaling": "quantile", "clip_quantile": 0.999},
}
SENS_NORMALIZE = ("l2", "rms", "layer")
SENS_T = (0.5, 2.0)


def adapter(task: str) -> str:
    return f"{rt.BASE}+{rt.MODELS}/adapters/{task}"


def cal(task: str) -> str:
    return f"data/real/calibration/{task}.jsonl"


def lewis_recipe(target: str, experts: list[str], method: str, density: float, variant: str | None) -> dict:
    r = {
        "merge_method": method,
        "out_dtype": "bfloat16",
        "base_model": rt.BASE,
        "models": [{"model": adapter(t)} for t in experts],
        "parameters": {"weight": 1.0, "density": density, "lambda": 1.0},
        "evals": [f"real_{target}"],
        "seed": 0,
    }
    if variant is not None:
        r["guidance"] = {
            "sparsity": {
                "method": "lewis",
                "gamma": GAMMA,
                "epsilon": EPSILON,
                "mean_density": density,
                "calibration": cal(target),
                **LEWIS_VARIANTS[variant],
            }
        }
    return r


def sens_recipe(normalize: str | None, temperature: float | None, split: str) -> dict:
    r = {
        "merge_method": "task_arithmetic",
        "out_dtype": "bfloat16",
        "base_model": rt.BASE,
        "models": [{"model": adapter(t), "calibration": cal(t)} for t in TASKS],
        "parameters": {"weight": 1.0, "lambda": TA_LAMBDA},
        "evals": [f"real_{t}" + ("_val" if split == "validation" else "") for t in TASKS],
    }
    if normalize is not None:
        r["guidance"] = {"coefficients": {"method": "sens", "temperature": temperature, "normalize": normalize}}
    return r


def lewis_recipes() -> dict[str, dict]:
    out = {}
    for target in TASKS:
        for method in ("ties", "dare_ties"):
            out[f"multi_{target}__{method}"] = lewis_recipe(target, list(TASKS), method, TIES["density"], None)
            out[f"single_{target}__{method}"] = lewis_recipe(target, [target], method, SINGLE_DENSITY, None)
        for v in LEWIS_VARIANTS:
            out[f"multi_{target}__lewis_{v}"] = lewis_recipe(target, list(TASKS), "ties", TIES["density"], v)
            out[f"single_{target}__lewis_{v}"] = lewis_recipe(target, [target], "ties", SINGLE_DENSITY, v)
    return out


def se(p: float, n: int = 100) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def maps(work: Path, names: list[str]) -> dict[str, dict]:
    """Per recipe: the spread of its LEWIS densities (layer means) or Sens sigma over layers, per expert."""
    out: dict[str, dict] = {}
    for name in names:
        for kind in ("allocation", "coefficients"):
            result = latest_result(work, kind, name)
            if result is None:
                continue
            d = json.loads(result.read_text())
            spread = {}
            if kind == "allocation":
                for model, dens in d["densities"].items():
                    means = layer_means(dens)
                    vals = sorted(dens.values())
                    spread[model.rsplit("/", 1)[-1]] = {
                        "layer_mean_min": min(means),
                        "layer_mean_max": max(means),
                        "tensor_p10": vals[len(vals) // 10],
                        "tensor_p90": vals[9 * len(vals) // 10],
                        "tensor_max": vals[-1],
                    }
            else:
                for model, sig in d.get("sigma", {}).items():
                    spread[model.rsplit("/", 1)[-1]] = {"sigma_min": min(sig.values()), "sigma_max": max(sig.values())}
            out[name] = {"kind": kind, "dir": str(result.parent.relative_to(work)), "spread": spread}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "real" / "framing")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "guided_framing.json")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if not (ROOT / rt.MODELS / "zoo.json").is_file():
        print(f"error: {ROOT / rt.MODELS}: no real zoo; build it with `merge-dag zoo --size real`", file=sys.stderr)
        return 2
    val = {
        f"sens_{n}__T{str(t).replace('.', 'p')}": sens_recipe(n, t, "validation")
        for n in SENS_NORMALIZE
        for t in SENS_T
    }
    if args.dry_run:
        for name, r in {**val, **lewis_recipes()}.items():
            print(name, json.dumps({k: r.get(k) for k in ("merge_method", "parameters", "guidance", "evals")}))
        return 0
    rt.sweep_folder(args.work)
    t0 = time.perf_counter()
    vscores = rt.run_sweep(args.work, val)
    t_val = time.perf_counter() - t0
    chosen = {}
    for n in SENS_NORMALIZE:
        trials = {k: v for k, v in vscores.items() if k.startswith(f"sens_{n}__")}
        best = max(sorted(trials), key=lambda k: round(sum(trials[k].values()) / len(trials[k]), 9))
        chosen[n] = {"trial": best, "validation": {k: sum(v.values()) / len(v) for k, v in trials.items()}}
    test = dict(lewis_recipes())
    test["sens_plain__task_arithmetic"] = sens_recipe(None, None, "test")
    for n, c in chosen.items():
        temperature = float(c["trial"].split("__T")[1].replace("p", "."))
        c["temperature"] = temperature
        test[f"sens_{n}"] = sens_recipe(n, temperature, "test")
    t1 = time.perf_counter()
    scores = rt.run_sweep(args.work, test)
    t_test = time.perf_counter() - t1
    record = {
        "procedure": __doc__.split("The procedure, stated once:")[1].strip(),
        "seconds": {"validation": t_val, "test": t_test},
        "sens_chosen": chosen,
        "test": scores,
        "maps": maps(args.work, list(test)),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))

    def cell(name: str, task: str) -> str:
        v = scores.get(name, {}).get(f"real_{task}")
        return "—" if v is None else f"{v:.2f} ± {se(v):.2f}"

    rows = ["ties", "dare_ties"] + [f"lewis_{v}" for v in LEWIS_VARIANTS]
    for framing, title in (
        ("multi", "three experts merged"),
        ("single", f"the target's expert alone, density {SINGLE_DENSITY}"),
    ):
        print(f"\nLEWIS, {title}; calibration and test = the target task:\n")
        print("| recipe | " + " | ".join(TASKS) + " | mean |\n|---|" + "---:|" * (len(TASKS) + 1))
        for r in rows:
            vals = [scores.get(f"{framing}_{t}__{r}", {}).get(f"real_{t}") for t in TASKS]
            mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
            print(f"| {r} | " + " | ".join(cell(f"{framing}_{t}__{r}", t) for t in TASKS) + f" | {mean:.3f} |")
    print("\nSens-Merging, multi-task (temperature chosen on validation per normalize):\n")
    print("| recipe | " + " | ".join(TASKS) + " | avg ± SE |\n|---|" + "---:|" * (len(TASKS) + 1))
    for name in ["sens_plain__task_arithmetic"] + [f"sens_{n}" for n in SENS_NORMALIZE]:
        s = scores.get(name, {})
        vals = [s.get(f"real_{t}") for t in TASKS]
        if None in vals:
            continue
        avg = sum(vals) / len(vals)
        err = math.sqrt(sum(se(v) ** 2 for v in vals)) / len(vals)
        label = name if name.endswith("arithmetic") else f"{name} (T {chosen[name[5:]]['temperature']:g})"
        print(f"| {label} | " + " | ".join(cell(name, t) for t in TASKS) + f" | {avg:.3f} ± {err:.3f} |")
    print(f"\nvalidation {t_val:.0f} s, test {t_test:.0f} s; maps and scores in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
