#!/usr/bin/env python
"""Choose every hyperparameter of the real demo's recipes on the VALIDATION split, then write them.

    nice -n 10 .venv/bin/python bench/real_tune.py            # tune, write data/real/recipes/*.yaml
    nice -n 10 .venv/bin/python bench/real_tune.py --dry-run  # print the grids only

The real zoo (`merge-dag zoo --size real`) must exist. The procedure, stated once:

1. Stage 1, plain methods. For each method family below, one recipe per point of its grid
   (`FAMILIES`) goes into a sweep project (data folder `data/real/tune`: recipes generated here,
   tasks/eval/calibration linked to data/real's), evaluated on the three `real_<task>_val` tasks
   (50 validation questions per task, disjoint from the 100 test questions). The whole sweep runs
   through Dagster exactly like the demo (`materialize_all`), so task vectors and statistics are
   computed once and shared, and every trial is in the sweep's lineage database.
2. The chosen point of each family: highest mean validation exact match over the three tasks;
   ties go to the smaller lambda, then the larger density, then grid order.
3. Stage 2, guided methods, each at its plain twin's chosen lambda and (mean) density, so each
   guided recipe differs from its twin only by its guidance: LEWIS (gamma, epsilon) on TIES,
   Sens-Merging (temperature) and AIM (omega) on task arithmetic, RegMean (a) against linear.
   Chosen by the same rule. The other task-arithmetic variants are not swept: dare_ties,
   breadcrumbs_ties and della take TIES's chosen (density, lambda); dare_linear, breadcrumbs and
   della_linear take task arithmetic's chosen lambda at density 0.6 (gamma 0.01, epsilon 0.15:
   mergekit's defaults), so each differs from its tuned relative only by its sparsification.
4. Families without a hyperparameter (linear, model_stock, karcher, multislerp, and the two-model
   methods at their midpoint) are not evaluated on validation: there is nothing to choose.
5. The chosen recipe of every family is written to data/real/recipes/<family>.yaml with the TEST
   tasks as its evals (the test split is never read here), and the whole grid with its validation
   scores to bench/results/real_tune.json.

`merge-dag demo --size real` then builds and scores the written recipes on the test split.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("acronym", "numwords", "isodate")
MODELS = "data/models/real"
BASE = f"{MODELS}/base"


def adapter(task: str) -> str:
    """The task's LoRA expert as a recipe names it: mergekit's `base+adapter` form."""
    return f"{BASE}+{MODELS}/adapters/{task}"


def experts(weight: bool = True, calibration: bool = False, tasks=TASKS) -> list[dict]:
    out = []
    for t in tasks:
        e = {"model": adapter(t)}
        if weight:
            e["parameters"] = {"weight": 1.0}
        if calibration:
            e["calibration"] = f"data/real/calibration/{t}.jsonl"
        out.append(e)
    return out


# family -> (merge_method, fixed parameters, grid of global parameters, options)
#   options: base (bool, default True), weight (per-model weight 1.0, default True),
#            twin (stage 2: the plain family whose chosen lambda / density it takes),
#            guidance (dict, merged with the grid's guidance keys), pair (two-model method)
FAMILIES: dict[str, dict] = {
    "linear": {"method": "linear", "base": False, "grid": {}},
    "task_arithmetic": {"method": "task_arithmetic", "grid": {"lambda": [0.3, 0.5, 0.7, 1.0]}},
    "ties": {"method": "ties", "grid": {"density": [0.3, 0.6], "lambda": [0.7, 1.0]}},
    # the rest of the task-arithmetic family takes the lambda and density chosen for its nearest tuned
    # relative (stage 2), so each differs from it only by its sparsification
    "dare_ties": {"method": "dare_ties", "twin": "ties", "grid": {}},
    "breadcrumbs_ties": {"method": "breadcrumbs_ties", "twin": "ties", "fixed": {"gamma": 0.01}, "grid": {}},
    "della": {"method": "della", "twin": "ties", "fixed": {"epsilon": 0.15}, "grid": {}},
    "dare_linear": {"method": "dare_linear", "twin": "task_arithmetic", "fixed": {"density": 0.6}, "grid": {}},
    "breadcrumbs": {
        "method": "breadcrumbs",
        "twin": "task_arithmetic",
        "fixed": {"density": 0.6, "gamma": 0.01},
        "grid": {},
    },
    "della_linear": {
        "method": "della_linear",
        "twin": "task_arithmetic",
        "fixed": {"density": 0.6, "epsilon": 0.15},
        "grid": {},
    },
    "model_stock": {"method": "model_stock", "weight": False, "grid": {}},
    "multislerp": {"method": "multislerp", "grid": {}},
    "karcher": {"method": "karcher", "base": False, "weight": False, "grid": {}},
    "sce": {"method": "sce", "weight": False, "grid": {"select_topk": [0.1, 0.3]}},
    "tsv_merge": {"method": "tsv_merge", "weight": False, "grid": {"lambda": [0.5, 1.0]}},
    "iso_c": {"method": "iso_c", "weight": False, "grid": {"lambda": [1.0, 1.5]}},
    "iso_cts": {"method": "iso_cts", "weight": False, "grid": {"lambda": [1.0, 1.5]}},
    # guided, stage 2: at the twin's chosen lambda / density
    "ties_lewis": {
        "method": "ties",
        "twin": "ties",
        "calibration": True,
        "grid": {"gamma_epsilon": [(0.3, 0.8), (0.2, 0.9)]},
    },
    "task_arithmetic_sens": {
        "method": "task_arithmetic",
        "twin": "task_arithmetic",
        "calibration": True,
        "grid": {"temperature": [0.5, 2.0]},
    },
    "task_arithmetic_aim": {
        "method": "task_arithmetic",
        "twin": "task_arithmetic",
        "calibration": True,
        "grid": {"omega": [0.2, 0.4]},
    },
    "regmean": {"method": "linear", "base": False, "twin": "linear", "calibration": True, "grid": {"a": [0.5, 0.9]}},
    # two-model methods: numwords and isodate (no hyperparameter chosen: the midpoint, t = 0.5)
    "slerp": {"method": "slerp", "pair": True, "grid": {}},
    "nuslerp": {"method": "nuslerp", "pair": True, "grid": {}},
    "nearswap": {"method": "nearswap", "pair": True, "grid": {}},
    "arcee_fusion": {"method": "arcee_fusion", "pair": True, "grid": {}},
}
GUIDED = [f for f, spec in FAMILIES.items() if "twin" in spec and spec.get("calibration")]
STAGE2 = [f for f, spec in FAMILIES.items() if "twin" in spec]  # guided, and the inheriting plain ones
PAIR_TASKS = ("numwords", "isodate")


def grid_points(spec: dict) -> list[dict]:
    keys = list(spec["grid"])
    return [dict(zip(keys, values)) for values in itertools.product(*(spec["grid"][k] for k in keys))] or [{}]


def point_name(family: str, point: dict) -> str:
    if not point:
        return family
    parts = []
    for k, v in point.items():
        v = "_".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        parts.append(f"{k[:3]}{v.replace('.', 'p')}")
    return f"{family}__{'_'.join(parts)}"


def recipe(family: str, point: dict, twin_point: dict | None, split: str) -> dict:
    """The recipe of `family` at `point` (and, for a guided family, its twin's chosen point)."""
    spec = FAMILIES[family]
    method = spec["method"]
    tasks = PAIR_TASKS if spec.get("pair") else TASKS
    # written in bfloat16, as fine-tunes are shipped; the evaluation runs in bfloat16 anyway (MERGE_DAG_EVAL_DTYPE)
    r: dict = {"name": family, "merge_method": method, "out_dtype": "bfloat16"}
    params = dict(spec.get("fixed", {}))
    if spec.get("pair"):
        a, b = (f"{MODELS}/{t}" for t in PAIR_TASKS)  # the merged expert folders
        if method == "nuslerp":
            r["base_model"] = BASE
            r["models"] = experts(tasks=PAIR_TASKS)
        else:
            r["base_model"] = a
            r["models"] = [{"model": b}]
            params.update({"slerp": {"t": 0.5}, "nearswap": {"t": 0.001}}.get(method, {}))
    else:
        if spec.get("base", True):
            r["base_model"] = BASE
        r["models"] = experts(weight=False, calibration=spec.get("calibration", False))
        if spec.get("weight", True):
            params.setdefault("weight", 1.0)
    twin_params = {k: v for k, v in (twin_point or {}).items() if k in ("lambda", "density")}
    params.update(twin_params)
    guidance = {}
    for k, v in point.items():
        if k == "gamma_epsilon":
            guidance["sparsity"] = {
                "method": "lewis",
                "gamma": v[0],
                "epsilon": v[1],
                "mean_density": twin_params.get("density", 0.6),
            }
        elif k == "temperature":
            guidance["coefficients"] = {"method": "sens", "temperature": v}
        elif k == "omega":
            guidance["aim"] = {"calibration": [f"data/real/calibration/{t}.jsonl" for t in TASKS], "omega": v}
        elif k == "a":
            guidance["regmean"] = {"a": v}
        else:
            params[k] = v
    if params:
        r["parameters"] = params
    if guidance:
        r["guidance"] = guidance
    r["evals"] = [f"real_{t}" + ("_val" if split == "validation" else "") for t in tasks]
    return r


TRIAL_HEADER = "sweep trial written by bench/real_tune.py"


def write_yaml(path: Path, data: dict, header: str) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    path.write_text(text + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))


