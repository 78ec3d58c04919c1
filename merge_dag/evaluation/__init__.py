"""Evaluation with lm-eval (pure: no Dagster). See :func:`evaluate`."""

from .evaluate import EvalRecord, EvaluationError, evaluate, records_from_results, to_table
from .tasks import gen_task_name, ll_task_name, render_tasks, write_task_files, zoo_task_names

__all__ = [
    "EvalRecord", "EvaluationError", "evaluate", "records_from_results", "to_table",
    "gen_task_name", "ll_task_name", "render_tasks", "write_task_files", "zoo_task_names",
]
