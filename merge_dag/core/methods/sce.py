"""sce: Select (high-variance entries), Calculate (per-model weights), Erase (minority signs).

SCE from FuseChat (Wan et al., arXiv 2408.07990), as mergekit 0.1.5 defines it. With the base
theta_0 and T task vectors D_i = theta_i - theta_0 (stacked along a new first axis):

1. Select (select_topk < 1): the per-entry variance across the models, var = mean_i (D_i - mean D)^2;
   keep the k = int(select_topk * count_nonzero(var)) entries of largest variance in every D_i and
   zero the rest (select_topk <= 0 zeros them all; select_topk = 1 keeps everything);
2. Calculate: w_i = mean(D_i^2) over the tensor's entries, divided by sum_i w_i (every w_i = 1/T
   when that sum is below 1e-6, as mergekit does: tiny task vectors get equal weights);
3. Erase: the TIES sign election, s = +1 where sum_i D_i >= 0 else -1, a_i = [sign(D_i) = s]
   (zeros never agree);
4. theta = theta_0 + sum_i w_i a_i D_i / max(sum_i w_i a_i, 1e-6).

The models take no weights. Entries tied in variance at the top-k threshold are chosen by
torch.topk, as in mergekit (random task vectors have no such ties).
"""

from __future__ import annotations

import torch

from .base import MergeMethod, Param, TensorTask, in_range


class Sce(MergeMethod):
    name = "sce"
    reference_url = "https://arxiv.org/abs/2408.07990"
    description = "SCE: keep the highest-variance entries, weight models by mean squared delta, TIES sign erase"
    requires_base = True
    min_models = 1
    params = (
        Param(
            "select_topk",
            default=1.0,
            check=in_range(0, 1),
            help="fraction of the entries (by variance across the models) to keep",
        ),
        Param("int8_mask", default=False, kind=bool, help="accepted for mergekit compatibility; no effect"),
    )

    @classmethod
    def work_copies(cls, n_models: int) -> int:
        # the stacked task vectors, the weights times the agreement and their product (T each);
        # variance, mask, elected sign
        return 3 * n_models + 3

    def merge(self, task: TensorTask) -> torch.Tensor:
        base, xs = task.base, task.models
        if not xs or base.numel() == 0:
            return base
        for x in xs:
            x.sub_(base)
        tvs = torch.stack(xs, dim=0)
        del xs[:]
        topk = float(task.params["select_topk"])
        if topk < 1:
            if topk <= 0:
                tvs.zero_()
            else:
                var = torch.var(tvs, dim=0, unbiased=False)
                k = int(torch.count_nonzero(var) * topk)
                mask = torch.zeros_like(var)
                if k > 0:
                    mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
                del var
                tvs.mul_(mask.unsqueeze(0))
                del mask
        majority = (tvs.sum(dim=0) >= 0).float().mul_(2).sub_(1)
        agree = tvs.sign() == majority
        del majority
        weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
        total = torch.sum(weights).item()
        weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
        erased = weights.view(-1, *([1] * base.dim())) * agree
        del agree
        merged = (tvs * erased).sum(dim=0)
        merged /= torch.sum(erased, dim=0).clamp(min=1e-6)
        return base.add_(merged)
