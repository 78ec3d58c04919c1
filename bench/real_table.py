#!/usr/bin/env python
"""The real demo's quality table for the README, from its leaderboard (run `merge-dag demo --size real` first).

    .venv/bin/python bench/real_table.py [--results data/real/artifacts/leaderboard/<key>/results.json]

Rows: the base, each LoRA expert, then every merge by its average, best first. Columns: exact match
per task on the test split ± one binomial standard error, the average ± SE, and "gain kept": the
mean over the merge's tasks of (merge - base) / (own expert - base), the share of each expert's own
gain the merge keeps (the issue's aim: >= 0.70 for the best merge). Then each guided recipe against
its plain twin (same lambda and mean density): the difference of averages ± SE and in SE units.
The two-model methods (numwords + isodate) are scored on those two tasks only.
Last, the guided methods' per-layer maps, in numbers: LEWIS's density per layer (mean over the
layer's tensors) and Sens-Merging's layer sensitivity sigma per layer, as min / max over the 30
layers and their ratio, per expert, with Sens-Merging's cross-task scale tau. And the Fisher statistic's
cost per expert (its pass seconds, rows and target tokens, from each fishers/<expert> artifact).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TWINS = [
    ("ties_lewis", "ties", "LEWIS densities (gamma, epsilon) vs uniform density"),
    ("task_arithmetic_sens", "task_arithmetic", "Sens-Merging coefficients vs equal weights"),
    ("task_arithmetic_aim", "task_arithmetic", "AIM relaxation vs none"),
    ("regmean", "linear", "RegMean closed form vs plain average"),
    ("fisher", "linear", "Fisher-weighted vs plain average"),
    ("fisher_global", "linear", "Fisher over each expert's own mean vs plain average"),
    ("fisher_tensor", "linear", "Fisher over each expert's mean per tensor vs plain average"),
]


def latest_results(data: Path) -> Path:
    files = sorted((data / "artifacts" / "leaderboard").glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"error: no leaderboard under {data / 'artifacts'}: run `merge-dag demo --size real` first")
    return files[-1]


def latest_result(data: Path, kind: str, name: str = "*") -> Path | None:
    """The newest <data>/artifacts/<kind>/<name>-<key>/result.json (any name by default)."""
    pattern = "*/result.json" if name == "*" else f"{name}-*/result.json"
    files = sorted((data / "artifacts" / kind).glob(pattern), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def layer_means(densities: dict[str, float]) -> list[float]:
    """The mean density of each layer's tensors (tensors outside model.layers.N left out)."""
    by_layer: dict[int, list[float]] = {}
    for name, d in densities.items():
        parts = name.split(".")
        if "layers" in parts:
            by_layer.setdefault(int(parts[parts.index("layers") + 1]), []).append(d)
    return [sum(v) / len(v) for v in by_layer.values()]


def _spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3f} – {hi:.3f} (×{hi / lo:.2f})" if lo > 0 else f"{lo:.3f} – {hi:.3f}"


def print_maps(data: Path) -> None:
    """Per expert: LEWIS's per-layer densities and Sens-Merging's per-layer sigma, min – max over layers."""
    alloc, coef = latest_result(data, "allocation"), latest_result(data, "coefficients")
    if not (alloc or coef):
        return
    rows = {}
    if alloc:
        for model, dens in json.loads(alloc.read_text())["densities"].items():
            rows.setdefault(model, {})["lewis"] = _spread(layer_means(dens))
    if coef:
        c = json.loads(coef.read_text())
        for model, sig in c.get("sigma", {}).items():
            rows.setdefault(model, {})["sigma"] = _spread(list(sig.values()))
            rows[model]["tau"] = f"{c['tau'][model]:.2f}" if model in c.get("tau", {}) else ""
    print(f"\nper-layer maps ({alloc.parent.name if alloc else '-'}, {coef.parent.name if coef else '-'}):\n")
    print("| expert | LEWIS density per layer: min – max | Sens sigma per layer: min – max | Sens tau |")
    print("|---|---|---|---:|")
    for model, r in rows.items():
        name = model.rsplit("/", 1)[-1]
        print(f"| {name} | {r.get('lewis', '')} | {r.get('sigma', '')} | {r.get('tau', '')} |")