def sweep_folder(work: Path) -> None:
    """The sweep's data folder: its own recipes, the real project's tasks, eval and calibration; this
    process's project data folder from now on (MERGE_DAG_DATA), evaluating in bfloat16 unless
    MERGE_DAG_EVAL_DTYPE says otherwise (as `merge-dag demo --size real`)."""
    os.environ["MERGE_DAG_DATA"] = str(work.absolute())
    os.environ.setdefault("MERGE_DAG_EVAL_DTYPE", "bfloat16")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("tasks", "eval", "calibration"):
        link = work / name
        if not link.exists():
            link.symlink_to(ROOT / "data" / "real" / name, target_is_directory=True)
    (work / "recipes").mkdir(exist_ok=True)


def run_sweep(work: Path, recipes: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Materialize `recipes` (name -> recipe) in the sweep project; name -> task -> validation score."""
    from merge_dag.commands.demo import materialize_all, quiet
    from merge_dag.evaluation.report import ScoreTable

    rdir = work / "recipes"
    stale = sorted(rdir.glob("*.yaml"))
    foreign = [f for f in stale if not f.read_text().startswith(f"# {TRIAL_HEADER}\n")]
    if foreign:  # never delete what the sweep did not write
        raise SystemExit(
            f"error: {foreign[0]}: not a sweep trial of bench/real_tune.py; --work needs a folder of its own"
        )
    for f in stale:  # the previous sweep's trials
        f.unlink()
    for name, r in recipes.items():
        write_yaml(rdir / f"{name}.yaml", {**r, "name": name}, TRIAL_HEADER)
    quiet(False)
    result, summary, leaderboard, seconds = materialize_all(ROOT, verbose=False)
    print(f"sweep run {result.run_id[:8]}: {summary} ({seconds:.0f} s)", flush=True)
    if leaderboard is None:
        raise SystemExit("the sweep produced no leaderboard")
    table = ScoreTable.from_results(json.loads((leaderboard.parent / "results.json").read_text()))
    out = {}
    for name in recipes:
        label = f"merged/{name}"
        if label in table.scores:
            out[name] = {t: table.value(label, t) for t in table.scores[label]}
    return out


def choose(family: str, trials: dict[str, dict], scores: dict[str, dict[str, float]]) -> str:
    """The trial of `family` with the highest mean validation score; ties: smaller lambda, larger
    density, then grid order."""

    def key(item):
        i, (name, point) = item
        s = scores.get(name)
        mean = sum(s.values()) / len(s) if s else float("-inf")
        return (-round(mean, 9), point.get("lambda", 0), -point.get("density", 0), i)

    return sorted(enumerate(trials.items()), key=key)[0][1][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "real" / "tune", help="the sweep's data folder")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "real" / "recipes", help="where chosen recipes go")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "real_tune.json")
    ap.add_argument("--dry-run", action="store_true", help="print the grids, run nothing")
    args = ap.parse_args()
    if not (ROOT / MODELS / "zoo.json").is_file():
        print(f"error: {ROOT / MODELS}: no real zoo; build it with `merge-dag zoo --size real`", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    chosen: dict[str, dict] = {}
    record: dict = {
        "procedure": __doc__.split("The procedure, stated once:")[1].split("`merge-dag demo")[0].strip(),
        "trials": {},
        "chosen": {},
    }
    plain = [f for f in FAMILIES if f not in STAGE2]
    for stage, families in (("plain", plain), ("at the chosen lambda / density of their twin", STAGE2)):
        trials: dict[str, dict[str, dict]] = {}
        for fam in families:
            spec = FAMILIES[fam]
            twin = chosen.get(spec.get("twin"), {}).get("point") if "twin" in spec else None
            pts = grid_points(spec)
            trials[fam] = {point_name(fam, p): p for p in pts} if len(pts) > 1 else {}
            if len(pts) == 1:
                chosen[fam] = {"point": pts[0], "recipe": recipe(fam, pts[0], twin, "test"), "validation": None}
        sweep = {
            name: recipe(fam, p, chosen.get(FAMILIES[fam].get("twin"), {}).get("point"), "validation")
            for fam, ts in trials.items()
            for name, p in ts.items()
        }
        print(
            f"{stage}: {len(sweep)} validation trials over {sum(1 for t in trials.values() if t)} families", flush=True
        )
        if args.dry_run:
            for name, r in sweep.items():
                print(f"  {name}: {json.dumps({k: r[k] for k in ('parameters', 'guidance') if k in r})}")
            continue
        sweep_folder(args.work)
        scores = run_sweep(args.work, sweep) if sweep else {}
        for fam, ts in trials.items():
            if not ts:
                continue
            best = choose(fam, ts, scores)
            twin = chosen.get(FAMILIES[fam].get("twin"), {}).get("point")
            point = {**(twin or {}), **ts[best]} if twin else ts[best]
            chosen[fam] = {
                "point": point,
                "recipe": recipe(fam, ts[best], twin, "test"),
                "validation": {n: scores.get(n) for n in ts},
                "trial": best,
            }
            for n in ts:
                record["trials"][n] = {"family": fam, "point": ts[n], "twin_point": twin, "validation": scores.get(n)}
    if args.dry_run:
        return 0
    for fam, c in chosen.items():
        grid = FAMILIES[fam]["grid"]
        lines = [
            f"{fam}: written by bench/real_tune.py (do not edit by hand; rerun it).",
            "Scored on the TEST split by `merge-dag demo --size real`.",
        ]
        if c["validation"]:
            lines.append("Chosen on the VALIDATION split (50 questions per task), highest mean exact match of:")
            for n, s in c["validation"].items():
                mean = sum(s.values()) / len(s) if s else float("nan")
                mark = "  <- chosen" if n == c["trial"] else ""
                lines.append(f"  {json.dumps(record['trials'][n]['point'])}: {mean:.3f}{mark}")
        elif grid == {} and fam not in STAGE2:
            lines.append(
                "No hyperparameter to choose"
                + (" (two-model method: numwords and isodate at t = 0.5)" if FAMILIES[fam].get("pair") else "")
                + "."
            )
        if fam in GUIDED:
            lines.append(
                f"Guided twin of {FAMILIES[fam]['twin']}: same lambda and (mean) density as its chosen recipe."
            )
        elif "twin" in FAMILIES[fam]:
            lines.append(f"Takes the lambda (and density) chosen for {FAMILIES[fam]['twin']} on validation.")
        write_yaml(args.out / f"{fam}.yaml", c["recipe"], "\n".join(lines))
        record["chosen"][fam] = {"point": c["point"], "trial": c.get("trial")}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=list) + "\n")
    print(f"wrote {len(chosen)} recipes to {args.out} and the grid to {args.json} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
