"""Evaluation with lm-eval (pure: no Dagster). See :func:`evaluate`. Which tasks exist is the task
folder's (the zoo's: merge_dag.zoo.lmeval)."""

from .evaluate import EvalRecord, EvaluationError, evaluate, records_from_results, to_table
from .tasks import render_tasks

__all__ = ["EvalRecord", "EvaluationError", "evaluate", "records_from_results", "to_table", "render_tasks"]
