#!/usr/bin/env python
"""Default recipe vs searched recipe (merge-dag search) for task arithmetic, TIES and TIES+LEWIS.

    nice -n 10 .venv/bin/python bench/search.py --size real             # 20 TPE trials per recipe
    nice -n 10 .venv/bin/python bench/search.py --size ci --trials 12 --halving 16   # the ci zoo

For each recipe it writes a search file `<data>/searches/bench_<recipe>.yaml` (unless one exists:
edit it to change the ranges), runs `merge-dag search` on it (resuming a stored study; `--trials`
raises its budget), and evaluates the default recipe the same way. It prints, per recipe, the test
scores of the default and of the searched recipe, the trial count and the search's wall time, and
writes them to bench/results/search.json.

- real zoo (`--size real`, data folder data/real): the objective is the mean exact match over the
  three `real_<task>_val` tasks (validation questions, disjoint from the test ones); the searched
  recipe's test scores come from the search's `report` (evaluated once, after the search).
- ci zoo (`--size ci`): the committed ci tasks have one split (150 prompts each), so the bench
  makes its own project in bench/.cache/ci_search (the ci zoo's models and calibration sets, the
  three recipes with `evals` on the test half): each generation task's prompts are split in two
  halves, `zoo_<task>_val` (first 75, the objective) and `zoo_<task>_test` (last 75, the report and
  the default recipe's scores). Its task vectors and statistics are built there once.

`--halving ROWS` adds `budget.halving: {rows: ROWS, fraction: 0.25}` to the search files it writes
(successive halving: every trial on ROWS prompts per task first, the full validation split only for
the top quarter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("task_arithmetic", "ties", "ties_lewis")


def search_text(
    recipe_file: Path, name: str, objective: list[str], report: list[str], trials: int, halving: int = 0
) -> str:
    """The search of one recipe: lambda and its method's own numbers."""
    from merge_dag.core.recipe import read_recipe_yaml

    data = read_recipe_yaml(recipe_file)
    params = {"parameters.lambda": "{low: 0.2, high: 1.5}"}
    if name == "task_arithmetic":
        for i, _ in enumerate(data.get("models") or []):
            params[f"models[{i}].parameters.weight"] = "{low: 0.5, high: 1.5}"
    elif name == "ties":
        params["parameters.density"] = "{low: 0.2, high: 0.9}"
    elif name == "ties_lewis":
        params["guidance.sparsity.gamma"] = "{low: 0.05, high: 0.5}"
        params["guidance.sparsity.epsilon"] = "{low: 0.6, high: 1.0}"
    lines = [f"# written by bench/search.py: {name} ({recipe_file.name})", f"recipe: {name}", "parameters:"]
    lines += [f"  {k}: {v}" for k, v in params.items()]
    lines += [f"objective: {{tasks: [{', '.join(objective)}], aggregate: mean}}", "optimizer: tpe", "seed: 0"]
    halve = f", halving: {{rows: {halving}, fraction: 0.25}}" if halving else ""
    lines += [f"budget: {{trials: {trials}{halve}}}", "keep_best: 2"]
    if report:
        lines.append(f"report: [{', '.join(report)}]")
    return "\n".join(lines) + "\n"


CI_TASKS = ("arev", "sort", "ashift")


