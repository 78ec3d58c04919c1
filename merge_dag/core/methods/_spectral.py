"""Shared steps of the spectral (SVD-based) data-free merges: tsv_merge, iso_c, iso_cts.

These methods work per 2-D weight matrix on the task matrices D_i = theta_i - theta_0; any other
tensor (a vector: norms and biases; a 3-D or larger tensor; an empty one) falls back to the mean
task vector, as the papers' code does for non-matrix parameters. The SVDs run in float32 on the
tensors' device (the configured one).
"""

from __future__ import annotations

import torch


def task_vectors(task_base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    """D_i = theta_i - theta_0, in place in the models' buffers."""
    return [x.sub_(task_base) for x in models]


def is_matrix(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.numel() > 0


def mean_fallback(base: torch.Tensor, deltas: list[torch.Tensor], lam: float) -> torch.Tensor:
    """theta_0 + lambda * (1/T) sum_i D_i, in place in base (deltas are overwritten)."""
    acc = deltas[0]
    for d in deltas[1:]:
        acc.add_(d)
    return base.add_(acc.div_(len(deltas)), alpha=lam)


def orthogonalize(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to `a` in Frobenius norm (orthogonal Procrustes / polar
    factor): with a = P S Q^T (thin SVD), P Q^T."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh
