"""RegMean: each linear merged in closed form from the experts' Gram matrices.

For a linear with weights W_i ([out, in], y = x W^T) and Gram matrices G_i = X_i^T X_i / N_i of its
inputs in expert i (on task i's texts):
    G~_i = a G_i + (1 - a) diag(G_i)             (off-diagonals scaled by a in [0, 1])
    W*   = (sum_i W_i G~_i) (sum_i G~_i)^-1      i.e. in [in, out] layout (sum G~)^-1 sum G~_i W_i^T
solved with torch.linalg.solve (no explicit inverse). `ridge` > 0 adds ridge * mean(diag(sum G~)) * I
to the system for a singular sum (e.g. a channel no expert ever used). a = 0 gives a per-input-channel
weighted average; one expert gives back its W for any a. Every other tensor is the plain mean.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..core.checkpoint import COPIED_FILES, TOKENIZER_FILES, Checkpoint, CheckpointWriter, OutTensor, parse_size
from .activations import ActivationStats
from .errors import GuidanceError


def scale_off_diagonal(gram: torch.Tensor, a: float) -> torch.Tensor:
    """a * G + (1 - a) * diag(G)."""
    return a * gram + (1 - a) * torch.diag(torch.diagonal(gram))


def regmean_tensor(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    a: float = 1.0,
    ridge: float = 0.0,
    device: str | torch.device = "cpu",
    name: str = "tensor",
) -> torch.Tensor:
    """W* for one linear (float32)."""
    if not 0 <= a <= 1:
        raise GuidanceError(f"RegMean a must be in [0, 1], got {a}")
    if not weights or len(weights) != len(grams):
        raise GuidanceError(f"tensor {name!r}: {len(weights)} weights but {len(grams)} Gram matrices")
    d_in = weights[0].shape[1]
    g_sum = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
    rhs = torch.zeros(d_in, weights[0].shape[0], dtype=torch.float32, device=device)
    for k, (w, g) in enumerate(zip(weights, grams)):
        if w.ndim != 2 or w.shape != weights[0].shape or tuple(g.shape) != (d_in, d_in):
            raise GuidanceError(
                f"tensor {name!r}: input {k} has weight {list(w.shape)} and Gram {list(g.shape)}; "
                f"expected weight {list(weights[0].shape)} and Gram [{d_in}, {d_in}]"
            )
        gt = scale_off_diagonal(g.to(device, torch.float32), a)
        g_sum += gt
        rhs += gt @ w.to(device, torch.float32).T
    if ridge > 0:
        g_sum += ridge * torch.diagonal(g_sum).mean() * torch.eye(d_in, dtype=torch.float32, device=device)
    try:
        return torch.linalg.solve(g_sum, rhs).T.contiguous()
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        raise GuidanceError(
            f"tensor {name!r}: the summed Gram matrix is singular ({e}); use more calibration tokens or ridge > 0"
        ) from None


def regmean_checkpoint(
    experts: Sequence[str | os.PathLike | Checkpoint],
    stats: Sequence[ActivationStats],
    out_dir: str | os.PathLike,
    a: float = 1.0,
    ridge: float = 0.0,
    device: str | torch.device = "cpu",
    shard_size: str | int = "2GB",
):
    """Merge `experts` (stats[i]: expert i's statistics with Gram matrices) into `out_dir`.
    Dtypes, config and tokenizer files follow the first expert."""
    cks = [e if isinstance(e, Checkpoint) else Checkpoint(e) for e in experts]
    if len(cks) != len(stats) or not cks:
        raise GuidanceError(f"RegMean needs one statistics set per expert: {len(cks)} experts, {len(stats)} sets")
    ref = cks[0]
    for ck in cks[1:]:
        if set(ck.tensors) != set(ref.tensors):
            diff = sorted(set(ck.tensors) ^ set(ref.tensors))[0]
            raise GuidanceError(f"models {ref.name!r} and {ck.name!r} differ in tensor {diff!r}")
    linears = set(stats[0].names)
    for st in stats:
        if set(st.names) != linears:
            diff = sorted(set(st.names) ^ linears)[0]
            raise GuidanceError(f"activation statistics {st.source} and {stats[0].source} differ in tensor {diff!r}")
        for n in st.names:
            st.require(n, "gram")
            ref.info(n)
    plan = [OutTensor(n, i.shape, i.dtype) for n, i in ref.tensors.items()]
    with CheckpointWriter(out_dir, plan, parse_size(shard_size), metadata={"guidance": "regmean", "a": str(a)}) as w:
        for t in plan:
            ws = [ck.get(t.name, device=device, dtype=torch.float32) for ck in cks]
            if t.name in linears:
                out = regmean_tensor(ws, [st.gram_mean(t.name, device) for st in stats], a, ridge, device, t.name)
            else:
                out = torch.stack(ws).mean(0)
            w.write(t.name, out.to(t.dtype))
        w.copy_files(ref.folder, COPIED_FILES + TOKENIZER_FILES)
        return w.commit()
