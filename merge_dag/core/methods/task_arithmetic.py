"""task_arithmetic: theta_0 + lambda * sum_i w_i (theta_i - theta_0) (Ilharco et al., 2212.04089)."""

from ._task_arithmetic_family import TaskArithmeticFamily, ta_params


class TaskArithmetic(TaskArithmeticFamily):
    name = "task_arithmetic"
    reference_url = "https://arxiv.org/abs/2212.04089"
    description = "base + lambda * weighted sum of task vectors"
    params = ta_params(normalize=False, rescale=False, sparsifies=False)
