"""AIM: relax a merged task vector per input channel by the base model's activation magnitude.

For a linear weight W (shape [out, in]) with merged task vector Delta = W_merged - W_base:
    I~_j    = mean|x_j| / max_k mean|x_k|      (base model's statistics; all-zero activations: I~ = 0)
    Delta'  = Delta * (1 - I~ (1 - omega))     broadcast over the rows (per input channel j)
so the most active input channel keeps omega of its change and a silent one keeps all of it.
Tensors without statistics (embeddings, norms, lm_head) keep the merged value.
"""

from __future__ import annotations

import os

import torch

from ..core.checkpoint import COPIED_FILES, TOKENIZER_FILES, Checkpoint, CheckpointWriter, OutTensor, parse_size
from .activations import ActivationStats
from .errors import GuidanceError


def _check_omega(omega: float) -> None:
    if not 0 <= omega <= 1:
        raise GuidanceError(f"AIM omega must be in [0, 1], got {omega}")


def aim_factor(mean_abs: torch.Tensor, omega: float = 0.4) -> torch.Tensor:
    """1 - I~ (1 - omega), one factor per input channel."""
    _check_omega(omega)
    m = mean_abs.float()
    top = m.max()
    rel = m / top if top > 0 else torch.zeros_like(m)
    return 1 - rel * (1 - omega)


def aim_relax(
    delta: torch.Tensor,
    mean_abs: torch.Tensor,
    omega: float = 0.4,
    device: str | torch.device = "cpu",
    name: str = "tensor",
) -> torch.Tensor:
    """Delta * (1 - I~ (1 - omega)) per input channel (delta is [out, in])."""
    if delta.ndim != 2 or delta.shape[1] != mean_abs.shape[0]:
        raise GuidanceError(
            f"tensor {name!r}: shape {list(delta.shape)} does not match {mean_abs.shape[0]} "
            "input channels of its activation statistics"
        )
    return delta.to(device, torch.float32) * aim_factor(mean_abs.to(device), omega).unsqueeze(0)


def aim_checkpoint(
    base: str | os.PathLike | Checkpoint,
    merged: str | os.PathLike | Checkpoint,
    stats: ActivationStats,
    out_dir: str | os.PathLike,
    omega: float = 0.4,
    device: str | torch.device = "cpu",
    shard_size: str | int = "2GB",
):
    """Write base + AIM(merged - base) for every linear in `stats` (the base's statistics), the merged
    tensor for everything else; dtypes, config and tokenizer files follow the merged checkpoint."""
    _check_omega(omega)
    base = base if isinstance(base, Checkpoint) else Checkpoint(base)
    merged = merged if isinstance(merged, Checkpoint) else Checkpoint(merged)
    for n in stats.names:
        base.info(n)
        merged.info(n)
    plan = [OutTensor(n, i.shape, i.dtype) for n, i in merged.tensors.items()]
    meta = {"guidance": "aim", "omega": str(omega)}
    with CheckpointWriter(out_dir, plan, parse_size(shard_size), metadata=meta) as w:
        for t in plan:
            m = merged.get(t.name, device=device)
            if t.name in stats.count:
                b = base.get(t.name, device=device, dtype=torch.float32)
                if b.shape != m.shape:
                    raise GuidanceError(
                        f"tensor {t.name!r}: base {base.name!r} has shape {list(b.shape)}, "
                        f"merged {merged.name!r} has {list(m.shape)}"
                    )
                m = (b + aim_relax(m.float() - b, stats.mean_abs(t.name, device), omega, device, t.name)).to(t.dtype)
            w.write(t.name, m)
        w.copy_files(merged.folder, COPIED_FILES + TOKENIZER_FILES)
        return w.commit()
