"""iso_c: Isotropic merging in the common subspace, Iso-C (Marczak et al., ICML 2025, arXiv 2502.04959).

Data-free. For each 2-D weight matrix with T task matrices D_i = theta_i - theta_0:

1. D_TA = sum_i D_i (the task-arithmetic sum) and its thin SVD, D_TA = U S V^T with r = min(n, m)
   singular values s_1 >= ... >= s_r;
2. flatten the spectrum: every singular value becomes their mean, s_bar = (1/r) sum_j s_j, so the
   merge is isotropic in the subspace the tasks span together (no direction dominated by the
   tasks with the largest updates);
3. D = s_bar U V^T and theta = theta_0 + lambda * D.

Choices, as in the authors' code (github.com/danielm1405/iso-merging): every 2-D tensor is a
matrix, embeddings included; any other tensor (norms, biases) gets the mean task vector,
theta_0 + lambda * (1/T) sum_i D_i. The paper picks lambda (its alpha) on held-out validation
data; data-free, it defaults to 1.0 here. No per-model weights: the method has none.
"""

from __future__ import annotations

import torch

from ._spectral import is_matrix, mean_fallback, task_vectors
from .base import MergeMethod, Param, TensorTask


def isotropic(d: torch.Tensor) -> torch.Tensor:
    """mean(S) U V^T for d = U S V^T (thin SVD)."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u * s.mean()) @ vh


class IsoC(MergeMethod):
    name = "iso_c"
    reference_url = "https://arxiv.org/abs/2502.04959"
    description = "Iso-C: the task-arithmetic sum with its singular values flattened to their mean (2502.04959)"
    requires_base = True
    min_models = 1
    params = (Param("lambda", default=1.0, help="scale of the merged task vector (the paper's alpha)"),)

    @classmethod
    def work_copies(cls, _n_models: int) -> int:
        return 4  # the SVD's factors, the scaled U and the product

    def merge(self, task: TensorTask) -> torch.Tensor:
        base = task.base
        lam = float(task.params["lambda"])
        deltas = task_vectors(base, task.models)
        if not is_matrix(base):
            return mean_fallback(base, deltas, lam)
        acc = deltas[0]
        for d in deltas[1:]:
            acc.add_(d)
        return base.add_(isotropic(acc), alpha=lam)
