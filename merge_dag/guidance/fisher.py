"""Fisher merging (Matena & Raffel 2022, arXiv 2111.09832): each parameter averaged with weights w_i F_i,
F_i the diagonal Fisher information of expert i on its own calibration set.

The statistic is fisher_info.py's `fisher_diagonal` (the fishers/<expert>__<set> asset), in its own
file so that editing the merge never invalidates the cached statistics.

The merge (`fisher_checkpoint`, a `linear` recipe with `guidance.fisher`), per element of each tensor,
w_i the linear weight of expert i for that tensor (w_i >= 0; the scale of w cancels):
    no base_model:  F~_i = max(F_i, epsilon)                        (the paper's Fisher floor)
                    theta = sum_i w_i F~_i theta_i / sum_i w_i F~_i
                    an element no expert's Fisher reaches (all F_i <= epsilon) is the w-weighted mean,
                    i.e. the plain linear merge; one expert gives back its theta
    base_model:     theta = (epsilon theta_0 + sum_i w_i F_i theta_i) / (epsilon + sum_i w_i F_i)
                    the base joins as a model with Fisher epsilon everywhere (it gets no Fisher pass), the
                    experts' Fishers are not floored: an element no expert's Fisher reaches stays the
                    base's, elsewhere the base's share is epsilon / (epsilon + sum_i w_i F_i)
Normalisation (recipe option `normalize`, off by default: the formula above is the paper's), applied to each
F_i before the floor, so that one expert whose Fisher is larger everywhere (a less confident model on its
texts) does not take every parameter:
    global   F_i / mean of F_i over all its parameters      (each expert the same total Fisher mass)
    tensor   F_i / mean of F_i over the tensor             (each expert the same mass in every tensor; the
                                                             Fisher only decides which elements of a tensor
                                                             follow which expert; an all-zero F_i stays 0)
After either, epsilon is relative to a mean Fisher of 1.
A checkpoint tensor none of the statistics has (not a parameter of the model, e.g. a saved buffer) has no
Fisher mass: the weighted mean, or the base's. All sums in float32 on the configured device; floating tensors
are written in `out_dtype` (the recipe's `out_dtype`, else `dtype`), else in the first expert's dtypes (the
base's when there is one), whose config and tokenizer files the output copies.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..core import params as pmap
from ..core.checkpoint import (
    COPIED_FILES,
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointWriter,
    OutTensor,
    parse_dtype,
    parse_size,
)
from .errors import GuidanceError
from .fisher_info import ESTIMATORS, SEED, FisherStats, fisher_diagonal

__all__ = ["ESTIMATORS", "SEED", "FisherStats", "fisher_diagonal", "fisher_tensor", "fisher_checkpoint"]

DEFAULT_EPSILON = 1e-6


def fisher_tensor(
    thetas: Sequence[torch.Tensor],
    fishers: Sequence[Optional[torch.Tensor]],
    weights: Sequence[float],
    epsilon: float = DEFAULT_EPSILON,
    base: Optional[torch.Tensor] = None,
    name: str = "tensor",
) -> torch.Tensor:
    """The Fisher-weighted average of one tensor (module docstring), float32 on the inputs' device.
    fishers[i] None: expert i has no Fisher for this tensor (all of them None: no Fisher mass)."""
    if not thetas or not (len(thetas) == len(fishers) == len(weights)):
        raise GuidanceError(f"tensor {name!r}: {len(thetas)} tensors, {len(fishers)} Fishers, {len(weights)} weights")
    if epsilon <= 0:
        raise GuidanceError(f"Fisher epsilon must be > 0, got {epsilon}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise GuidanceError(
            f"tensor {name!r}: Fisher merging needs weights >= 0 with a positive sum, got {list(weights)}"
        )
    shape = thetas[0].shape
    for k, (t, f) in enumerate(zip(thetas, fishers)):
        if t.shape != shape or (f is not None and f.shape != shape):
            raise GuidanceError(
                f"tensor {name!r}: input {k} has shape {list(t.shape)} and Fisher "
                f"{None if f is None else list(f.shape)}; expected {list(shape)}"
            )
    if base is not None and base.shape != shape:
        raise GuidanceError(f"tensor {name!r}: base has shape {list(base.shape)}, the experts {list(shape)}")
    num = torch.zeros(shape, dtype=torch.float32, device=thetas[0].device)
    den = torch.zeros_like(num)
    for t, f, w in zip(thetas, fishers, weights):
        if base is None:
            f = torch.full_like(num, epsilon) if f is None else f.float().clamp_min(epsilon)
        elif f is None:
            continue
        wf = f.float() * w
        num.addcmul_(wf, t.float())
        den.add_(wf)
    if base is not None:
        num.add_(base.float(), alpha=epsilon)
        den.add_(epsilon)
    return num.div_(den)


NORMALIZE = (None, "global", "tensor")


def _normalized(f: torch.Tensor, scale: float, normalize: Optional[str]) -> torch.Tensor:
    if normalize == "global":
        return f / scale
    if normalize == "tensor":
        m = float(f.double().mean())
        return f / m if m > 0 else f
    return f


def _weight_of(value: Any, name: str, num_layers: int, ref: str) -> float:
    w = pmap.evaluate(value, name, pmap.layer_position(name, num_layers))
    if w is None or isinstance(w, bool) or not isinstance(w, (int, float)):
        raise GuidanceError(f"tensor {name!r}: no numeric weight for model {ref!r} (got {w!r})")
    return float(w)


def recipe_out_dtype(recipe) -> Optional[torch.dtype]:
    """The dtype a recipe asks its floating tensors to be written in (`out_dtype`, else `dtype`), or None."""
    name = recipe.out_dtype or recipe.dtype
    return parse_dtype(name) if name else None


def recipe_weights(recipe, refs: Sequence[str]) -> list[Any]:
    """Each expert's `weight` parameter value as the recipe gives it (its models entry, else the top-level
    `parameters`; default 1), in the order of `refs`."""
    out = []
    for ref in refs:
        entry = next((m for m in recipe.models or [] if m.model == ref), None)
        own = entry.parameters if entry is not None else {}
        out.append(own.get("weight", recipe.parameters.get("weight", 1.0)))
    return out


def fisher_checkpoint(
    experts: Sequence[str | os.PathLike | Checkpoint],
    fishers: Sequence[FisherStats],
    out_dir: str | os.PathLike,
    weights: Optional[Sequence[Any]] = None,
    base: Optional[str | os.PathLike | Checkpoint] = None,
    epsilon: float = DEFAULT_EPSILON,
    device: str | torch.device = "cpu",
    shard_size: str | int = "2GB",
    out_dtype: Optional[torch.dtype] = None,
    normalize: Optional[str] = None,
    log: Callable[[str], None] = lambda _m: None,
) -> Path:
    """Merge `experts` (fishers[i]: expert i's diagonal Fisher) into `out_dir`, streaming one tensor of
    each input (and its Fishers) at a time. weights[i]: expert i's `weight` parameter value (a number, a
    gradient over layers or a filter list, as in recipes; default 1 each)."""
    cks = [e if isinstance(e, Checkpoint) else Checkpoint(e) for e in experts]
    base_ck = None if base is None else base if isinstance(base, Checkpoint) else Checkpoint(base)
    if not cks or len(cks) != len(fishers):
        raise GuidanceError(f"Fisher merging needs one Fisher per expert: {len(cks)} experts, {len(fishers)} Fishers")
    weights = [1.0] * len(cks) if weights is None else list(weights)
    if len(weights) != len(cks):
        raise GuidanceError(f"Fisher merging: {len(cks)} experts but {len(weights)} weights")
    if epsilon <= 0:
        raise GuidanceError(f"Fisher epsilon must be > 0, got {epsilon}")
    if normalize not in NORMALIZE:
        raise GuidanceError(f"Fisher normalize must be one of global, tensor (or unset), got {normalize!r}")
    ref = base_ck if base_ck is not None else cks[0]
    for ck in cks + ([base_ck] if base_ck is not None else []):
        if set(ck.tensors) != set(ref.tensors):
            diff = sorted(set(ck.tensors) ^ set(ref.tensors))[0]
            raise GuidanceError(f"models {ref.name!r} and {ck.name!r} differ in tensor {diff!r}")
    for ck, fs in zip(cks, fishers):
        for n in fs.names:
            if n not in ref.tensors:
                raise GuidanceError(
                    f"Fisher statistics {fs.source}: tensor {n!r} is not in model {ref.name!r} "
                    "(statistics of another architecture?)"
                )
            if fs.shape(n) != tuple(ref.info(n).shape):
                raise GuidanceError(
                    f"Fisher statistics {fs.source}: tensor {n!r} has shape {list(fs.shape(n))}, "
                    f"model {ck.name!r} {list(ref.info(n).shape)}"
                )
    num_layers = int(ref.config().get("num_hidden_layers") or 1)
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    plan = [
        OutTensor(n, i.shape, out_dtype if out_dtype is not None and i.dtype in floats else i.dtype)
        for n, i in ref.tensors.items()
    ]
    meta = {"guidance": "fisher", "epsilon": str(epsilon), "normalize": str(normalize)}
    t0 = time.perf_counter()
    scale = [1.0] * len(fishers)
    if normalize == "global":
        scale = [fs.mean() for fs in fishers]
        for fs, c in zip(fishers, scale):
            if not c > 0:
                raise GuidanceError(f"Fisher statistics {fs.source}: the Fisher is zero everywhere; cannot normalize")
    with CheckpointWriter(out_dir, plan, parse_size(shard_size), metadata=meta) as w:
        for t in plan:
            have = [fs.has(t.name) for fs in fishers]
            if any(have) and not all(have):
                missing = fishers[have.index(False)].source
                raise GuidanceError(f"Fisher statistics {missing}: no entry for tensor {t.name!r}, which others have")
            thetas = [ck.get(t.name, device=device, dtype=torch.float32) for ck in cks]
            fs = [
                _normalized(fs.get(t.name, device), c, normalize) if h else None
                for fs, h, c in zip(fishers, have, scale)
            ]
            ws = [_weight_of(v, t.name, num_layers, ck.name) for v, ck in zip(weights, cks)]
            b = base_ck.get(t.name, device=device, dtype=torch.float32) if base_ck is not None else None
            w.write(t.name, fisher_tensor(thetas, fs, ws, epsilon, b, t.name).to(t.dtype))
        w.copy_files(ref.folder, COPIED_FILES + TOKENIZER_FILES)
        out = w.commit()
    log(f"Fisher merge of {len(cks)} experts: {time.perf_counter() - t0:.1f} s")
    return out