def print_fisher_cost(data: Path) -> None:
    """Per expert: the newest Fisher statistic's pass time, rows and target tokens (fisher.json)."""
    newest: dict[str, Path] = {}
    for f in sorted((data / "artifacts" / "fishers").glob("*/fisher.json"), key=lambda p: p.stat().st_mtime):
        newest[f.parent.name.rsplit("-", 1)[0]] = f
    if not newest:
        return
    print("\nFisher statistic per expert (one forward + backward pass per calibration row):\n")
    print("| expert | estimator | rows | target tokens | seconds |\n|---|---|---:|---:|---:|")
    for name, f in newest.items():
        m = json.loads(f.read_text())
        model = str(m.get("model", name)).rsplit("/", 1)[-1]
        print(f"| {model} | {m.get('estimator')} | {m.get('rows')} | {m.get('tokens')} | {m.get('seconds', 0):.1f} |")


def main() -> int:
    from merge_dag.evaluation.report import ScoreTable

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "real")
    args = ap.parse_args()
    path = args.results or latest_results(args.data)
    table = ScoreTable.from_results(json.loads(path.read_text()))
    tasks = table.tasks
    short = {t: t.removeprefix("real_") for t in tasks}
    sources = [m for m in table.scores if not m.startswith("merged/")]
    base = next(m for m in sources if m.endswith("_base"))
    # the LoRA adapter expert of each task (the full merged folder of the same expert, which the
    # two-model recipes use, scores the same on its task but is evaluated on fewer tasks)
    own = {
        t: sorted((m for m in sources if m.endswith("_" + short[t])), key=lambda m: "adapters" not in m)[0]
        for t in tasks
    }
    merges = sorted((m for m in table.scores if m.startswith("merged/")), key=table.average, reverse=True)

    def cell(m, t):
        return f"{table.value(m, t):.2f} ± {table.se(m, t):.2f}" if t in table.scores[m] else "—"

    def kept(m):
        ts = [t for t in tasks if t in table.scores[m] and table.value(own[t], t) > table.value(base, t)]
        if not ts:
            return float("nan")
        return sum(
            (table.value(m, t) - table.value(base, t)) / (table.value(own[t], t) - table.value(base, t)) for t in ts
        ) / len(ts)

    print(f"results: {path}\n")
    print("| model | " + " | ".join(short[t] for t in tasks) + " | avg ± SE | gain kept |")
    print("|---|" + "---:|" * (len(tasks) + 2))
    print(
        "| base | " + " | ".join(cell(base, t) for t in tasks) + f" | {table.average(base):.3f} ± "
        f"{table.se_average(base):.3f} | |"
    )
    for t in tasks:
        e = own[t]
        print(
            f"| expert {short[t]} (LoRA) | "
            + " | ".join(cell(e, u) for u in tasks)
            + f" | {table.average(e):.3f} ± {table.se_average(e):.3f} | |"
        )
    own_avg = sum(table.value(own[t], t) for t in tasks) / len(tasks)
    print(
        "| *each expert on its own task* | "
        + " | ".join(f"{table.value(own[t], t):.2f}" for t in tasks)
        + f" | {own_avg:.3f} | 1 |"
    )
    for m in merges:
        star = "" if table.complete(m) else "*"
        print(
            f"| {m.removeprefix('merged/')} | "
            + " | ".join(cell(m, t) for t in tasks)
            + f" | {table.average(m):.3f} ± {table.se_average(m):.3f}{star} | {kept(m):.2f} |"
        )
    print("\n| guided − plain twin | Δ avg ± SE | Δ / SE |\n|---|---:|---:|")
    for g, p, what in TWINS:
        a, b = f"merged/{g}", f"merged/{p}"
        if a in table.scores and b in table.scores:
            d, se = table.diff(a, b)
            print(f"| {g} − {p} ({what}) | {d:+.3f} ± {se:.3f} | {d / se if se else float('nan'):+.1f} |")
    print_maps(args.data)
    print_fisher_cost(args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
