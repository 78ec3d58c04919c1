"""ties: trim each task vector to its top-density magnitudes, elect signs, disjoint mean (2306.01708)."""

from ..sparsify import MAGNITUDE
from ._task_arithmetic_family import TaskArithmeticFamily, ta_params


class Ties(TaskArithmeticFamily):
    name = "ties"
    reference_url = "https://arxiv.org/abs/2306.01708"
    description = "TIES: magnitude top-k per task vector, sign consensus, normalized sum"
    sparsification = MAGNITUDE
    consensus = True
    params = ta_params(normalize=True, rescale=False, sparsifies=True)
