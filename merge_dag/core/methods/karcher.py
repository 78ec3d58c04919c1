"""karcher: the Karcher (Riemannian) mean of the models' directions on the unit sphere, rescaled.

As mergekit 0.1.5 defines it (reference: https://en.wikipedia.org/wiki/Karcher_mean and
arXiv 2603.04972). Each input tensor x_i (N of them, equal weights a_i = 1/N) is one flattened vector:

    n_i = |x_i|,  u_i = x_i / n_i                        (u_i = 0 when n_i = 0)
    valid inputs: n_i > tol (none: the result is 0); their weights renormalized, b_i = a_i / sum a
    mu = sum b_i u_i / |sum b_i u_i|   (the first valid u_i if that norm is < tol)
    repeat max_iter times:
        g = sum_i b_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu),  cos(theta_i) = clamp(mu . u_i, -1, 1)
            (terms with theta_i < tol are skipped)
        stop if |g| < tol
        mu = cos(|g|) mu + sin(|g|) g / |g|, renormalized to |mu| = 1 (when its norm is > tol)
    v = (sum_i a_i n_i) mu

The base model is not an input (as with linear): list it under `models` to include it, which is
what mergekit does when a recipe names a base_model for karcher.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, Param, TensorTask, non_negative


def _whole(x: object) -> str | None:
    v = float(x)  # type: ignore[arg-type]
    return None if v == int(v) and v >= 0 else f"must be a whole number >= 0, got {x}"


class Karcher(MergeMethod):
    name = "karcher"
    reference_url = "https://en.wikipedia.org/wiki/Karcher_mean"
    description = "Karcher mean: the models' directions averaged on the unit sphere, times their mean norm"
    requires_base = False
    min_models = 1
    params = (
        Param("max_iter", default=10, kind=int, check=_whole, help="iterations of the Riemannian mean at most"),
        Param("tol", default=1e-5, check=non_negative, help="convergence and zero-norm tolerance"),
    )

    @classmethod
    def work_copies(cls, _n_models: int) -> int:
        return 5  # the mean, the tangent, two terms of a tangent update and the new mean

    def merge(self, task: TensorTask) -> torch.Tensor:
        xs = task.models
        if len(xs) == 1:
            return xs[0]
        max_iter = int(float(task.params["max_iter"]))
        tol = float(task.params["tol"])
        alphas = [1.0 / len(xs)] * len(xs)
        norms, units = [], []
        for x in xs:
            n = torch.linalg.vector_norm(x)
            norms.append(n)
            units.append(torch.zeros_like(x) if n.item() == 0.0 else x.div_(n))
        valid = [i for i, n in enumerate(norms) if n.item() > tol]
        if not valid:
            return torch.zeros_like(xs[0])
        total = sum(alphas[i] for i in valid)
        betas = [alphas[i] / total for i in valid]
        us = [units[i] for i in valid]
        mean = torch.zeros_like(us[0])
        for b, u in zip(betas, us):
            mean += b * u
        mean_norm = torch.linalg.vector_norm(mean)
        mean = us[0].clone() if mean_norm.item() < tol else mean / mean_norm
        for _ in range(max_iter):
            tangent = torch.zeros_like(mean)
            for b, u in zip(betas, us):
                dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                tangent += b * (theta / torch.sin(theta)) * (u - dot * mean)
            tnorm = torch.linalg.vector_norm(tangent)
            if tnorm.item() < tol:
                break
            mean = torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)
            unit_norm = torch.linalg.vector_norm(mean)
            if unit_norm.item() > tol:
                mean = mean / unit_norm
        scale = sum(a * n for a, n in zip(alphas, norms))
        return scale * mean
