"""A merge split into parts: each part merges a contiguous range of whole output shards, and a final
step assembles the checkpoint. The result is byte for byte what one `execute` with the same shard
size writes (same shard files, index, config, card, fingerprints).

    layout = plan_parts(plan, parts, shard_size)     # which shards (and tensors) each part writes
    for k in range(parts):                           # in any order, on any worker that sees `staging`
        execute_part(plan, staging, k, parts, shard_size)
    finalize_parts(plan, staging, out_dir, parts, card_extra, shard_size=shard_size)

The shards are planned up front exactly as the one-step writer plans them (checkpoint.plan_shards
over the plan's tensors) and split into `parts` contiguous ranges of roughly equal bytes; a shard
is never split across parts. With more parts than shards the last parts are empty: they merge
nothing and only write their manifest.

A part writes its finished shard files into the shared staging folder (each written in a temporary
folder, then renamed into place) and then its manifest, `part-0000k-of-0000N.json`: the plan key,
its shards and tensors, the sha256 of every input tensor it read, and which pairs of inputs it saw
identical. The manifest is written last, so a manifest that exists means the part is complete. A
part whose manifest is already there with the same plan key (and whose shard files are all there,
with the planned sizes) does nothing, so a retried run redoes only the missing parts.

`finalize_parts` checks every manifest against the plan, raises what `execute` raises when two
inputs are the same model, computes the input fingerprints from the parts' digests, and builds the
output through the same CheckpointWriter as `execute` (shard files hard-linked from staging, index,
config, tokenizer, model card, merge_dag.json), renamed into `out_dir` only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from .checkpoint import (
    Checkpoint,
    CheckpointWriter,
    clean_stale_temporaries,
    parse_size,
    plan_shards,
    shard_file_names,
)
from .errors import MergeDagError
from .fingerprint import checkpoint_fingerprint, file_identity
from .merge import (
    MergeResult,
    input_digest_maps,
    input_fingerprints,
    input_pairs,
    merge_device,
    merge_steps,
    out_tensors,
    output_errors,
    raise_if_identical,
    shard_metadata,
    write_metadata,
)
from .plan import MergePlan, check_target
from .version import merge_code_version

MANIFEST_FORMAT = "merge_dag/part/v1"


class PartError(MergeDagError):
    """A part of a split merge is missing, unfinished, or was made for another plan."""


@dataclass(frozen=True)
class PartLayout:
    index: int  # 0-based
    parts: int
    shards: tuple[int, ...]  # indices into the full shard list (contiguous; empty for a spare part)
    shard_names: tuple[str, ...]
    tensors: tuple[str, ...]  # output tensor names, in write order
    bytes: int  # tensor bytes of its shards

    @property
    def label(self) -> str:
        return f"part {self.index + 1} of {self.parts}"


def manifest_name(index: int, parts: int) -> str:
    return f"part-{index + 1:05d}-of-{parts:05d}.json"


def split_sizes(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Split items of the given sizes, in order, into `parts` contiguous [start, end) ranges of
    roughly equal total size. Every range is non-empty when there are at least `parts` items;
    otherwise the first ranges get one item each and the rest are empty."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    n = len(sizes)
    ranges = []
    start = 0
    for k in range(parts):
        left = parts - k
        if k == parts - 1:
            end = n
        elif n - start <= left:
            end = min(start + 1, n)
        else:
            target = sum(sizes[start:]) / left
            end, acc = start + 1, sizes[start]
            while end < n - (left - 1) and acc + sizes[end] / 2 <= target:
                acc += sizes[end]
                end += 1
        ranges.append((start, end))
        start = end
    return ranges


def plan_parts(plan: MergePlan, parts: int, shard_size: str | int = "2GB") -> list[PartLayout]:
    """The shards of the one-step output, split into `parts` contiguous ranges of whole shards."""
    shards = plan_shards(out_tensors(plan), parse_size(shard_size))
    names = shard_file_names(len(shards))
    sizes = [sum(t.nbytes for t in shard) for shard in shards]
    out = []
    for k, (a, b) in enumerate(split_sizes(sizes, parts)):
        idx = tuple(range(a, b))
        out.append(
            PartLayout(
                k,
                parts,
                idx,
                tuple(names[i] for i in idx),
                tuple(t.name for i in idx for t in shards[i]),
                sum(sizes[i] for i in idx),
            )
        )
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {
            "tensor": list(t.shape),
            "dtype": str(t.dtype),
            "sha256": hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
        }
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def _file_idents(ck: Checkpoint) -> list[str]:
    """path | size | mtime | inode of each file the checkpoint's tensors live in."""
    return [file_identity(f) for f in sorted({i.file for i in ck.tensors.values()})]


