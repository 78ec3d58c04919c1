"""`merge-dag` commands. Each subcommand's module is imported only when it runs (torch, Dagster and
lm-eval are slow to import)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .core.errors import MergeDagError


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints from a YAML recipe (no Dagster; like mergekit-yaml)")
    p.add_argument("recipe", type=Path, help="recipe YAML (mergekit shape)")
    p.add_argument("out_dir", type=Path, help="output folder (written atomically)")
    p.add_argument("--device", default="cpu", help="torch device for the arithmetic: cpu (default), cuda, cuda:1")
    p.add_argument("--shard-size", default="2GB", help="maximum shard size, e.g. 2GB, 500MB, 1GiB (default 2GB)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier merge_dag output even if it holds files a merge does not write "
        "(they are lost); never replaces a folder without merge_dag.json, an input or the "
        "working directory",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("guided recipes (`guidance:`): how the calibration statistics are computed")
    g.add_argument("--calibration-batch-size", type=int, default=8, help="rows per batch (default 8)")
    g.add_argument("--calibration-max-length", type=int, default=512, help="tokens per row at most (default 512)")
    g.add_argument("--calibration-max-rows", type=int, default=0, help="rows per calibration set (default 0: all)")
    g.add_argument(
        "--stats-dtype",
        default=None,
        help="working dtype each statistics pass loads its model in: float32, bfloat16, float16 "
        "(default $MERGE_DAG_STATS_DTYPE, else float32; statistics accumulate in float32)",
    )
    g.add_argument(
        "--no-cache",
        action="store_true",
        help="compute the statistics in memory even inside a project (default: read and store them in the "
        "project's artifact store, under the Dagster assets' keys)",
    )
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from .core.checkpoint import parse_size
    from .core.engine import check_target, execute, plan_merge
    from .core.recipe import load_recipe

    try:
        shard = parse_size(args.shard_size)
    except ValueError as e:
        raise MergeDagError(f"--shard-size: {e}") from None
    recipe = load_recipe(args.recipe)
    if recipe.guidance is not None:
        return _run_guided(args, recipe, shard)
    plan = plan_merge(recipe, device=args.device)
    if args.dry_run:
        check_target(plan, args.out_dir, overwrite=args.overwrite)
        print(plan.describe())
        print(f"\nplan OK: nothing written (would write {args.out_dir})")
        return 0
    result = execute(plan, args.out_dir, shard_size=shard, progress=not args.no_progress, overwrite=args.overwrite)
    print(
        f"merged {result.tensor_count} tensors ({result.bytes / 1e9:.3f} GB) with {result.method} "
        f"in {result.seconds:.1f} s -> {result.out_dir}"
    )
    print(f"output fingerprint {result.output_fingerprint}")
    return 0


def _run_guided(args: argparse.Namespace, recipe, shard: int) -> int:
    """A recipe with `guidance:`: its statistics computed here by the core (merge_dag.guidance.offline)."""
    from .core.engine import check_target, plan_merge
    from .guidance.offline import guided_merge
    from .settings import settings

    if args.calibration_batch_size < 1 or args.calibration_max_length < 1 or args.calibration_max_rows < 0:
        raise MergeDagError(
            "--calibration-batch-size and --calibration-max-length must be >= 1, --calibration-max-rows >= 0"
        )
    if args.dry_run:
        plain = recipe.model_copy(deep=True)
        plain.guidance = None
        plain.source_path, plain.root = recipe.source_path, recipe.root
        plan = plan_merge(plain, device=args.device)
        check_target(plan, args.out_dir, overwrite=args.overwrite)
        print(plan.describe())
        kinds = [
            k
            for k in ("sparsity", "coefficients", "aim", "regmean", "fisher")
            if getattr(recipe.guidance, k) is not None
        ]
        print(f"\nguidance: {', '.join(kinds)}: statistics computed before the merge (the plan above is without them)")
        print(f"plan OK: nothing written (would write {args.out_dir})")
        return 0
    s = settings()
    dtype = s.checked("stats_dtype") if args.stats_dtype is None else args.stats_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MergeDagError(f"--stats-dtype {dtype!r}: not a working dtype (float32, bfloat16, float16)")
    cache = None
    root = s.project_root()
    data = s.data_dir(root)
    if not args.no_cache and (data / "recipes").is_dir():
        from .guidance.offline import ProjectCache

        cache = ProjectCache(root, args.recipe, s.artifacts or data / "artifacts")
        print(f"statistics: the project's cache {cache.store.root}", file=sys.stderr)
    res = guided_merge(
        recipe,
        args.out_dir,
        device=args.device,
        shard_size=shard,
        batch_size=args.calibration_batch_size,
        max_length=args.calibration_max_length,
        max_rows=args.calibration_max_rows or None,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        log=lambda m: print(m, file=sys.stderr),
        dtype=dtype,
        cache=cache,
    )
    hits = f", {len(res.cache_hits)} from the project's cache" if cache is not None else ""
    print(f"guided merge ({len(res.statistics)} statistics{hits}) in {res.seconds:.1f} s -> {res.out_dir}")
    return 0


# subcommands living in other modules: name -> module with add_arguments(parser) and run(args)
EXTERNAL = {
    "zoo": ("merge_dag.zoo.command", "build the demo expert zoo (tokenizer, base, experts, data)"),
    "demo": (
        "merge_dag.commands.demo",
        "build the zoo if missing, materialize every recipe and eval, print the leaderboard",
    ),
    "compare": (
        "merge_dag.commands.compare",
        "data-guided merges (LEWIS, Sens-Merging, AIM, RegMean) vs their plain counterparts on the demo zoo, per skill",
    ),
    "dev": (
        "merge_dag.commands.dev",
        "start the Dagster UI, daemon, sensor and schedule (dagster dev) for this project",
    ),
    "import": (
        "merge_dag.gguf_command",
        "turn a GGUF file (llama.cpp) into a Hugging Face safetensors folder, "
        "recorded in lineage with the GGUF's sha256",
    ),
    "audit": ("merge_dag.lineage.command", "print the provenance tree of a merged model (path, name or artifact id)"),
    "search": (
        "merge_dag.commands.search",
        "tune a recipe's numbers with Optuna on validation evals (data/searches/<name>.yaml), "
        "each trial a cached Dagster run; writes the best recipe",
    ),
    "worker": (
        "merge_dag.commands.worker",
        "run a Celery worker (queue gpu or cpu) for runs with the celery executor (dagster-celery)",
    ),
    "ingest": (
        "merge_dag.commands.ingest",
        "write the lineage Celery workers spooled into the lineage database (idempotent)",
    ),
    "card": (
        "merge_dag.lineage.card_command",
        "rewrite a merged model's card (README.md front matter) with its lm-eval results from lineage (model-index)",
    ),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Only the chosen external subcommand's module is imported (they pull in torch, Dagster)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="merge-dag", description="Declarative, incremental, auditable model merges.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_merge(sub)
    for name, (module, help_text) in EXTERNAL.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "func"):
            return args.func(args) or 0
        return importlib.import_module(args.module).run(args) or 0
    except MergeDagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the file system refused something no check above foresaw (disk full, permissions, a file
        # vanishing): one line naming the file and the cause, not a traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
