"""nearswap: take the other model's value where it is near the base's, keep the base's where it is far.

NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), as mergekit 0.1.5 defines
it. Per entry, with v0 the base, v1 the other model and the threshold t > 0:

    w = clamp(t / max(|v0 - v1|, 1e-6), 0, 1)
    v = w v1 + (1 - w) v0

so entries closer than t are swapped for the other model's, and the further apart the two are,
the more of the base is kept (w = t / |v0 - v1|). t must be > 0 (mergekit 0.1.5 accepts any t;
t <= 0 would give the base back unchanged).
"""

from __future__ import annotations

import torch

from .base import MergeMethod, Param, TensorTask, positive


class NearSwap(MergeMethod):
    name = "nearswap"
    reference_url = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    description = "NearSwap: the other model's value where it lies within t of the base's, interpolated beyond"
    requires_base = True
    min_models = 1
    max_models = 1
    params = (
        Param("t", required=True, check=positive, help="sameness threshold (> 0): entries closer than t are swapped"),
    )

    def merge(self, task: TensorTask) -> torch.Tensor:
        v0, (v1,) = task.base, task.models
        t = float(task.params["t"])
        w = torch.sub(v0, v1).abs_().clamp_(min=1e-6)
        w.reciprocal_().mul_(t).clamp_(0.0, 1.0)  # t / d, computed as torch computes `t / tensor`
        v1.mul_(w)  # w v1
        v0.mul_(w.neg_().add_(1.0))  # (1 - w) v0
        return v1.add_(v0)
