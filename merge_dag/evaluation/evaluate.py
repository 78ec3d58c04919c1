"""Evaluate a model folder or an in-memory transformers model with lm-eval's Python API.

Offline by default (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are set to 1 unless the caller
already set them). The zoo's tasks come from the YAMLs under ``data/tasks`` (rendered with
absolute data paths); any other task name is handed to lm-eval as it is, so every task lm-eval
knows (and the machine can reach) works too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..core.errors import MergeDagError
from .tasks import default_tasks_dir, local_task_names, render_tasks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 1234


@dataclass(frozen=True)
class EvalRecord:
    """One number: ``metric`` of ``task`` (with ``,filter`` appended when lm-eval used a filter other
    than ``none``), its standard error (None when lm-eval gives none) and the documents counted."""

    task: str
    metric: str
    value: float
    stderr: Optional[float]
    n: Optional[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EvaluationError(MergeDagError, ValueError):
    """Bad input to :func:`evaluate`: an unknown task, a missing model folder, no tokenizer. A
    MergeDagError (one line from the CLI, exit 2); still a ValueError for callers that catch that."""


def _float(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def records_from_results(results: dict) -> list[EvalRecord]:
    """Flatten lm-eval's ``results`` dict into records, sorted by task then metric."""
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})

    def count(task: str) -> Optional[int]:
        if task in n_samples:
            ns = n_samples[task]
            return int(ns.get("effective", ns.get("original")))
        subs = [count(t) for t in subtasks.get(task, [])]
        return sum(subs) if subs and all(s is not None for s in subs) else None

    out = []
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            if section == "groups" and task in results.get("results", {}):
                continue
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                v = _float(value)
                if v is None:
                    continue
                name = metric if filt == "none" else f"{metric},{filt}"
                stderr = _float(metrics.get(f"{metric}_stderr,{filt}"))
                out.append(EvalRecord(task=task, metric=name, value=v, stderr=stderr, n=count(task)))
    return sorted(out, key=lambda r: (r.task, r.metric))


@contextlib.contextmanager
def _quiet(verbose: bool):
    if verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

        was = is_progress_bar_enabled()
        disable_progress_bar()
    except Exception:  # pragma: no cover - datasets without these helpers
        was = None
    # lm-eval records `git describe` of the working directory in every result and lets git print
    # "fatal: not a git repository" outside a checkout: ask git quietly instead (same value)
    import lm_eval.evaluator as lm_evaluator

    probe = lm_evaluator.get_git_commit_hash
    lm_evaluator.get_git_commit_hash = _quiet_git_hash
    bars = _silence_progress_bars()
    try:
        yield
    finally:
        lm_evaluator.get_git_commit_hash = probe
        for module, bar in bars:
            module.tqdm = bar
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if was:
            enable_progress_bar()


def _silence_progress_bars() -> list[tuple[Any, Any]]:
    """Give lm-eval's modules a tqdm that draws nothing (they pass `disable=` themselves, so the
    TQDM_DISABLE variable does not reach them). Returns [(module, original tqdm)] to restore."""
    import sys

    # the modules that draw bars, imported now so that the first evaluation is silent too
    import lm_eval.api.metrics  # noqa: F401
    import lm_eval.api.model  # noqa: F401
    import lm_eval.api.task  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401
    from tqdm import tqdm as real

    def silent(*args: Any, **kwargs: Any):
        kwargs["disable"] = True
        return real(*args, **kwargs)

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("lm_eval") and getattr(module, "tqdm", None) is real:
            patched.append((module, real))
            module.tqdm = silent
    return patched


def _quiet_git_hash() -> Optional[str]:
    """`git describe --always` of the working directory, or None, with git's stderr discarded."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode().strip() or None


def _make_lm(model: Any, tokenizer: Any, device: str, batch_size: int, dtype: str):
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise EvaluationError(f"{folder}: not a model folder (no config.json)")
        tok = tokenizer if tokenizer is not None else str(folder)
        return HFLM(pretrained=str(folder), tokenizer=tok, device=device, batch_size=batch_size, dtype=dtype)
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise EvaluationError(f"model must be a folder path or a transformers model, got {type(model).__name__}")
    if tokenizer is None:
        src = getattr(model, "name_or_path", "") or ""
        if not (src and Path(src, "tokenizer_config.json").is_file()):
            raise EvaluationError(
                "an in-memory model needs tokenizer= (a tokenizer or a folder holding one): "
                f"its name_or_path {src!r} has no tokenizer_config.json"
            )
        tokenizer = src
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if str(next(model.parameters()).device) != str(torch.device(device)):
        model.to(device)
    if dtype not in ("auto", None):
        from ..core.checkpoint import parse_dtype

        model.to(parse_dtype(dtype))
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate(
    model: Union[str, os.PathLike, Any],
    tasks: list[str],
    device: str = "cpu",
    limit: Optional[int] = None,
    batch_size: int = 64,
    tokenizer: Any = None,
    *,
    tasks_dir: Optional[Path] = None,
    dtype: str = "auto",
    seed: int = SEED,
    bootstrap_iters: int = 1000,
    verbose: bool = False,
) -> list[EvalRecord]:
    """Run lm-eval ``tasks`` on ``model`` (a folder path or an in-memory transformers model).

    ``tasks`` may mix the zoo's tasks (``zoo_add``, ``zoo_add_ll``, tags ``zoo`` and ``zoo_ll``)
    and any task name lm-eval knows. For an in-memory model, ``tokenizer`` is a tokenizer object
    or a folder (default: the model's ``name_or_path`` when it holds a tokenizer); the model is
    moved to ``device``. Greedy decoding and fixed seeds make the numbers deterministic.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise EvaluationError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if limit is not None and limit <= 0:
        raise EvaluationError(f"limit must be a positive number of documents, got {limit}")
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    ours = local_task_names(tasks_dir)
    foreign = [t for t in tasks if t not in ours]

    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="merge_dag_tasks_") as tmp, _quiet(verbose):
        render_tasks(Path(tmp), tasks_dir)
        # lm-eval's built-in index (thousands of YAMLs) is scanned only when a task needs it
        tm = TaskManager(include_path=tmp, include_defaults=bool(foreign))
        unknown = [t for t in foreign if t not in tm.all_tasks and not Path(t).is_file()]
        if unknown:
            raise EvaluationError(
                f"unknown task(s) {unknown}: neither in {tasks_dir} ({', '.join(sorted(ours)) or 'empty'}) "
                "nor in lm-eval's task index"
            )
        lm = _make_lm(model, tokenizer, device, batch_size, dtype)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=tm,
            limit=limit,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:  # pragma: no cover - non-zero rank in a distributed launch
        return []
    return records_from_results(results)


def to_table(records: list[EvalRecord]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        out.setdefault(r.task, {})[r.metric] = r.value
    return out
