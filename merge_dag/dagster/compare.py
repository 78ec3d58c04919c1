"""`merge-dag compare`: data-guided merges against their plain counterparts on the demo zoo.

Materializes the project's recipes (data/recipes: the plain and the guided demo recipes) through
Dagster, like `merge-dag demo`, and prints each skill's exact match side by side for the pairs
below. `--size bench` runs the same recipes on the bench zoo: they are copied, with
data/models/ci/ read as data/models/bench/, into a project of their own under data/compare/bench
(git-ignored; calibration sets, tasks and eval data are shared through links), so the two sizes
never share a cache key or a leaderboard.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .demo import materialize_all, prepare

# (label, plain recipe, guided recipe): what each guidance is compared against
PAIRS = [
    ("LEWIS densities vs uniform (TIES, same mean density)", "ties", "ties_lewis"),
    ("Sens-Merging coefficients vs uniform (task arithmetic, same lambda)", "task_arithmetic", "task_arithmetic_sens"),
    ("AIM relaxation vs none (task arithmetic)", "task_arithmetic", "task_arithmetic_aim"),
    ("RegMean vs plain average (linear)", "linear", "regmean"),
]
METRIC = "exact_match"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path.cwd(), help="project root (default: the current folder)")
    p.add_argument("--size", default="ci", choices=["ci", "bench"], help="zoo to compare on (built if missing)")
    p.add_argument("--device", default=None, help="torch device for every step (default: $MERGE_DAG_DEVICE or cpu)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")


def bench_project(root: Path, size: str) -> Path:
    """data/compare/<size>: the root's recipes pointed at data/models/<size>, everything else linked."""
    proj = root / "data" / "compare" / size
    (proj / "data" / "recipes").mkdir(parents=True, exist_ok=True)
    for name in ("models", "calibration", "tasks", "eval"):
        link = proj / "data" / name
        if not link.exists():
            link.symlink_to(root / "data" / name, target_is_directory=True)
    wanted = set()
    for f in sorted((root / "data" / "recipes").glob("*.y*ml")):
        text = f.read_text().replace("data/models/ci/", f"data/models/{size}/")
        out = proj / "data" / "recipes" / f.name
        wanted.add(out.name)
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
    for stale in (proj / "data" / "recipes").iterdir():
        if stale.name not in wanted:
            stale.unlink()
    return proj


def skill_table(leaderboard_json: Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(skills, {model label: {skill: exact match, "avg": mean}}) from the leaderboard artifact."""
    data = json.loads(leaderboard_json.read_text())
    cols = [c for c in data["columns"] if c.endswith(f"/{METRIC}")]
    skills = [c.split("/")[0].removeprefix("zoo_") for c in cols]
    table = {}
    for row in data["rows"]:
        vals = {s: row[c] for s, c in zip(skills, cols) if c in row}
        if vals:
            vals["avg"] = sum(vals.values()) / len(vals)
            table[row["model"]] = vals
    return skills, table


def format_comparison(skills: list[str], table: dict[str, dict[str, float]]) -> str:
    cols = skills + ["avg"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def row(label: str, key: str) -> None:
        if key in table:
            lines.append(f"| {label} | " + " | ".join(f"{table[key].get(c, float('nan')):.3f}" for c in cols) + " |")

    for label in [k for k in table if k.startswith("model/")]:
        row(label.removeprefix("model/"), label)
    for title, plain, guided in PAIRS:
        a, b = table.get(f"merged/{plain}"), table.get(f"merged/{guided}")
        if a is None or b is None:
            continue
        lines.append(f"| *{title}* |" + " |" * len(cols))
        row(f"{plain}", f"merged/{plain}")
        row(f"{guided}", f"merged/{guided}")
        lines.append("| Δ guided − plain | " + " | ".join(f"{b[c] - a[c]:+.3f}" for c in cols) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    root = prepare(args)
    proj = root if args.size == "ci" else bench_project(root, args.size)
    result, summary, leaderboard, seconds = materialize_all(proj)
    if leaderboard is None:
        print("no leaderboard: the recipes name no evals")
        return 1
    skills, table = skill_table(leaderboard.with_suffix(".json"))
    text = format_comparison(skills, table)
    print(f"\nExact match per skill, {args.size} zoo (leaderboard: {leaderboard})\n")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "skills": skills, "table": table}, indent=2) + "\n")
    print(f"\nrun {result.run_id[:8]}: {summary}")
    print(f"Dagster run {seconds:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return 0 if result.success else 1
