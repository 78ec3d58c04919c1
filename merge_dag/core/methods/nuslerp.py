"""nuslerp: slerp between two models weighted like linear, row-wise or whole, optionally on task vectors.

mergekit's NuSLERP, as mergekit 0.1.5 defines it. With per-model weights w0, w1 the interpolation
factor is t = w1 / (w0 + w1) (t = 0.5 when |w0 + w1| < 1e-6). With a base model the two task
vectors are interpolated and added back: v = theta_0 + nuslerp(t, theta_1 - theta_0, theta_2 - theta_0);
without one, v = nuslerp(t, theta_1, theta_2).

nuslerp(t, a, b) works on vectors: the whole flattened tensor (nuslerp_flatten: true, the default),
else each row along the last dimension, or with nuslerp_row_wise: true each vector along the first
dimension (the columns of a matrix). Per vector, with u = x / max(|x|, 1e-7):

    c = clamp(u_a . u_b, -1, 1),  theta = acos(c)
    v = (sin((1 - t) theta) a + sin(t theta) b) / sin(theta)
    v = (1 - t) a + t b        where 1 - c^2 <= 1e-16 (colinear vectors: plain lerp)

Unlike `slerp`, the endpoints are not unit-normalized before interpolating, so the result's norm
interpolates the two norms along the arc, and there is no 0.9995 lerp threshold.
"""

from __future__ import annotations

import torch

from ..errors import RecipeError
from .base import MergeMethod, Param, TensorTask

EPS = 1e-8
NORM_EPS = 1e-7


def nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, dim: int = -1, flatten: bool = True) -> torch.Tensor:
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    ua = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    ub = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(ua.mul_(ub), dim=-1, keepdim=True).clamp(-1, 1)
    del ua, ub
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


class NuSlerp(MergeMethod):
    name = "nuslerp"
    description = "NuSLERP: slerp of two models (or of their task vectors, given a base), t from the weights"
    requires_base = False
    optional_base = True
    min_models = 2
    max_models = 2
    params = (
        Param("weight", required=True, per_model=True, help="this model's share: t = w1 / (w0 + w1)"),
        Param("nuslerp_flatten", default=True, kind=bool, help="interpolate the whole tensor as one vector"),
        Param(
            "nuslerp_row_wise",
            default=False,
            kind=bool,
            help="without flatten: interpolate vectors along the first dimension instead of the last",
        ),
    )

    @classmethod
    def work_copies(cls, _n_models: int) -> int:
        return 6  # two unit vectors and their product, the two weighted terms and the result

    def merge(self, task: TensorTask) -> torch.Tensor:
        a, b = task.models
        w0, w1 = (float(mp["weight"]) for mp in task.model_params)
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        if a.numel() == 0:
            return a
        flatten = bool(task.params["nuslerp_flatten"])
        dim = 0 if task.params["nuslerp_row_wise"] else -1
        if not flatten and a.dim() == 0:
            raise RecipeError(f"nuslerp: tensor {task.name!r} is a scalar; it has no rows (use nuslerp_flatten: true)")
        base = task.base
        if base is None:
            return nuslerp(t, a, b, dim=dim, flatten=flatten)
        return base.add_(nuslerp(t, a.sub_(base), b.sub_(base), dim=dim, flatten=flatten))