def ci_project(root: Path) -> Path:
    """bench/.cache/ci_search: a data folder with the ci zoo's recipes, calibration sets and each
    generation task split into a validation half and a test half (see the module docstring)."""
    import yaml

    data = root / "bench" / ".cache" / "ci_search"
    src = root / "data"
    for sub in ("recipes", "tasks", "eval"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    if not (data / "calibration").exists():
        (data / "calibration").symlink_to(src / "calibration")
    for t in CI_TASKS:
        rows = (src / "eval" / f"{t}.jsonl").read_text().splitlines(keepends=True)
        half = len(rows) // 2
        task = yaml.safe_load((src / "tasks" / f"zoo_{t}.yaml").read_text())
        for split, part in (("val", rows[:half]), ("test", rows[half:])):
            (data / "eval" / f"{t}_{split}.jsonl").write_text("".join(part))
            out = {**task, "task": f"zoo_{t}_{split}", "tag": ["zoo_search"]}
            out["dataset_kwargs"] = {"data_files": {"test": f"../eval/{t}_{split}.jsonl"}}
            (data / "tasks" / f"zoo_{t}_{split}.yaml").write_text(yaml.safe_dump(out, sort_keys=False))
    for name in RECIPES:
        text = (src / "recipes" / f"{name}.yaml").read_text()
        tests = ", ".join(f"zoo_{t}_test" for t in CI_TASKS)
        lines = [ln if not ln.startswith("evals:") else f"evals: [{tests}]" for ln in text.splitlines()]
        (data / "recipes" / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return data


def default_scores(res, instance, recipe_file: Path, tasks: list[str]) -> dict[str, float]:
    """The default recipe's test scores: its merge and evaluation through the cached assets."""
    from merge_dag.core.search import task_scores
    from merge_dag.dagster.search import _materialize, _metrics
    from merge_dag.project import Project, _add_recipe, recipe_spec

    project = Project(root=res.root_path.absolute(), data=res.data_path)
    spec = recipe_spec(project.root, recipe_file)
    _add_recipe(project, spec)
    project.model_evals.clear()
    keys = [["merged", spec.name], ["eval", "merged", spec.name]]
    result, mats = _materialize(project, res, instance, keys, {"merge_dag/bench": "search"}, quiet=True)
    ev = mats.get(("eval", "merged", spec.name))
    if ev is None:
        raise SystemExit(f"{recipe_file}: the default recipe's run {result.run_id} failed")
    return task_scores(_metrics(res, ev), tasks, None, str(recipe_file))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["ci", "real"], default="real")
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--halving", type=int, default=0, help="budget.halving.rows of the search files written")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = ap.parse_args()
    if args.size == "real":
        os.environ.setdefault("MERGE_DAG_DATA", "data/real")
        os.environ.setdefault("MERGE_DAG_EVAL_DTYPE", "bfloat16")
    else:
        os.environ.setdefault("MERGE_DAG_DATA", str(ci_project(args.root.absolute())))
    from dagster import DagsterInstance

    from merge_dag.commands.demo import quiet
    from merge_dag.commands.home import ensure_dagster_home
    from merge_dag.core.recipe import read_recipe_yaml
    from merge_dag.dagster.resources import resource_from_env
    from merge_dag.dagster.search import run_search

    quiet(False)
    root = args.root.absolute()
    res = resource_from_env(root)
    ensure_dagster_home(root)
    rows = []
    for name in args.recipes.split(","):
        recipe_file = res.data_path / "recipes" / f"{name}.yaml"
        test = list(read_recipe_yaml(recipe_file).get("evals") or [])
        if args.size == "ci":
            test = [t for t in test if t.endswith("_test")]
            objective, report = [t.removesuffix("_test") + "_val" for t in test], test
        else:
            objective, report = [f"{t}_val" for t in test], test
        sfile = res.data_path / "searches" / f"bench_{name}.yaml"
        if not sfile.exists():
            sfile.parent.mkdir(parents=True, exist_ok=True)
            sfile.write_text(search_text(recipe_file, name, objective, report, args.trials, args.halving))
        print(f"\n== {name}: search {sfile}", flush=True)
        t0 = time.perf_counter()
        with DagsterInstance.get() as instance:
            out = run_search(
                root,
                f"bench_{name}",
                resource=res,
                instance=instance,
                trials=args.trials,
                log=lambda s: print(s, flush=True),
                quiet=True,
            )
            seconds = time.perf_counter() - t0
            default = default_scores(res, instance, recipe_file, test)
        searched = out.report["scores"] if out.report else out.best.scores
        rows.append(
            {
                "recipe": name,
                "tasks": test,
                "default": default,
                "searched": searched,
                "trials": len(out.trials),
                "pruned": sum(t.pruned for t in out.trials),
                "new_trials": out.new_trials,
                "search_seconds": round(seconds, 1),
                "best_params": out.best.params,
                "best_validation": out.best.values,
            }
        )
    print("\n| recipe | default (test) | searched (test) | trials (pruned) | search wall time | best parameters |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = sum(r["default"].values()) / len(r["tasks"])
        s = sum(r["searched"].values()) / len(r["tasks"])
        p = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["best_params"].items())
        n = f"{r['trials']} ({r['pruned']})"
        print(f"| {r['recipe']} | {d:.3f} | {s:.3f} | {n} | {r['search_seconds']:.0f} s | {p} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n-> {args.json}")
    return 0


if __name__ == "__main__":
    from merge_dag.core.errors import MergeDagError

    try:
        sys.exit(main())
    except MergeDagError as e:  # a bad search file, failed trials: one line, as merge-dag search prints it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
