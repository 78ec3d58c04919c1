"""The ci demo graph (every recipe under data/recipes, its evals, the leaderboard) in-process vs
through two Celery workers (`merge-dag worker --queue gpu` and `--queue cpu --concurrency 2`, a
redis-server on a loopback port), each from empty artifacts and lineage: wall time of each run and
the lineage rows each wrote (which must be the same).

    python bench/scaleout.py [--eval-limit 0] [--keep DIR]

The ci zoo comes from $MERGE_DAG_ZOO_DIR, else data/models (build it with `merge-dag zoo`)."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _celery import have_redis, redis_server, start_worker, stop, wait_ready  # noqa: E402


def project(folder: Path) -> Path:
    zoo = Path(os.environ.get("MERGE_DAG_ZOO_DIR", ROOT / "data" / "models"))
    if not (zoo / "ci" / "zoo.json").is_file():
        sys.exit(f"error: no ci zoo in {zoo} (run `merge-dag zoo` or set MERGE_DAG_ZOO_DIR)")
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "models").symlink_to(zoo, target_is_directory=True)
    for sub in ("recipes", "tasks", "eval", "calibration"):
        shutil.copytree(ROOT / "data" / sub, folder / "data" / sub)
    return folder


def counts(db: Path) -> dict[str, int]:
    from merge_dag.lineage.store import LineageStore

    store = LineageStore(db)
    return {
        t: store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("artifacts", "edges", "events", "metrics")
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-limit", default="0", help="examples per eval task (0 = all, as `merge-dag demo`)")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    args = ap.parse_args()
    if not have_redis():
        sys.exit("error: redis-server is not installed (apt-get install redis-server)")
    base = args.keep or Path(tempfile.mkdtemp(prefix="merge_dag-scaleout-"))
    base.mkdir(parents=True, exist_ok=True)
    root = project(base / "project")
    os.environ.update({"MERGE_DAG_EVAL_LIMIT": args.eval_limit, "MERGE_DAG_CACHE": str(base / "fp-cache")})
    (base / "dagster_home").mkdir(exist_ok=True)

    import dagster as dg

    from merge_dag.dagster.definitions import ALL_JOB, build_definitions, reconstructable_merge_all

    out = {}
    with dg.instance_for_test(temp_dir=str(base / "dagster_home")) as instance:
        os.environ.update(
            {"MERGE_DAG_ARTIFACTS": str(base / "inproc/artifacts"), "MERGE_DAG_DB": str(base / "inproc/l.duckdb")}
        )
        t0 = time.perf_counter()
        res = build_definitions(root).resolve_job_def(ALL_JOB).execute_in_process(instance=instance)
        out["in-process"] = (time.perf_counter() - t0, res.success, counts(base / "inproc/l.duckdb"))

        env = {
            "MERGE_DAG_ARTIFACTS": str(base / "celery/artifacts"),
            "MERGE_DAG_DB": str(base / "celery/l.duckdb"),
            "MERGE_DAG_EVAL_LIMIT": args.eval_limit,
            "MERGE_DAG_CACHE": str(base / "fp-cache"),
        }
        os.environ.update(env)
        with redis_server(base / "redis") as url:
            workers = {
                "gpu@bench": start_worker("gpu", url, base / "worker-gpu", env, "gpu@bench"),
                "cpu@bench": start_worker("cpu", url, base / "worker-cpu", env, "cpu@bench", concurrency=2),
            }
            try:
                wait_ready(url, list(workers), list(workers.values()))
                t0 = time.perf_counter()
                res = dg.execute_job(
                    reconstructable_merge_all(root),
                    instance=instance,
                    run_config={"execution": {"config": {"celery": {"broker": url}}}},
                )
                out["2 Celery workers"] = (time.perf_counter() - t0, res.success, counts(base / "celery/l.duckdb"))
            finally:
                for w in workers.values():
                    stop(w)

    import celery
    import dagster_celery
    import torch

    print(
        f"ci demo graph, eval limit {args.eval_limit or 'none'}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, dagster {dg.__version__}, "
        f"dagster-celery {dagster_celery.__version__}, celery {celery.__version__}"
    )
    print(f"{'run':<18s} {'seconds':>8s}  ok    " + "  ".join(f"{t:>9s}" for t in next(iter(out.values()))[2]))
    for name, (sec, ok, c) in out.items():
        print(f"{name:<18s} {sec:8.1f}  {str(ok):5s} " + "  ".join(f"{n:9d}" for n in c.values()))
    same = len({tuple(c.items()) for _, _, c in out.values()}) == 1
    print("lineage row counts " + ("identical" if same else "DIFFER"))
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if same and all(ok for _, ok, _ in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
