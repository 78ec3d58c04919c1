"""linear: sum_i w_i theta_i / sum_i w_i (model soups, 2203.05482); normalize: false drops the division."""

from __future__ import annotations

import torch

from ..chunks import each_chunk
from ..errors import RecipeError
from .base import MergeMethod, Param, TensorTask


class Linear(MergeMethod):
    name = "linear"
    reference_url = "https://arxiv.org/abs/2203.05482"
    description = "weighted average of the models (no base)"
    requires_base = False
    min_models = 2
    params = (
        Param("weight", required=True, per_model=True, help="this model's coefficient"),
        Param("normalize", default=True, kind=bool, help="divide by the sum of the weights"),
    )

    def merge(self, task: TensorTask) -> torch.Tensor:
        xs = task.models
        ws = [float(mp["weight"]) for mp in task.model_params]
        normalize = bool(task.params["normalize"])
        total = float(torch.tensor(ws, dtype=torch.float32).sum())
        if normalize and total == 0:
            raise RecipeError(
                f"linear: the weights of tensor {task.name!r} sum to 0, so the normalized "
                "average is undefined (give other weights or normalize: false)"
            )
        out = xs[0] if xs[0].is_contiguous() else xs[0].contiguous()
        flats = [out.view(-1)] + [x.reshape(-1) for x in xs[1:]]

        def mix(s: int, e: int) -> None:
            acc = flats[0][s:e].mul_(ws[0])
            for f, w in zip(flats[1:], ws[1:]):
                acc.add_(f[s:e], alpha=w)  # one rounding per term, like mergekit's addcmul_
            if normalize:
                acc.div_(total)

        each_chunk(flats[0], mix)
        return out
