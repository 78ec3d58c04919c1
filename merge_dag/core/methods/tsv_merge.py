"""tsv_merge: Task Singular Vectors merge, TSV-M (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Data-free. For each 2-D weight matrix (n x m, r = min(n, m)) with T task matrices D_i = theta_i - theta_0:

1. thin SVD of each, D_i = U_i S_i V_i^T, and keep its top k = floor(r / T) singular triplets
   (the paper's low-rank compression: every task gets an equal 1/T share of the rank);
2. stack them: U = [U_1[:, :k] ... U_T[:, :k]] (n x Tk), S = diag(S_1[:k], ..., S_T[:k]),
   V = [V_1[:, :k] ... V_T[:, :k]] (m x Tk);
3. decorrelate the tasks (reduce interference) by replacing U and V with their nearest orthogonal
   matrices (orthogonal Procrustes: with U = P Z Q^T, U_perp = P Q^T; likewise V_perp);
4. D = U_perp S V_perp^T and theta = theta_0 + lambda * D.

Choices, as in the authors' code (github.com/AntoAndGar/task_singular_vectors): the stacked bases
are zero-padded to r columns before orthogonalizing (the padding meets only zero singular
values); every 2-D tensor is treated as a matrix, embeddings included; any other tensor
(norms, biases) gets the mean task vector, theta_0 + lambda * (1/T) sum_i D_i; and a matrix with
r < T (no rank left to share) does too. lambda (the paper's alpha) defaults to 1.0, the paper's
choice for TSV-M. No per-model weights: the method has none.
"""

from __future__ import annotations

import torch

from ._spectral import is_matrix, mean_fallback, orthogonalize, task_vectors
from .base import MergeMethod, Param, TensorTask


class TSVMerge(MergeMethod):
    name = "tsv_merge"
    reference_url = "https://arxiv.org/abs/2412.00081"
    description = "TSV-M: top-1/T singular vectors per task matrix, orthogonalized (data-free, 2412.00081)"
    requires_base = True
    min_models = 1
    params = (Param("lambda", default=1.0, help="scale of the merged task vector (the paper's alpha)"),)

    @classmethod
    def work_copies(cls, _n_models: int) -> int:
        return 7  # the stacked U and V, one SVD's factors, the two orthogonalized bases and their product

    def merge(self, task: TensorTask) -> torch.Tensor:
        base = task.base
        lam = float(task.params["lambda"])
        deltas = task_vectors(base, task.models)
        n_tasks = len(deltas)
        if not is_matrix(base) or min(base.shape) < n_tasks:
            return mean_fallback(base, deltas, lam)
        n, m = base.shape
        r = min(n, m)
        k = r // n_tasks
        u_all = torch.zeros((n, r), dtype=torch.float32, device=base.device)
        s_all = torch.zeros(r, dtype=torch.float32, device=base.device)
        v_all = torch.zeros((r, m), dtype=torch.float32, device=base.device)  # rows: V^T
        for i, d in enumerate(deltas):
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            u_all[:, i * k : (i + 1) * k] = u[:, :k]
            s_all[i * k : (i + 1) * k] = s[:k]
            v_all[i * k : (i + 1) * k] = vh[:k]
            del u, s, vh
        merged = (orthogonalize(u_all) * s_all) @ orthogonalize(v_all)
        return base.add_(merged, alpha=lam)
