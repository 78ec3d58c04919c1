"""`merge-dag demo`: build the ci zoo if missing, materialize every recipe under data/recipes and its
evals headless through Dagster (`--size real`: the real zoo and the project whose data folder is
data/real, recipes in data/real/recipes), then print the zoo's quality verdict, the results table (average
with standard errors, merges sorted, guided − plain rows, merges below the base marked) and what was
built or found in cache. Quiet by default: one line per asset; `--verbose` shows Dagster's and
lm-eval's own logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from ..core.paths import models_dir
from ..settings import settings
from .home import ensure_dagster_home


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path.cwd(), help="project root (default: the current folder)")
    p.add_argument(
        "--size",
        default="ci",
        choices=["ci", "bench", "real"],
        help="zoo to build if missing; real: SmolLM2-135M-Instruct with LoRA experts, and the project "
        "in data/real (recipes for every method and guided method, scored on the test split)",
    )
    p.add_argument("--device", default=None, help="torch device for every step (default: $MERGE_DAG_DEVICE or cpu)")
    p.add_argument("--verbose", action="store_true", help="show Dagster's step logs, warnings and lm-eval's progress")


def prepare(args: argparse.Namespace) -> Path:
    """The project root of `args`, with the device set and the zoo of `args.size` built if missing."""
    root = args.root.absolute()
    if args.device:
        os.environ["MERGE_DAG_DEVICE"] = args.device
    if args.size == "real":
        from ..zoo.real.build import build_real_zoo

        # the real project's data folder (unless the user named one): recipes, tasks, eval, calibration,
        # and its own artifacts, lineage and dagster_home
        os.environ.setdefault("MERGE_DAG_DATA", "data/real")
        # lm-eval in bfloat16: 2-3x faster on a CPU with bf16 instructions; the recipes write bfloat16
        os.environ.setdefault("MERGE_DAG_EVAL_DTYPE", "bfloat16")
        # the base-vs-expert table comes from the run's own lm-eval assets: no separate evaluation here
        build_real_zoo(
            models_dir(root),
            progress=True,
            data_dir=root / "data",
            evaluate=False,
            device=args.device or settings().device,
        )
        return root
    from ..zoo.build import build_zoo

    # data files only where missing: a user's edits under data/ survive (`merge-dag zoo` rewrites them)
    build_zoo(size=args.size, out=models_dir(root), progress=True, data_dir=root / "data", overwrite_data=False)
    return root


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    quiet(args.verbose)
    root = prepare(args)
    t_zoo = time.perf_counter() - t0
    print_zoo_verdict(root, args.size)

    print("\nmaterializing every asset through Dagster (one line per asset):")
    result, summary, leaderboard, t_run = materialize_all(root, verbose=args.verbose)
    if leaderboard is not None:
        print_results(root, leaderboard)
    print(f"\nrun {result.run_id[:8]}: {summary}")
    print(f"zoo {t_zoo:.1f} s, Dagster run {t_run:.1f} s, total {time.perf_counter() - t0:.1f} s")
    s = settings()
    db = s.db_path(s.data_dir(root))
    print(f"lineage: {db}  (try: merge-dag audit <recipe name>{' --db ' + str(db) if args.size == 'real' else ''})")
    failed = failure_lines(result)
    if failed:
        print(f"\n{len(failed)} step(s) failed; what depends on them was skipped, everything else was built:")
        print("\n".join(f"  {line}" for line in failed))
    return 0 if result.success and not failed else 1


def _one_line(error) -> str:
    """The user's error inside Dagster's wrappers, as `Class: first line of its message`."""
    while error.cause is not None and error.cls_name and error.cls_name.startswith("Dagster"):
        error = error.cause
    message = (error.message or "").strip()
    prefix = f"{error.cls_name}: "
    full = message.split(": ", 1)[1] if message.split(": ", 1)[0].endswith(error.cls_name or "?") else message
    first = (full.strip().splitlines() or [""])[0]
    return first if error.cls_name == "Failure" else prefix + first


def failure_lines(result) -> list[str]:
    """One line per failed step of `result`: `<asset key>: <the error's first line>`, no traceback."""
    keys = {
        k.to_python_identifier(): k.to_user_string()
        for k in result.job_def.asset_layer.asset_graph.get_all_asset_keys()
    }
    lines = []
    for event in result.get_step_failure_events():
        data = event.event_specific_data
        step = event.step_key or "?"
        node = step.split(".", 1)[0]
        label = keys.get(node)
        if label is None:  # an asset check's step: <asset>_<check name>
            owner = max((k for k in keys if node.startswith(k + "_")), key=len, default=None)
            label = f"{keys[owner]} (check {node[len(owner) + 1 :]})" if owner else step
        if data.user_failure_data is not None and data.user_failure_data.description:
            text = data.user_failure_data.description.strip().splitlines()[0]
        elif data.error is not None:
            text = _one_line(data.error)
        else:
            text = "failed"
        lines.append(f"{label}: {text}")
    return lines


def quiet(verbose: bool) -> None:
    """Unless `verbose`: no Dagster beta/preview/supersession warnings, no tqdm bars (lm-eval's)."""
    if verbose:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    import dagster as dg

    for w in ("BetaWarning", "PreviewWarning", "SupersessionWarning"):
        if hasattr(dg, w):
            warnings.filterwarnings("ignore", category=getattr(dg, w))
    logging.getLogger("dagster").setLevel(logging.WARNING)


def print_zoo_verdict(root: Path, size: str) -> None:
    """The zoo's quality table and verdict (evaluated once per zoo, library versions and machine, then
    read from <zoo>/quality.json). The real zoo: its manifest's table when `merge-dag zoo --size real`
    evaluated it (the demo's own results table has the base and experts on every task anyway)."""
    if size == "real":
        from ..zoo.real.build import RealManifest, RealZooError, quality_table

        try:
            man = RealManifest.load(models_dir(root) / "real")
        except RealZooError:
            return
        if man.quality:
            print("\nThe real zoo (`merge-dag zoo --size real`): exact match on each task's test split\n")
            print(quality_table(man))
        return
    from ..zoo.build import ZooManifest
    from ..zoo.quality import check_quality, load_report, save_report

    zoo_root = models_dir(root) / size
    try:
        man = ZooManifest.load(zoo_root / "zoo.json")
    except ValueError:
        return
    report = load_report(zoo_root, man.settings_key)
    if report is None:
        print(f"checking the {size} zoo's quality once (base, experts, task arithmetic and TIES on every skill)...")
        report = check_quality(man, progress=False)
        if report.meaningful:
            save_report(report, zoo_root)
    print(f"\nThe {size} zoo: exact match on {report.n} held-out prompts per skill (avg ± one standard error)\n")
    print(report.markdown())
    print()
    print(report.criteria_text())
    print(f"\n{report.verdict()}")


def print_results(root: Path, leaderboard: Path) -> None:
    from ..evaluation.report import ScoreTable, format_results
    from ..project import load_project

    results_file = leaderboard.parent / "results.json"
    if not results_file.is_file():
        print(leaderboard.read_text())
        return
    table = ScoreTable.from_results(json.loads(results_file.read_text()))
    bases = [s.base.name for s in load_project(root).recipes.values() if s.base is not None and not s.base.is_adapter]
    base = f"model/{max(set(bases), key=bases.count)}" if bases else None
    print(f"\nResults (leaderboard: {leaderboard})\n")
    print(format_results(table, base=base))


def progress_logger_def():
    """A Dagster logger printing one line per materialized asset (built or cache hit) and per failed
    step (its error's first line), instead of Dagster's DEBUG stream."""
    import dagster as dg

    @dg.logger(description="merge_dag demo progress: one line per asset")
    def progress(_init_context):
        lg = logging.Logger("merge_dag.progress", level=logging.DEBUG)
        lg.addHandler(_ProgressHandler())
        return lg

    return progress


class _ProgressHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        ev = getattr(record, "dagster_event", None)
        if ev is None:
            return
        if ev.event_type_value == "ASSET_MATERIALIZATION":
            mat = ev.event_specific_data.materialization
            cache = mat.metadata.get("cache")
            how = {"hit": "cache hit", "miss": "built"}.get(getattr(cache, "value", None), "done")
            print(f"  {how:<9s} {'/'.join(mat.asset_key.path)}", flush=True)
        elif ev.event_type_value == "STEP_FAILURE":
            err = ev.event_specific_data.error
            print(f"  FAILED    {ev.step_key}: {_one_line(err) if err else 'failed'}", file=sys.stderr, flush=True)


def materialize_all(root: Path, verbose: bool = True):
    """Run the merge_all job of the project at `root` in-process (runs persist in its DAGSTER_HOME).
    `verbose` False: one progress line per asset instead of Dagster's console log.
    Returns (result, lineage summary text, leaderboard.md path or None, seconds)."""
    ensure_dagster_home(root)
    from datetime import datetime, timezone

    from dagster import DagsterInstance

    from ..dagster.definitions import ALL_JOB, build_definitions
    from ..dagster.stale_runs import fail_dead_runs, run_tags

    defs = build_definitions(root)
    job = defs.resolve_job_def(ALL_JOB)
    run_config = None
    if not verbose:
        job = job.with_logger_defs({"progress": progress_logger_def()})
        run_config = {"loggers": {"progress": {}}}
    t1 = time.perf_counter()
    with DagsterInstance.get() as instance:
        for line in fail_dead_runs(instance, defs.resources["merge_dag"].lineage()):
            print(line, flush=True)
        # every independent branch builds; Dagster skips only what depends on a failed step
        result = job.execute_in_process(instance=instance, raise_on_error=False, tags=run_tags(), run_config=run_config)
    seconds = time.perf_counter() - t1
    resource = defs.resources["merge_dag"]
    resource.lineage().record_run(
        run_id=result.run_id,
        finished_at=datetime.now(timezone.utc).replace(tzinfo=None),
        status="success" if result.success else "failure",
        job=ALL_JOB,
    )
    leaderboard = None
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.path == ["leaderboard"]:
            leaderboard = Path(resource.root) / mat.metadata["path"].value / "leaderboard.md"
    return result, resource.lineage().run_summary(result.run_id), leaderboard, seconds
