"""passthrough: copy the one input as it is (layer slicing, frankenmerges), optionally scaled."""

from __future__ import annotations

import torch

from .base import MergeMethod, Param, TensorTask


class Passthrough(MergeMethod):
    name = "passthrough"
    description = "copy tensors from one model per slice, optionally times `scale`"
    requires_base = False
    min_models = 1
    max_models = 1
    params = (Param("scale", default=None, per_model=True, help="multiply the tensor by this (mergekit's scale)"),)

    def merge(self, task: TensorTask) -> torch.Tensor:
        (x,) = task.models
        scale = task.model_params[0].get("scale") if task.model_params else None
        if scale is not None:
            x.mul_(float(scale))
        return x
