"""LEWIS: layer-wise densities from activation-based importance (docs/methods.md, "LEWIS").

For one model (its own weights W and its own activation statistics on the calibration set):
    I(l, m) = || |W| * sqrt(s) ||_F,   s_j = sum_tokens x_j^2 / N   (sqrt(s) broadcast over W's input columns)
For each expert, against the base:
    d(l, m)  = |I_expert(l, m) - I_base(l, m)|
    d(l, m) <- d(l, m) / sum_l' d(l', m)      per module type m (q_proj, ..., down_proj); a type whose
                                               shifts are all 0 stays 0
    density  = gamma + (d - min d) / (max d - min d) * (epsilon - gamma)   min/max over all (l, m) of
               that expert; if all d are equal, (gamma + epsilon) / 2
so the modules whose importance moved most keep most of their task vector. Tensors outside the
linears (embeddings, norms, lm_head) get density 1.

Robust variants (recipe options; the default is the faithful method above):
    scaling "minmax"   the faithful pooled min-max rescale above
    scaling "rank"     density = gamma + r / (n - 1) * (epsilon - gamma), r the 0-based rank of d among the
                       n scored tensors of that expert (ties share their mean rank; n = 1 -> (gamma + epsilon) / 2),
                       so the densities are spread evenly over [gamma, epsilon] whatever the outliers
    scaling "quantile" lo, hi = the q and 1 - q quantiles of d (linear interpolation, q = `quantile`, 0.05);
                       density = gamma + clamp((d - lo) / (hi - lo), 0, 1) * (epsilon - gamma), so the tails
                       saturate at gamma / epsilon and one outlier cannot squeeze the rest (hi = lo: d above
                       -> epsilon, below -> gamma, equal -> (gamma + epsilon) / 2)
    clip_quantile c    before I is computed, each linear's s is clipped per model at its own c-quantile over
                       the input channels: s_j <- min(s_j, Q_c(s)), so a massive-activation channel weighs
                       no more than the c-quantile channel in I (and in its shift)

Scaling s by a constant (the official code divides by sequences, we by tokens) scales every I of a
model alike and cancels in the per-type normalisation when base and expert use the same set.

Option `sequential_wanda_stats` (the official code's behaviour, default off in recipes): statistics
are collected layer by layer, and each layer's linears are pruned to `sparsity` (0.5) by the Wanda
score |W| * sqrt(s) (per output row, the lowest-scoring half of the inputs) before the next layer's
statistics are collected. I is still computed from the unpruned W, as the official code does.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

from ..core.checkpoint import Checkpoint
from ..core.params import LAYER_RE
from .activations import ActivationStats, collect_activation_stats, merge_stats
from .calibration import Batch
from .errors import GuidanceError
from .model import decoder_layers, linear_modules


def module_type(tensor_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'self_attn.q_proj'."""
    m = LAYER_RE.search(tensor_name)
    if not m:
        raise GuidanceError(f"tensor {tensor_name!r} is not inside a decoder layer")
    rest = tensor_name[m.end() :]
    return rest.removesuffix(".weight")


