"""multislerp: weighted barycentric interpolation of any number of models on the hypersphere.

Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit 0.1.5 defines
it. Each input x_i is the whole flattened tensor (with a base model: the task vector
theta_i - theta_0, and theta_0 is added back at the end). With weights w_i (divided by their sum
when normalize_weights: true) and eps:

    n_i = |x_i|,  u_i = x_i / (n_i + eps)                    (onto the unit sphere)
    m = sum_i w_i u_i;  if |m| < eps: two inputs give w_0 x_0 + w_1 x_1, more are an error
    m = m / |m|                                              (tangent point)
    g = sum_i w_i (u_i - (u_i . m) m)                        (weighted mean in the tangent space)
    r = cos(|g| + eps) m + sin(|g| + eps) g / (|g| + eps)    (exponential map back to the sphere)
    v = (sum_i w_i n_i) r

A single input is returned as it is. Where every x_i is 0 (with a base: a tensor no model changed)
the result is 0 (the base); mergekit 0.1.5 raises its "weighted sum is zero" error there for three
or more inputs.
"""

from __future__ import annotations

import torch

from ..errors import MergeInputError, RecipeError
from .base import MergeMethod, Param, TensorTask, non_negative


class MultiSlerp(MergeMethod):
    name = "multislerp"
    reference_url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    description = "Multi-SLERP: weighted mean of several models on the hypersphere (optionally of task vectors)"
    requires_base = False
    optional_base = True
    min_models = 1
    params = (
        Param("weight", required=True, per_model=True, help="this model's weight"),
        Param("normalize_weights", default=True, kind=bool, help="divide the weights by their sum"),
        Param("eps", default=1e-8, check=non_negative, help="numerical guard in the norms"),
    )

    @classmethod
    def work_copies(cls, n_models: int) -> int:
        # the stacked inputs, their unit vectors and a weighted product (T each); mean, tangent, result
        return 3 * n_models + 3

    def merge(self, task: TensorTask) -> torch.Tensor:
        xs, base = task.models, task.base
        if len(xs) == 1 or xs[0].numel() == 0:
            return xs[0]
        eps = float(task.params["eps"])
        shape = xs[0].shape
        stack = torch.stack(xs, dim=0)
        del xs[:]
        if base is not None:
            stack -= base
        flat = stack.view(stack.shape[0], -1)
        weights = torch.tensor(
            [float(mp["weight"]) for mp in task.model_params], dtype=torch.float32, device=stack.device
        )
        if task.params["normalize_weights"]:
            total = weights.sum()
            if float(total) == 0:
                raise RecipeError(
                    f"multislerp: the weights of tensor {task.name!r} sum to 0, so they cannot "
                    "be normalized (give other weights or normalize_weights: false)"
                )
            weights = weights / total
        norms = torch.norm(flat, dim=-1, keepdim=True)
        if not bool(norms.any()):  # every input (task vector) is 0: so is their mean
            out = torch.zeros(shape, dtype=torch.float32, device=stack.device)
            return out + base if base is not None else out
        units = flat / (norms + eps)
        mean = (units * weights.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if stack.shape[0] == 2:  # antipodal pair: the linear combination
                out = (stack[0] * weights[0] + stack[1] * weights[1]).view(shape)
                return out + base if base is not None else out
            raise MergeInputError(
                f"multislerp: tensor {task.name!r}: the weighted mean of the unit inputs is 0 "
                "(antipodal inputs whose weights balance out); give other weights"
            )
        mean = mean / mean_norm
        dots = (units * mean).sum(-1, keepdim=True)
        tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
        del units
        tnorm = torch.norm(tangent) + eps
        out = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
        out = (out * (norms.squeeze(-1) * weights).sum()).view(shape)
        return out + base if base is not None else out
