"""DARE: drop each task-vector entry with probability 1 - density, rescale (2311.03099)."""

from ..sparsify import RANDOM
from ._task_arithmetic_family import TaskArithmeticFamily, ta_params


class DareLinear(TaskArithmeticFamily):
    name = "dare_linear"
    reference_url = "https://arxiv.org/abs/2311.03099"
    description = "DARE random drop + L1 rescale, then task arithmetic"
    sparsification = RANDOM
    randomized = True
    params = ta_params(normalize=False, rescale=True, sparsifies=True)


class DareTies(TaskArithmeticFamily):
    name = "dare_ties"
    reference_url = "https://arxiv.org/abs/2311.03099"
    description = "DARE random drop + L1 rescale, then TIES sign consensus"
    sparsification = RANDOM
    consensus = True
    randomized = True
    params = ta_params(normalize=False, rescale=True, sparsifies=True)