def wanda_score(weight: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(s), s broadcast over the input columns (W is [out, in])."""
    return weight.abs() * mean_sq.sqrt().unsqueeze(0)


def clip_channels(mean_sq: torch.Tensor, q: float) -> torch.Tensor:
    """s_j <- min(s_j, Q_q(s)): the q-quantile over the input channels (linear interpolation)."""
    if not 0 < q <= 1:
        raise GuidanceError(f"LEWIS clip_quantile must be in (0, 1], got {q}")
    c = torch.quantile(mean_sq.double(), q).to(mean_sq.dtype)
    return mean_sq.clamp(max=c)


def importance(
    stats: ActivationStats,
    checkpoint: str | os.PathLike | Checkpoint,
    device: str | torch.device = "cpu",
    clip_quantile: Optional[float] = None,
) -> dict[str, float]:
    """{weight name: I(l, m)} for every linear in `stats`, reading W one tensor at a time (with
    `clip_quantile`, each linear's s clipped at its own quantile first)."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    out = {}
    for name in stats.names:
        w = ck.get(name, device=device, dtype=torch.float32)
        s = stats.mean_sq(name, device)
        if clip_quantile is not None:
            s = clip_channels(s, clip_quantile)
        if w.ndim != 2 or w.shape[1] != s.shape[0]:
            raise GuidanceError(
                f"model {ck.name!r}: tensor {name!r} has shape {list(w.shape)}, but the activation "
                f"statistics {stats.source} have {s.shape[0]} input channels"
            )
        out[name] = float(torch.linalg.vector_norm(wanda_score(w, s)))
    return out


def shifts(base: dict[str, float], expert: dict[str, float], expert_name: str = "expert") -> dict[str, float]:
    """d(l, m) = |I_expert - I_base|, divided by its sum over layers within each module type."""
    missing = sorted(set(base) ^ set(expert))
    if missing:
        raise GuidanceError(
            f"importance of {expert_name!r} and of the base cover different tensors, e.g. {missing[0]!r}"
        )
    d = {n: abs(expert[n] - base[n]) for n in base}
    totals: dict[str, float] = {}
    for n, v in d.items():
        totals[module_type(n)] = totals.get(module_type(n), 0.0) + v
    return {n: (v / totals[module_type(n)] if totals[module_type(n)] > 0 else 0.0) for n, v in d.items()}


SCALINGS = ("minmax", "rank", "quantile")


def _ranks(values: list[float]) -> list[float]:
    """0-based ranks, ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def rescale(
    d: dict[str, float], gamma: float, epsilon: float, scaling: str = "minmax", quantile: float = 0.05
) -> dict[str, float]:
    """Rescale the shifts into [gamma, epsilon] by `scaling` (module docstring); all equal -> (gamma + epsilon) / 2."""
    if scaling not in SCALINGS:
        raise GuidanceError(f"LEWIS scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    if not d:
        return {}
    names, vals = list(d), list(d.values())
    mid = (gamma + epsilon) / 2
    if scaling == "rank":
        if len(vals) == 1:
            return {names[0]: mid}
        return {n: gamma + r / (len(vals) - 1) * (epsilon - gamma) for n, r in zip(names, _ranks(vals))}
    if scaling == "quantile":
        if not 0 <= quantile < 0.5:
            raise GuidanceError(f"LEWIS quantile must be in [0, 0.5), got {quantile}")
        t = torch.tensor(vals, dtype=torch.float64)
        lo, hi = float(torch.quantile(t, quantile)), float(torch.quantile(t, 1 - quantile))
    else:
        lo, hi = min(vals), max(vals)
    out = {}
    for n, v in d.items():
        if hi == lo:
            u = 0.5 if v == lo else (1.0 if v > hi else 0.0)
        else:
            u = min(1.0, max(0.0, (v - lo) / (hi - lo)))
        out[n] = gamma + u * (epsilon - gamma)
    return out


def allocate(
    base: dict[str, float],
    experts: dict[str, dict[str, float]],
    gamma: float = 0.3,
    epsilon: float = 0.8,
    tensor_names: Optional[Iterable[str]] = None,
    scaling: str = "minmax",
    quantile: float = 0.05,
) -> dict[str, dict[str, float]]:
    """{expert: {tensor name: density}} from importances. With `tensor_names` (every tensor of the
    checkpoint), the tensors that are not scored linears are included with density 1."""
    if not (0 < gamma <= epsilon <= 1):
        raise GuidanceError(f"LEWIS needs 0 < gamma <= epsilon <= 1, got gamma={gamma}, epsilon={epsilon}")
    out = {}
    for name, imp in experts.items():
        dens = rescale(shifts(base, imp, name), gamma, epsilon, scaling, quantile)
        if tensor_names is not None:
            dens = {n: dens.get(n, 1.0) for n in tensor_names}
        out[name] = dens
    return out


def match_mean(
    densities: dict[str, float], sizes: dict[str, int], target: float, floor: float = 0.01
) -> dict[str, float]:
    """Shift a density map by one constant c, clipped to [floor, 1], so that its mean weighted by
    each tensor's element count is `target` (bisection on c; the map keeps its shape and order).
    Used to compare a LEWIS-guided merge with a uniform one at the same mean density."""
    if not 0 < target <= 1:
        raise GuidanceError(f"mean density must be in (0, 1], got {target}")
    missing = [n for n in densities if n not in sizes]
    if missing:
        raise GuidanceError(f"no element count for tensor {missing[0]!r}")
    total = sum(sizes[n] for n in densities)
    if not densities or total == 0:
        return dict(densities)

    def mean(c: float) -> float:
        return sum(min(1.0, max(floor, d + c)) * sizes[n] for n, d in densities.items()) / total

    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    c = (lo + hi) / 2
    return {n: min(1.0, max(floor, d + c)) for n, d in densities.items()}


def weighted_mean(densities: dict[str, float], sizes: dict[str, int]) -> float:
    total = sum(sizes[n] for n in densities)
    return sum(d * sizes[n] for n, d in densities.items()) / total if total else 0.0


def wanda_prune_(weight: torch.Tensor, mean_sq: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero, in each output row, the int(d_in * sparsity) inputs with the lowest Wanda score (in place)."""
    k = int(weight.shape[1] * sparsity)
    if k <= 0:
        return weight
    score = wanda_score(weight.float(), mean_sq.to(weight.device))
    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
    weight.scatter_(1, idx, 0)
    return weight


def sequential_wanda_stats(
    model, batches: list[Batch], sparsity: float = 0.5, device: str | torch.device = "cpu"
) -> ActivationStats:
    """Statistics of each layer after every earlier layer was Wanda-pruned to `sparsity`.

    Prunes `model` in place (load a fresh copy for anything else). Costs about L/2 forward passes of
    the calibration set for L layers (each pass stops after the layer being measured)."""
    if not 0 <= sparsity < 1:
        raise GuidanceError(f"Wanda sparsity must be in [0, 1), got {sparsity}")
    _, layers = decoder_layers(model)
    mods = linear_modules(model)
    parts = []
    for i in range(len(layers)):
        st = collect_activation_stats(model, batches, device=device, layers=[i])
        with torch.no_grad():
            for name in st.names:
                wanda_prune_(mods[name][1].weight.data, st.mean_sq(name, device), sparsity)
        parts.append(st)
    out = merge_stats(parts)
    out.meta.update({"layers": "all", "sequential_wanda_sparsity": sparsity})
    return out
