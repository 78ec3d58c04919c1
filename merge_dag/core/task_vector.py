"""Task vectors: delta_i = expert_i - base, streamed tensor by tensor into a float32 checkpoint.

A bf16/fp16 difference is exact in float32, so base + task vector gives back the expert exactly; the
merge engine reads experts that way when it is handed their task vectors (engine.plan_merge).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointWriter, OutTensor, clean_stale_temporaries, parse_size
from .errors import MergeInputError
from .lora import LoraCheckpoint
from .params import layer_index

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class TaskVectorResult:
    out_dir: Path
    tensor_count: int
    bytes: int
    l2_norm: float  # ||delta||_2 over every tensor
    per_layer_norm: dict[str, float]
    seconds: float
    left_out: list[str] = field(default_factory=list)  # tensors not in both, or of another shape


def compute_task_vector(
    base: str | Path | Checkpoint,
    expert: str | Path | Checkpoint,
    out_dir: str | Path,
    device: str = "cpu",
    shard_size: str | int = "2GB",
    metadata: dict | None = None,
) -> TaskVectorResult:
    t0 = time.perf_counter()
    base = base if isinstance(base, (Checkpoint, LoraCheckpoint)) else Checkpoint(base, name=str(base))
    expert = expert if isinstance(expert, (Checkpoint, LoraCheckpoint)) else Checkpoint(expert, name=str(expert))
    # a LoRA expert over this very base: its delta is the adapter's, computed exactly per tensor
    low_rank = (
        isinstance(expert, LoraCheckpoint)
        and expert.base.path.resolve() == base.path.resolve()
        and not isinstance(base, LoraCheckpoint)
    )
    common, left_out = common_layout(base, expert)
    out_dir = Path(out_dir)
    clean_stale_temporaries(out_dir)
    plan = [OutTensor(n, i.shape, torch.float32 if i.dtype in FLOATS else i.dtype) for n, i in common.items()]
    sq = 0.0
    per_layer: dict[str, float] = {}
    meta = {"kind": "task_vector", **{k: str(v) for k, v in (metadata or {}).items()}}
    with CheckpointWriter(out_dir, plan, parse_size(shard_size), metadata=meta) as w:
        for t in plan:
            d = _tensor_delta(base, expert, t, device, low_rank)
            if t.dtype == torch.float32:
                n2 = float(torch.linalg.vector_norm(d)) ** 2
                sq += n2
                li = layer_index(t.name)
                key = f"layer {li}" if li is not None else t.name
                per_layer[key] = per_layer.get(key, 0.0) + n2
            w.write(t.name, d)
        cfg = base.folder / "config.json"
        w.copy_files(base.folder, ["config.json"] if cfg.exists() else [])
        nbytes = w.bytes_written
        w.commit()
    return TaskVectorResult(
        out_dir,
        len(plan),
        nbytes,
        sq**0.5,
        {k: v**0.5 for k, v in per_layer.items()},
        time.perf_counter() - t0,
        left_out,
    )


def common_layout(base: Checkpoint, expert: Checkpoint) -> tuple[dict, list[str]]:
    """({name: base TensorInfo} of the tensors both hold with the same shape, the names left out).

    A task vector covers those; a tensor one of the two lacks, or holds at another shape (an
    embedding over another vocabulary), is left out, and a merge reads the expert itself there
    (plan_merge decides, under the recipe's `missing_tensors` and the vocabulary map). Nothing in
    common at all is an error naming the two models."""
    common = {n: i for n, i in base.tensors.items() if n in expert.tensors and expert.tensors[n].shape == i.shape}
    left_out = [n for n in base.tensors if n not in common] + [n for n in expert.tensors if n not in base.tensors]
    if not common:
        raise MergeInputError(
            f"model {expert.name!r}: no tensor has the same name and shape as in base {base.name!r}; "
            "it is not a fine-tune of that base"
        )
    return common, left_out


def _require_finite(ck: Checkpoint, name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise MergeInputError(f"model {ck.name!r}: tensor {name!r} contains NaN or Inf values")


def _tensor_delta(base: Checkpoint, expert: Checkpoint, t: OutTensor, device: str, low_rank: bool) -> torch.Tensor:
    """expert - base for one tensor: float32 for float tensors; zeros for an integer/bool tensor the two
    hold identically (the merge copies the base's, right only when the expert holds the same)."""
    b = base.get(t.name, device=device)
    if low_rank and t.dtype == torch.float32:
        _require_finite(base, t.name, b)
        d = expert.delta(t.name, device=device, base=b)
        d = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if d is None else d
        _require_finite(expert, t.name, d)
        return d
    e = expert.get(t.name, device=device)
    if t.dtype == torch.float32:
        _require_finite(base, t.name, b)
        _require_finite(expert, t.name, e)
        return e.to(torch.float32).sub_(b.to(torch.float32))
    if not torch.equal(b, e):  # engine: integer and bool tensors are copied only when identical
        raise MergeInputError(
            f"model {expert.name!r}: tensor {t.name!r} is "
            f"{str(e.dtype).removeprefix('torch.')} and differs from base "
            f"{base.name!r}; integer and bool tensors are never merged"
        )
    return torch.zeros_like(b)
