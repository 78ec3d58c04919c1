"""slerp: spherical interpolation from the base (t = 0) to the other model (t = 1).

The angle is the one between the two flattened tensors, each normalized by its L2 norm (a norm
<= 1e-8 is left as is). When |cos| > 0.9995 the tensors are nearly parallel (or antiparallel)
and the result is the plain lerp (1 - t) v0 + t v1, as in mergekit. Otherwise
v = sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1.
"""

from __future__ import annotations

import math

import torch

from ..chunks import chunked_sum, each_chunk
from .base import MergeMethod, Param, TensorTask, in_range

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum a*b: float32 products summed per chunk (torch's cascade sum), chunk sums added in
    order in double; no full-size temporary."""
    a, b = a.reshape(-1), b.reshape(-1)
    return chunked_sum(a, lambda s, e, out: torch.mul(a[s:e], b[s:e], out=out))


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(c0, c1) with slerp(t, v0, v1) = c0 v0 + c1 v1."""
    n0 = math.sqrt(max(_dot(v0, v0), 0.0))
    n1 = math.sqrt(max(_dot(v1, v1), 0.0))
    dot = _dot(v0, v1) / ((n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


class Slerp(MergeMethod):
    name = "slerp"
    reference_url = "https://en.wikipedia.org/wiki/Slerp"
    uses_task_vectors = True  # the project builds task_vectors/<expert> for it
    description = "spherical linear interpolation between the base (t=0) and one other model (t=1)"
    requires_base = True
    min_models = 1
    max_models = 1
    params = (
        Param("t", required=True, check=in_range(0, 1), help="interpolation factor: 0 = base, 1 = the other model"),
    )

    def merge(self, task: TensorTask) -> torch.Tensor:
        v0, (v1,) = task.base, task.models
        t = float(task.params["t"])
        if v0.numel() == 0:
            return v0
        c0, c1 = slerp_coefficients(t, v0, v1)
        if not (v0.is_contiguous() and v1.is_contiguous()):
            return v0.mul_(c0).add_(v1.mul_(c1))
        a, b = v0.view(-1), v1.view(-1)
        each_chunk(a, lambda s, e: a[s:e].mul_(c0).add_(b[s:e].mul_(c1)))  # two products, then the sum
        return v0
