"""model_stock: move from the base towards the experts' average by the angle between their deltas.

Model Stock (2403.19522), as mergekit computes it: with K experts and deltas d_i = theta_i - theta_0,
c = mean over pairs i < j of cos(d_i, d_j) (cos = d_i.d_j / max(|d_i| |d_j|, 1e-6), clipped to
[-1, 1]), t = K c / (1 + (K - 1) c) and theta = t * mean_i(theta_i) + (1 - t) * theta_0
(computed as theta_0 + t * mean_i(d_i)). filter_wise: one c and t per row (over the last
dimension; a vector is one row) instead of one per tensor. Where |1 + (K - 1) c| < 1e-6 there is
no finite estimate and t = 0 (the base), as in mergekit 0.1.5.
"""

from __future__ import annotations

import torch

from ..chunks import each_chunk, workers
from .base import MergeMethod, Param, TensorTask
from .slerp import _dot


def _rowdots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (rows, L) tensors in float32, chunked, no full-size temporary."""
    rows, length = a.shape
    if rows == 1:
        return torch.tensor([_dot(a, b)], dtype=torch.float32, device=a.device)
    out = torch.empty(rows, dtype=torch.float32, device=a.device)
    each_chunk(a, lambda s, e, buf: torch.sum(torch.mul(a[s:e], b[s:e], out=buf), dim=-1, out=out[s:e]), scratch=1)
    return out


class ModelStock(MergeMethod):
    name = "model_stock"
    reference_url = "https://arxiv.org/abs/2403.19522"
    uses_task_vectors = True  # the project builds task_vectors/<expert> for it
    description = "Model Stock: interpolate base -> experts' average by the angle between task vectors"
    requires_base = True
    min_models = 2
    params = (
        Param(
            "filter_wise",
            default=False,
            kind=bool,
            help="one interpolation factor per row (last dimension) instead of one per tensor",
        ),
    )

    def merge(self, task: TensorTask) -> torch.Tensor:
        base, xs = task.base, task.models
        k = len(xs)
        if base.numel() == 0:
            return base
        shape = base.shape
        out = base if base.is_contiguous() else base.contiguous()
        length = shape[-1] if task.params["filter_wise"] and base.dim() >= 1 else base.numel()
        b = out.view(-1, length)
        with workers(out):
            ds = [(x if x.is_contiguous() else x.contiguous()).sub_(out).view(-1, length) for x in xs]
            norms = [_rowdots(d, d).sqrt_() for d in ds]
            cos = []
            for i in range(k):
                for j in range(i + 1, k):
                    c = _rowdots(ds[i], ds[j]) / (norms[i] * norms[j]).clamp(min=1e-6)
                    cos.append(c.clamp_(-1, 1))
            c = torch.stack(cos).mean(dim=0)
            den = 1 + (k - 1) * c
            singular = den.abs() < 1e-6
            t = torch.where(singular, torch.zeros_like(c), (k * c) / torch.where(singular, torch.ones_like(den), den))
            scale = t / k  # theta_0 + t * (sum_i d_i) / K
            if b.shape[0] == 1:  # one t for the tensor: flat chunks
                views = [out.view(-1)] + [d.view(-1) for d in ds]
                factor = lambda s, e: float(scale[0])  # noqa: E731
            else:  # one t per row: chunks of rows
                views = [b] + ds
                col = scale.unsqueeze(-1)
                factor = lambda s, e: col[s:e]  # noqa: E731

            def add_mean_delta(s: int, e: int) -> None:
                acc = views[1][s:e]
                for d in views[2:]:
                    acc.add_(d[s:e])
                views[0][s:e].add_(acc.mul_(factor(s, e)))

            each_chunk(views[0], add_mean_delta)
        return out if out is base else base.copy_(out)
