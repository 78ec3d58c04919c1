"""The data-free spectral merges (tsv_merge, iso_c, iso_cts) beside task arithmetic on the ci zoo.

    MERGE_DAG_ZOO_DIR=data/models .venv/bin/python bench/spectral_zoo.py [--limit N] [--device cpu]

Merges the ci zoo's three experts onto its base with each method through the engine (recipes in
mergekit's shape, float32), evaluates every merge and the base with lm-eval on each skill's held-out
prompts (greedy exact match, the zoo's own tasks) and prints one row per model with the average and
its binomial standard error. Merges go to bench/.cache/spectral (git-ignored); the JSON to
bench/results/spectral_zoo.json with library versions and machine. A benchmark, not a test: the
numbers depend on the trained zoo (README, "The expert zoo").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ROWS = {  # row label -> (merge_method, parameters)
    "task_arithmetic (λ 0.6)": ("task_arithmetic", {"weight": 1.0, "lambda": 0.6}),
    "task_arithmetic (λ 1.0)": ("task_arithmetic", {"weight": 1.0, "lambda": 1.0}),
    "tsv_merge (λ 1.0)": ("tsv_merge", {"lambda": 1.0}),
    "iso_c (λ 1.0)": ("iso_c", {"lambda": 1.0}),
    "iso_cts (λ 1.0, common 0.8)": ("iso_cts", {"lambda": 1.0}),
}


def main(argv: list[str] | None = None) -> int:
    from merge_dag.core.engine import merge
    from merge_dag.core.recipe import parse_recipe
    from merge_dag.evaluation import evaluate
    from merge_dag.zoo.lmeval import gen_task_name

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    zoo_dir = Path(os.environ.get("MERGE_DAG_ZOO_DIR", ROOT / "data" / "models"))
    ap.add_argument("--zoo", type=Path, default=zoo_dir / "ci")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts per skill")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    manifest = json.loads((args.zoo / "zoo.json").read_text())
    skills = manifest["skills"]
    base = args.zoo / "base"
    experts = [args.zoo / s for s in skills]
    out_root = HERE / ".cache" / "spectral"
    tasks = [gen_task_name(s) for s in skills]

    def score(folder: Path) -> tuple[dict[str, float], int]:
        em, n = {}, 0
        for r in evaluate(str(folder), tasks, device=args.device, limit=args.limit):
            for s in skills:
                if r.task == gen_task_name(s) and r.metric == "exact_match":
                    em[s], n = r.value, r.n or n
        return em, n

    rows: dict[str, dict] = {}
    t0 = time.time()
    em, n = score(base)
    rows["base"] = {"exact_match": em, "n": n}
    for label, (method, params) in ROWS.items():
        recipe = parse_recipe(
            {
                "merge_method": method,
                "base_model": str(base),
                "dtype": "float32",
                "models": [{"model": str(e)} for e in experts],
                "parameters": params,
            }
        )
        folder = out_root / method / "_".join(f"{k}{v}" for k, v in params.items() if k != "weight")
        t = time.time()
        merge(recipe, folder)
        merge_s = time.time() - t
        em, n = score(folder)
        rows[label] = {"exact_match": em, "n": n, "merge_s": round(merge_s, 2), "method": method, "parameters": params}

    print(f"\nci zoo, exact match on {rows['base']['n']} held-out prompts per skill ({time.time() - t0:.0f} s):\n")
    print("| model | " + " | ".join(skills) + " | avg ± SE |")
    print("|---|" + "---:|" * (len(skills) + 1))
    for label, r in rows.items():
        em, k = r["exact_match"], len(skills)
        avg = sum(em[s] for s in skills) / k
        se = math.sqrt(sum(em[s] * (1 - em[s]) / max(1, r["n"]) for s in skills)) / k
        print(f"| {label} | " + " | ".join(f"{em[s]:.3f}" for s in skills) + f" | {avg:.3f} ± {se:.3f} |")
    import lm_eval
    import torch  # noqa: E401
    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print("\n" + ", ".join(f"{k} {v}" for k, v in versions.items()))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "spectral_zoo.json").write_text(json.dumps({"rows": rows, "versions": versions}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
