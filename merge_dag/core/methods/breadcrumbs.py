"""Model Breadcrumbs: drop the largest (gamma) and the smallest magnitudes, keep density (2312.06795)."""

from ..sparsify import MAGNITUDE_OUTLIERS
from ._task_arithmetic_family import TaskArithmeticFamily, ta_params


class Breadcrumbs(TaskArithmeticFamily):
    name = "breadcrumbs"
    reference_url = "https://arxiv.org/abs/2312.06795"
    description = "breadcrumbs sparsification (outliers and small entries removed), then task arithmetic"
    sparsification = MAGNITUDE_OUTLIERS
    params = ta_params(normalize=False, rescale=False, sparsifies=True, gamma=True)


class BreadcrumbsTies(TaskArithmeticFamily):
    name = "breadcrumbs_ties"
    reference_url = "https://arxiv.org/abs/2312.06795"
    description = "breadcrumbs sparsification, then TIES sign consensus"
    sparsification = MAGNITUDE_OUTLIERS
    consensus = True
    params = ta_params(normalize=False, rescale=False, sparsifies=True, gamma=True)
