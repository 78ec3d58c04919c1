"""A statistic's folder on disk: one safetensors file of tensors and one JSON file of meta, written
atomically (a temporary folder beside the target, renamed into place) and checked when read, for
every per-model statistic (merge_dag.guidance.activations, merge_dag.guidance.fisher_info)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.checkpoint import atomic_replace_dir
from .errors import GuidanceError


def save_stats_folder(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], files: tuple[str, str], meta: dict):
    """Write `tensors` (CPU, contiguous) to files[0] and `meta` to files[1] in `folder`, atomically."""
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / files[0]), metadata={"format": "pt"})
        (tmp / files[1]).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return atomic_replace_dir(tmp, folder)


def read_stats_meta(folder: str | os.PathLike, files: tuple[str, str], what: str) -> tuple[Path, Path, dict]:
    """(tensor file, meta file, meta) of a statistic's folder; GuidanceError naming the file when one
    is missing or the meta is not JSON (`what`: e.g. "activation statistics")."""
    folder = Path(folder)
    tpath, mpath = folder / files[0], folder / files[1]
    for p in (tpath, mpath):
        if not p.is_file():
            raise GuidanceError(f"{p}: {what} file is missing")
    try:
        meta = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise GuidanceError(f"{mpath}: invalid JSON ({e})") from e
    return tpath, mpath, meta
