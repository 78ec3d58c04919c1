"""arcee_fusion: keep the other model's value only where its change from the base is important.

Arcee Fusion (https://arcee.ai; mergekit's `arcee_fusion`), as mergekit 0.1.5 defines it, with v0
the base and v1 the other model (rows are along the last dimension; a vector is one row):

    p = softmax_row(v1) + 1e-8,  q = softmax_row(v0) + 1e-8
    KL_row = sum_row p log(p / q)                      (one value per row)
    importance = |v1 - v0| * KL_row
    tau = Q2 + 1.5 (Q3 - Q1)                           (quartiles of the importance scores)
    v = v0 + (v1 - v0) * [importance >= tau]

The quartile Qj is the order statistic at index floor(q_j (n - 1)) of the n sorted scores
(q = 0.25, 0.5, 0.75, the index computed in float32 as mergekit does). mergekit estimates the
quartiles from 1,000,000 entries drawn at random (unseeded, with replacement) once a tensor has
more than that; here they are always the exact order statistics of the whole tensor (mergekit's
written definition, without the sampling), so the two agree below that size and merge_dag is
deterministic above it.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, TensorTask

QUARTILES = (0.25, 0.5, 0.75)
EPS = 1e-8


def importance(v1: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """|v1 - v0| * KL(softmax(v1) || softmax(v0)) per row (last dimension)."""
    p = torch.softmax(v1, dim=-1).add_(EPS)
    q = torch.softmax(v0, dim=-1).add_(EPS)
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return torch.sub(v1, v0).abs_().mul_(kl)


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """Q2 + 1.5 (Q3 - Q1) of the scores, exact order statistics (see the module docstring)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    idx = (torch.tensor(QUARTILES, dtype=torch.float32) * (n - 1)).long().tolist()
    q1, q2, q3 = (torch.kthvalue(flat, i + 1).values for i in idx)
    return q2 + 1.5 * (q3 - q1)


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    reference_url = "https://arcee.ai"
    description = "Arcee Fusion: the other model's values where |change| x row KL divergence is an outlier"
    requires_base = True
    min_models = 1
    max_models = 1
    params = ()

    @classmethod
    def work_copies(cls, _n_models: int) -> int:
        return 5  # both softmaxes, the log ratio, its product and the scores

    def merge(self, task: TensorTask) -> torch.Tensor:
        v0, (v1,) = task.base, task.models
        if v0.numel() == 0:
            return v0
        scores = importance(v1, v0)
        mask = (scores >= threshold(scores)).float()
        del scores
        return v0.add_(v1.sub_(v0).mul_(mask))
