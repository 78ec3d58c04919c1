"""The merge engine, in three modules (like mergekit's plan.py, merge.py and card.py):

- merge_dag.core.plan: check a recipe against its inputs and order the work (`plan_merge`);
- merge_dag.core.merge: stream the tensors through the method into a new checkpoint (`execute`, `merge`);
- merge_dag.core.card: merge_dag.json and the model card.

This module keeps the names callers have always imported from it.
"""

from .card import model_card, write_card
from .merge import MergeResult, execute, merge, out_tensors
from .plan import MergePlan, TensorInput, TensorStep, check_target, plan_merge

__all__ = [
    "MergePlan",
    "MergeResult",
    "TensorInput",
    "TensorStep",
    "check_target",
    "execute",
    "merge",
    "model_card",
    "out_tensors",
    "plan_merge",
    "write_card",
]
