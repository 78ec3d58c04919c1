"""DELLA: magnitude-ranked keep probabilities (MagPrune), rescale, then TIES or TA (2406.11617)."""

from ..sparsify import DELLA
from ._task_arithmetic_family import TaskArithmeticFamily, ta_params


class Della(TaskArithmeticFamily):
    name = "della"
    reference_url = "https://arxiv.org/abs/2406.11617"
    description = "DELLA MagPrune (per-row rank-based keep probability) + rescale, then TIES consensus"
    sparsification = DELLA
    consensus = True
    randomized = True
    params = ta_params(normalize=True, rescale=True, sparsifies=True, epsilon=True)


class DellaLinear(TaskArithmeticFamily):
    name = "della_linear"
    reference_url = "https://arxiv.org/abs/2406.11617"
    description = "DELLA MagPrune + rescale, then task arithmetic"
    sparsification = DELLA
    randomized = True
    params = ta_params(normalize=False, rescale=True, sparsifies=True, epsilon=True)