def plan_key(plan: MergePlan, parts: int, shard_size: str | int = "2GB") -> str:
    """sha256 of everything a part's output depends on: code, recipe, device, every tensor step with
    its parameters, the identity (path, size, mtime, inode) of every file read, the shard size and
    the number of parts. A manifest with another key belongs to another merge."""
    deltas = {s.delta.path.absolute(): s.delta for st in plan.steps for s in st.sources if s.delta is not None}
    payload = {
        "format": MANIFEST_FORMAT,
        "merge_dag": __version__,
        "code": merge_code_version(),
        "recipe": plan.recipe.to_yaml_dict(),
        "method": plan.method.name,
        "device": plan.device,
        "out_dtype": str(plan.out_dtype),
        "inputs": [
            {"name": ck.name, "role": role, "files": _file_idents(ck)} for ck, role in zip(plan.inputs, plan.roles)
        ],
        "task_vectors": {str(p): _file_idents(ck) for p, ck in sorted(deltas.items())},
        "steps": [
            [
                s.name,
                list(s.shape),
                str(s.in_dtype),
                str(s.out_dtype),
                s.params,
                s.t,
                None if s.base is None else [s.base.model, s.base.tensor],
                [
                    [src.model, src.tensor, src.params, None if src.delta is None else str(src.delta.path.absolute())]
                    for src in s.sources
                ],
            ]
            for s in plan.steps
        ],
        "shard_bytes": parse_size(shard_size),
        "parts": parts,
    }
    raw = json.dumps(payload, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


def _layout(plan: MergePlan, part_index: int, parts: int, shard_size: str | int) -> PartLayout:
    if not 0 <= part_index < parts:
        raise ValueError(f"part_index must be in [0, {parts}), got {part_index}")
    return plan_parts(plan, parts, shard_size)[part_index]


def _read_manifest(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise PartError(f"{path}: unreadable part manifest ({e}); delete it and run that part again") from e
    return data if isinstance(data, dict) else None


def _problem(plan: MergePlan, staging: Path, lay: PartLayout, key: str, manifest: Optional[dict]) -> Optional[str]:
    """Why the manifest of `lay` does not stand for a finished part of this plan (None: it does)."""
    path = staging / manifest_name(lay.index, lay.parts)
    if manifest is None:
        return f"{lay.label}: manifest {path} is missing (the part never finished)"
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("plan_key") != key:
        return f"{lay.label}: manifest {path} was written for another plan (recipe, inputs, shard size or parts differ)"
    if manifest.get("shards") != list(lay.shard_names) or manifest.get("tensors") != list(lay.tensors):
        return f"{lay.label}: manifest {path} lists other shards or tensors than the plan"
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list) or [i.get("name") for i in inputs] != [ck.name for ck in plan.inputs]:
        return f"{lay.label}: manifest {path} names other inputs than the plan"
    sizes = manifest.get("shard_bytes")
    if not isinstance(sizes, list) or len(sizes) != len(lay.shard_names):
        return f"{lay.label}: manifest {path} does not give the size of each of its shards"
    for name, size in zip(lay.shard_names, sizes):
        f = staging / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{lay.label}: shard file {f} is missing or has the wrong size"
    return None


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class PartResult:
    index: int
    parts: int
    shards: list[str]
    tensor_count: int
    bytes: int
    seconds: float
    skipped: bool  # True: an earlier run had finished this part
    manifest: Path


def execute_part(
    plan: MergePlan, staging_dir: str | Path, part_index: int, parts: int, shard_size: str | int = "2GB"
) -> PartResult:
    """Merge the tensors of part `part_index` (0-based) of `parts` and write its finished shard files
    and manifest into `staging_dir`. Does nothing if that part is already there for this plan."""
    t0 = time.perf_counter()
    staging = Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    lay = _layout(plan, part_index, parts, shard_size)
    key = plan_key(plan, parts, shard_size)
    mpath = staging / manifest_name(part_index, parts)
    done = _read_manifest(mpath)
    if done is not None and _problem(plan, staging, lay, key, done) is None:
        return PartResult(part_index, parts, list(lay.shard_names), len(lay.tensors), lay.bytes, 0.0, True, mpath)
    device = merge_device(plan)
    digests = input_digest_maps(plan)
    same_pairs = input_pairs(plan)
    sizes: list[int] = []
    out_digests: dict[str, str] = {}  # the part's output tensors, hashed from the bytes written
    if lay.shards:
        mine = set(lay.tensors)
        steps = [s for s in plan.steps if s.name in mine]
        target = staging / f"{mpath.stem}"  # only names the writer's temporary folder in staging
        clean_stale_temporaries(target)
        with CheckpointWriter(
            target, out_tensors(plan), parse_size(shard_size), metadata=shard_metadata(plan), only_shards=lay.shards
        ) as writer:
            merge_steps(plan, steps, device, writer.write, digests, same_pairs, out_digests=out_digests)
            sizes = [writer.shard_file_size(si) for si in lay.shards]
            writer.commit_shards(staging)
    manifest = {
        "format": MANIFEST_FORMAT,
        "plan_key": key,
        "part": part_index + 1,
        "parts": parts,
        "method": plan.method.name,
        "shards": list(lay.shard_names),
        "shard_bytes": sizes,
        "tensors": list(lay.tensors),
        "inputs": [{"name": ck.name, "digests": digests[i]} for i, ck in enumerate(plan.inputs)],
        "identical_pairs": sorted([a, b] for a, b in same_pairs),
        "output_digests": out_digests,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_json_atomic(mpath, manifest)
    return PartResult(
        part_index, parts, list(lay.shard_names), len(lay.tensors), lay.bytes, manifest["seconds"], False, mpath
    )


def finalize_parts(
    plan: MergePlan,
    staging_dir: str | Path,
    out_dir: str | Path,
    parts: int,
    card_extra: Optional[dict] = None,
    shard_size: str | int = "2GB",
    cleanup: bool = True,
    overwrite: bool = False,
) -> MergeResult:
    """Assemble the finished parts in `staging_dir` into the checkpoint `out_dir`, exactly as one
    `execute(plan, out_dir, shard_size, card_extra=card_extra)` writes it. `cleanup`: remove the
    staging folder once the checkpoint is in place."""
    t0 = time.perf_counter()
    staging, out_dir = Path(staging_dir), Path(out_dir)
    key = plan_key(plan, parts, shard_size)
    manifests = []
    for lay in plan_parts(plan, parts, shard_size):
        m = _read_manifest(staging / manifest_name(lay.index, parts))
        problem = _problem(plan, staging, lay, key, m)
        if problem is not None:
            raise PartError(f"cannot finalize the split merge into {out_dir}: {problem}")
        manifests.append(m)
    same_pairs = input_pairs(plan)
    digests = input_digest_maps(plan)
    for m in manifests:
        same_pairs &= {(a, b) for a, b in m["identical_pairs"]}
        for i, inp in enumerate(m["inputs"]):
            digests[i].update(inp["digests"])
    raise_if_identical(plan, same_pairs)
    fps = input_fingerprints(plan, digests)
    with output_errors(out_dir):
        clean_stale_temporaries(out_dir)
    check_target(plan, out_dir, overwrite)
    with (
        output_errors(out_dir),
        CheckpointWriter(out_dir, out_tensors(plan), parse_size(shard_size), metadata=shard_metadata(plan)) as writer,
    ):
        writer.adopt_shards(staging)
        card = write_metadata(plan, writer, fps, card_extra or {})
        elapsed = sum(m["seconds"] for m in manifests) + time.perf_counter() - t0
        writer.commit()
    if cleanup:
        shutil.rmtree(staging, ignore_errors=True)
    out_digests: dict[str, str] = {}
    for m in manifests:  # the parts hashed what they wrote: the output is not read again
        out_digests.update(m.get("output_digests") or {})
    out_fp = checkpoint_fingerprint(Checkpoint(out_dir), out_digests)
    return MergeResult(out_dir, len(plan.steps), plan.out_bytes, elapsed, fps, out_fp, plan.method.name, card)


__all__ = [
    "PartError",
    "PartLayout",
    "PartResult",
    "execute_part",
    "finalize_parts",
    "manifest_name",
    "plan_key",
    "plan_parts",
    "split_sizes",
]
