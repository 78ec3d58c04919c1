"""iso_cts: Isotropic merging in common and task-specific subspaces, Iso-CTS (Marczak et al.,
ICML 2025, arXiv 2502.04959).

Data-free. For each 2-D weight matrix (r = min(n, m)) with T task matrices D_i = theta_i - theta_0:

1. sizes: the common subspace keeps k = int(r * common_space_fraction) directions, then k is moved
   so the rest divides evenly among the tasks: k = r - round((r - k) / T) * T (plus T if that is
   negative, which only a rank below T can cause), and each task gets s = (r - k) / T directions
   of its own;
2. common subspace: the top k singular triplets of D_TA = sum_i D_i, (U_c, S_c, V_c);
3. task-specific subspaces: each task matrix with the common subspace projected out,
   D_i' = D_i - U_c U_c^T D_i, and the top s singular triplets of D_i' (U_i, S_i, V_i);
4. stack U* = [U_1 ... U_T U_c], S* = [S_1 ... S_T S_c], V* likewise, and replace U* and V* with
   their nearest orthogonal matrices (orthogonal Procrustes: with U* = P Z Q^T, P Q^T);
5. isotropic scaling: every singular value becomes the mean of S*, s_bar;
6. D = s_bar U*_perp V*_perp^T and theta = theta_0 + lambda * D.

Choices, as in the authors' code (github.com/danielm1405/iso-merging): Python's round (halves to
even) in step 1; every 2-D tensor is a matrix, embeddings included; any other tensor (norms,
biases) gets the mean task vector, theta_0 + lambda * (1/T) sum_i D_i. common_space_fraction
defaults to 0.8 (the paper's setting). The paper picks lambda (its alpha) on held-out validation
data; data-free, it defaults to 1.0 here. No per-model weights: the method has none.
"""

from __future__ import annotations

import torch

from ._spectral import is_matrix, mean_fallback, orthogonalize, task_vectors
from .base import MergeMethod, Param, TensorTask, in_range


def subspace_sizes(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(k common directions, s directions per task) for rank r, as in step 1."""
    k = int(r * fraction)
    k = r - round((r - k) / n_tasks) * n_tasks
    if k < 0:  # rounding up overshot the rank (tiny r): one direction less per task
        k += n_tasks
    return k, (r - k) // n_tasks


class IsoCTS(MergeMethod):
    name = "iso_cts"
    reference_url = "https://arxiv.org/abs/2502.04959"
    description = (
        "Iso-CTS: common subspace of the sum plus each task's own directions, orthogonalized, "
        "singular values flattened (2502.04959)"
    )
    requires_base = True
    min_models = 1
    params = (
        Param("lambda", default=1.0, help="scale of the merged task vector (the paper's alpha)"),
        Param(
            "common_space_fraction",
            default=0.8,
            check=in_range(0, 1),
            help="share of the rank given to the common subspace (the rest is split among the tasks)",
        ),
    )

    @classmethod
    def work_copies(cls, _n_models: int) -> int:
        return 10  # the sum, its SVD, one task's SVD, the stacked U and V, their orthogonalized bases and the product

    def merge(self, task: TensorTask) -> torch.Tensor:
        base = task.base
        lam = float(task.params["lambda"])
        deltas = task_vectors(base, task.models)
        n_tasks = len(deltas)
        if not is_matrix(base):
            return mean_fallback(base, deltas, lam)
        n, m = base.shape
        r = min(n, m)
        k, s = subspace_sizes(r, n_tasks, float(task.params["common_space_fraction"]))
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        u, sv, vh = torch.linalg.svd(total, full_matrices=False)
        del total
        u_c, s_c, vh_c = u[:, :k], sv[:k], vh[:k]
        dev = base.device
        u_all = torch.zeros((n, r), dtype=torch.float32, device=dev)
        s_all = torch.zeros(r, dtype=torch.float32, device=dev)
        v_all = torch.zeros((r, m), dtype=torch.float32, device=dev)  # rows: V^T
        for i, d in enumerate(deltas):
            if s == 0:
                break
            d.sub_(u_c @ (u_c.T @ d))  # project out the common subspace
            ui, si, vhi = torch.linalg.svd(d, full_matrices=False)
            u_all[:, i * s : (i + 1) * s] = ui[:, :s]
            s_all[i * s : (i + 1) * s] = si[:s]
            v_all[i * s : (i + 1) * s] = vhi[:s]
        off = n_tasks * s
        u_all[:, off : off + k] = u_c
        s_all[off : off + k] = s_c
        v_all[off : off + k] = vh_c
        merged = (orthogonalize(u_all) * s_all.mean()) @ orthogonalize(v_all)
        return base.add_(merged, alpha=lam)
