"""Content fingerprints of checkpoints and files.

A checkpoint's fingerprint is a hash tree over its tensors, not its files:

    tensor digest  = sha256(raw little-endian bytes of the tensor)
    fingerprint    = sha256("merge_dag/ckpt/v1" + for each tensor name in sorted order:
                            name, dtype, shape, tensor digest  + sha256(config.json bytes))

so re-sharding the same weights, or re-ordering tensors in a file, keeps the fingerprint, while any
change to any weight or to config.json changes it. Tokenizer files are not part of it.

It is fast where it can be: the tensor digests of each safetensors file are cached, keyed by the
file's absolute path, size, mtime and inode, so observing an unchanged multi-GB checkpoint costs a
stat() per shard; a merge computes the digests of the tensors it reads anyway (on a second thread)
and stores them, so its inputs' fingerprints come for free. A cold fingerprint reads every byte once
(sha256 runs at about 1-2 GB/s per core).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from .checkpoint import DTYPE_NAMES, Checkpoint, TensorInfo
from .lora import ADAPTER_CONFIG, LoraCheckpoint

PREFIX = "sha256:"
_CHUNK = 16 * 1024 * 1024


def cache_dir() -> Path:
    d = os.environ.get("MERGE_DAG_CACHE")
    p = Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merge_dag"
    return p / "fingerprints"


def file_identity(path: Path) -> str:
    """path | size | mtime | inode: what tells an unchanged file from a rewritten one."""
    st = path.stat()
    return f"{path.absolute()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _file_key(path: Path) -> tuple[Path, str]:
    ident = file_identity(path)
    h = hashlib.sha256(ident.encode()).hexdigest()[:40]
    return cache_dir() / f"{h}.json", ident


def load_cached_digests(path: Path) -> Optional[dict[str, str]]:
    try:
        f, ident = _file_key(path)
        data = json.loads(f.read_text())
        if data.get("ident") == ident:
            return data["digests"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def store_cached_digests(path: Path, digests: dict[str, str]) -> None:
    try:
        f, ident = _file_key(path)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump({"ident": ident, "digests": digests}, out)
        os.replace(tmp, f)
    except OSError:
        pass  # a cache that cannot be written only costs time


def digest_tensor_file_range(info: TensorInfo) -> str:
    h = hashlib.sha256()
    with open(info.file, "rb") as f:
        f.seek(info.start)
        left = info.nbytes
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise OSError(f"{info.file}: unexpected end of file in tensor {info.name!r}")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def tensor_digests(ckpt: Checkpoint, known: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Digest of every tensor, from the cache, from `known` (computed by a merge), or by reading."""
    known = dict(known or {})
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in ckpt.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    out: dict[str, str] = {}
    for file, infos in by_file.items():
        cached = load_cached_digests(file) or {}
        file_digests = {}
        for info in sorted(infos, key=lambda i: i.start):
            d = cached.get(info.name) or known.get(info.name) or digest_tensor_file_range(info)
            file_digests[info.name] = d
        if file_digests != cached:
            store_cached_digests(file, file_digests)
        out.update(file_digests)
    return out


def checkpoint_fingerprint(ckpt: Checkpoint | str | os.PathLike, known: Optional[dict[str, str]] = None) -> str:
    """A checkpoint's fingerprint; a LoRA-adapted model's (merge_dag.core.lora.LoraCheckpoint) is
    lora_fingerprint: base fingerprint + adapter config + adapter tensors (`known` is not used)."""
    if isinstance(ckpt, LoraCheckpoint):
        return lora_fingerprint(ckpt)
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint(ckpt)
    digests = tensor_digests(ckpt, known)
    h = hashlib.sha256(b"merge_dag/ckpt/v1\n")
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        h.update(f"{name}\t{DTYPE_NAMES[info.dtype]}\t{list(info.shape)}\t{digests[name]}\n".encode())
    cfg = ckpt.folder / "config.json"
    h.update(b"config\t" + (hashlib.sha256(cfg.read_bytes()).hexdigest().encode() if cfg.exists() else b"-"))
    return PREFIX + h.hexdigest()


def adapter_fingerprint(ck: LoraCheckpoint) -> str:
    """The adapter alone: sha256 over adapter_config.json's bytes and the adapter's tensors (name,
    dtype, shape, bytes; digests cached per file like a checkpoint's). Its README is not part of it."""
    h = hashlib.sha256(b"merge_dag/adapter/v1\n")
    h.update(b"adapter_config\t" + hashlib.sha256((ck.adapter_dir / ADAPTER_CONFIG).read_bytes()).hexdigest().encode())
    digests = tensor_digests(ck.weights)
    for n in sorted(ck.weights.tensors):
        info = ck.weights.tensors[n]
        h.update(f"\n{n}\t{DTYPE_NAMES[info.dtype]}\t{list(info.shape)}\t{digests[n]}".encode())
    return PREFIX + h.hexdigest()


def lora_fingerprint(ck: LoraCheckpoint) -> str:
    """The adapted model: sha256 over the base's fingerprint and the adapter's, so any change to the
    base, the adapter's config or its weights changes it."""
    h = hashlib.sha256(b"merge_dag/lora/v1\n")
    h.update(b"base\t" + checkpoint_fingerprint(ck.base).encode() + b"\n")
    h.update(b"adapter\t" + adapter_fingerprint(ck).encode())
    return PREFIX + h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            h.update(_sha_file(f).encode())
    else:
        h.update(_sha_file(p).encode())
    return PREFIX + h.hexdigest()


def _sha_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def short(fp: str, n: int = 12) -> str:
    return fp.removeprefix(PREFIX)[:n]
