"""Hugging Face checkpoint folders: lazy, one-tensor-at-a-time reading and streaming, atomic writing.

Reading parses each safetensors header (8-byte little-endian length, then JSON) and checks that
every tensor's byte range lies inside the file, so a truncated or corrupt file is refused before a
merge starts. Tensor data is read with plain positioned reads into a fresh buffer, not through
mmap: pages of a mapped file count towards the process's resident memory, and a merge that touches
every byte of four 1 GB inputs would otherwise hold 4 GB resident.

Writing knows every output tensor's name, shape and dtype before the first byte is computed (the
merge plan), so each shard's header is written first and tensors are appended as they are
produced: nothing is buffered beyond the tensor in hand. All files go to a temporary folder beside
the target, which is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .errors import CheckpointError, OutputError

INDEX_NAME = "model.safetensors.index.json"
MARKER = "merge_dag.json"  # every merge output holds it: how an earlier output is recognised
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COPIED_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

# safetensors dtype strings <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16', 'bf16', 'float32', 'fp16', 'F32' ... -> torch dtype."""
    aliases = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float64": torch.float64,
        "fp64": torch.float64,
    }
    key = name.strip()
    if key.lower() in aliases:
        return aliases[key.lower()]
    if key.upper() in DTYPES:
        return DTYPES[key.upper()]
    raise ValueError(f"unknown dtype {name!r} (expected one of bfloat16, float16, float32)")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header. Raises CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})"
                )
            header_bytes = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r}: corrupt header entry {h!r}") from exc
        info = TensorInfo(name, path, dtype, shape, base + b, base + e)
        expected = info.numel * torch.tensor([], dtype=dtype).element_size()
        if e < b or e - b != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r}: byte range {b}..{e} does not match shape {list(shape)} {h['dtype']}"
            )
        if base + e > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to {base + e}, file has {size}"
            )
        out[name] = info
    return out, meta


class Checkpoint:
    """A Hugging Face model folder (or a single .safetensors file), read lazily.

    Only headers are read on open; `get` reads one tensor.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None, allow_adapter: bool = False):
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.exists():
            raise CheckpointError(f"model {self.name!r}: path does not exist: {self.path}")
        if (
            not allow_adapter
            and self.path.is_dir()
            and ((self.path / "adapter_config.json").exists() or (self.path / "adapter_model.safetensors").exists())
        ):
            raise CheckpointError(
                f"model {self.name!r}: {self.path} is a PEFT LoRA adapter folder, not a full "
                "checkpoint; name it with its base (`base+adapter`, or `lora:` in a models entry)"
            )
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise CheckpointError(
                    self._pickle_message([self.path])
                    if self.path.suffix in PICKLE_SUFFIXES
                    else f"model {self.name!r}: {self.path} is not a safetensors file"
                )
            files = [self.path]
            self.folder = self.path.parent
        else:
            self.folder = self.path
            files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            infos, _ = read_safetensors_header(f)
            for k, v in infos.items():
                if k in self.tensors:
                    raise CheckpointError(
                        f"model {self.name!r}: tensor {k!r} appears in two files: "
                        f"{self.tensors[k].file.name} and {f.name}"
                    )
                self.tensors[k] = v
        if not self.tensors:
            raise CheckpointError(f"model {self.name!r}: no tensors in {self.path}")

    def _pickle_message(self, pickled: list[Path]) -> str:
        names = ", ".join(p.name for p in pickled[:3])
        return (
            f"model {self.name!r}: {self.path} holds only pickled weights ({names}); merge_dag never "
            "unpickles files it did not write. Convert it once, in an environment you trust: "
            '`python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{self.path}').save_pretrained('{self.path}-safetensors', "
            'safe_serialization=True)"`'
        )

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e})") from e
            files = []
            for fn in dict.fromkeys(weight_map.values()):
                p = self.folder / fn
                if not p.exists():
                    raise CheckpointError(f"model {self.name!r}: {index.name} names {fn}, which does not exist")
                files.append(p)
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        pickled = sorted(p for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(self._pickle_message(pickled))
        raise CheckpointError(f"model {self.name!r}: no safetensors weights in {self.folder}")

    # ---- metadata ----
    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def reads_stored_bytes(self, name: str) -> bool:
        """Whether get(name) returns the bytes stored in the file of info(name) (so the file's cached
        digests describe it). True here; a LoRA expert computes its adapted tensors."""
        return True

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"model {self.name!r}: no tensor {name!r}") from None

    def config(self) -> dict:
        p = self.folder / "config.json"
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}: invalid JSON ({e})") from e

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # ---- data ----
    def get(
        self,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read one tensor (a fresh, owned buffer, or the first bytes of `out`: a CPU uint8 tensor
        of at least its size, reused by the caller), optionally cast, on `device`."""
        info = self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out[: info.nbytes]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:
            raise CheckpointError(
                f"model {self.name!r}: tensor {name!r}: short read from {info.file} ({got} of {info.nbytes} bytes)"
            )
        t = buf.view(info.dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)
        if torch.device(device).type != "cpu":
            t = t.to(device, non_blocking=False)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self.tensors)} tensors)"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def copyable_files(src_folder: str | os.PathLike, names: Iterable[str]) -> list[tuple[str, Path]]:
    """(name, resolved file) for each of `names` present in `src_folder` that may be copied into an
    output, which users publish. A file is copied only if it resolves to a regular file inside the
    model folder; a symbolic link that leads anywhere else (a secret linked as tokenizer_config.json)
    is refused with CheckpointError naming it. The one exception is the Hugging Face hub cache
    layout, where `.../snapshots/<revision>/<file>` links into the same repository's `.../blobs/`.
    Names that are absent, or are folders, are skipped."""
    folder = Path(src_folder)
    real_folder = folder.resolve()
    allowed = [real_folder]
    if real_folder.parent.name == "snapshots":
        allowed.append(real_folder.parent.parent / "blobs")
    out = []
    for n in names:
        p = folder / n
        if not os.path.lexists(p):
            continue
        real = p.resolve()
        if not any(_inside(real, a) for a in allowed):
            raise CheckpointError(
                f"{p}: is a symbolic link to {real}, outside the model folder {folder}; "
                "merge_dag copies only files inside the model folder into an output "
                "(replace the link by a copy of the file)"
            )
        if real.is_dir():
            continue
        if not real.is_file():
            raise CheckpointError(
                f"{p}: not a regular file (a dangling link, a device or a pipe); "
                "merge_dag copies only regular files into an output"
            )
        out.append((n, real))
    return out


def is_merge_dag_output(folder: str | os.PathLike) -> bool:
    """True if `folder` holds the merge_dag.json of an earlier merge (written by the engine)."""
    marker = Path(folder) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        card = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(card, dict) and "merge_dag_version" in card and "inputs" in card


_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def written_by_merge(name: str) -> bool:
    """Whether a merge writes a file of this name into its output folder."""
    return (
        name in (MARKER, "README.md", INDEX_NAME, "model.safetensors")
        or name in COPIED_FILES
        or name in TOKENIZER_FILES
        or bool(_SHARD_RE.match(name))
    )


def check_output_target(
    out_dir: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], overwrite: bool = False
) -> Path:
    """Refuse an output folder a merge may not replace; returns it (absolute). Raises OutputError.

    Always refused: the working directory or a folder above it; a folder that is, contains or lies
    inside an input (`inputs`: (name, path) of every model, task vector and tokenizer source read);
    anything that is not a folder (a file, a symbolic link); a non-empty folder that is not an earlier
    merge_dag output (no merge_dag.json). An earlier merge_dag output holding only files a merge
    writes is replaced; one holding other files too (notes, eval results) only with `overwrite`,
    which replaces the folder, those files included. `overwrite` never permits anything else.
    """
    out = Path(os.path.expanduser(out_dir)).absolute()
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, real):
        what = "the current directory" if real == cwd else "a folder above the current directory"
        raise OutputError(
            f"{out}: is {what}; a merge replaces its output folder, so name a new folder (e.g. {out / 'merged'})"
        )
    for name, p in inputs:
        rp = Path(p).resolve()
        if real == rp:
            rel = "is"
        elif _inside(real, rp):
            rel = "lies inside"
        elif _inside(rp, real):
            rel = "contains"
        else:
            continue
        raise OutputError(
            f"{out}: the output folder {rel} the input {name!r} ({rp}); a merge replaces its "
            "output folder, so write it somewhere else"
        )
    if not os.path.lexists(out):
        return out
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; name a real folder (merge_dag replaces its output folder)")
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; name a new folder")
    try:
        entries = sorted(e.name for e in out.iterdir())
    except OSError as e:
        raise OutputError(f"{out}: cannot list the existing folder ({e.strerror or e})") from None
    if not entries:
        return out
    if not is_merge_dag_output(out):
        raise OutputError(
            f"{out}: is not empty and is not an earlier merge_dag output (no {MARKER}); merge_dag "
            f"never replaces a folder it did not write, even with --overwrite: choose a new or "
            f"empty folder"
        )
    extra = [e for e in entries if not written_by_merge(e)]
    if extra and not overwrite:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise OutputError(
            f"{out}: this earlier merge_dag output also holds files a merge does not write "
            f"({', '.join(extra[:3])}{more}); pass --overwrite (overwrite=True) to replace the "
            f"whole folder, those files included, or choose a new folder"
        )
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9, '500MB', '1GiB', '4096' -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    unit = next((u for u in units if s.endswith(u)), None)
    num, m = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"invalid size {text!r} (examples: 2GB, 500MB, 1GiB)") from None
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return int(value * m)


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.tensor([], dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy split, in order, so no shard exceeds max_shard_bytes unless one tensor does alone."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_file_names(n: int) -> list[str]:
    """The file names of an n-shard checkpoint, as Hugging Face writes them."""
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(shard: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    off = 0
    for t in shard:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


class CheckpointWriter:
    """Streams tensors, in a known order, into sharded safetensors in a temporary folder.

    Use as a context manager: on an exception the temporary folder is removed and the target is
    untouched; `commit()` renames the finished folder into place.

    A merge split into parts (merge_dag.core.parts) uses two more ways in: `only_shards` makes a
    writer for some of the shards, whose finished files `commit_shards()` moves into a staging
    folder; `adopt_shards()` takes every shard file from that folder instead of writing tensors.
    The shard layout and file names are the same in all three cases (they come from the full list).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tensors: list[OutTensor],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        overwrite: bool = True,
        only_shards: Iterable[int] | None = None,
    ):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} exists")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.shard_names = shard_file_names(len(self.shards))
        keep = set(range(len(self.shards)) if only_shards is None else only_shards)
        self.order = [(si, t) for si, shard in enumerate(self.shards) if si in keep for t in shard]
        self._pos = 0
        self._file = None
        self._cur = -1
        self.bytes_written = 0

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _open_shard(self, si: int) -> None:
        if self._file is not None:
            self._file.close()
        self._cur = si
        self._file = open(self.tmp / self.shard_names[si], "wb")
        self._file.write(_header_bytes(self.shards[si], self.metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan. Names, shapes and dtypes must follow the plan."""
        if self._pos >= len(self.order):
            raise RuntimeError(f"tensor {name!r} is not in the write plan (all planned tensors written)")
        si, expected = self.order[self._pos]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"write order broken: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {expected.name} {expected.shape} {expected.dtype}"
            )
        if si != self._cur:
            self._open_shard(si)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            self._file.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self.bytes_written += expected.nbytes
        self._pos += 1

    def write_json(self, name: str, obj: dict) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def copy_files(self, src_folder: Path, names: Iterable[str]) -> list[str]:
        """Copy those of `names` that `src_folder` holds (see `copyable_files`: a link leading out
        of the model folder is refused with CheckpointError)."""
        copied = []
        for n, p in copyable_files(src_folder, names):
            shutil.copyfile(p, self.tmp / n)
            copied.append(n)
        return copied

    def shard_file_size(self, si: int) -> int:
        """Bytes of shard file `si` once written: its header plus its tensors."""
        return len(_header_bytes(self.shards[si], self.metadata)) + sum(t.nbytes for t in self.shards[si])

    def _finish_tensors(self) -> None:
        if self._pos != len(self.order):
            missing = self.order[self._pos][1].name
            raise RuntimeError(f"merge incomplete: tensor {missing!r} and later ones were never written")
        if self._file is not None:
            self._file.close()
            self._file = None

    def commit_shards(self, dest: str | os.PathLike) -> list[str]:
        """Move this writer's finished shard files (only_shards) into `dest`, each by an atomic rename
        after an fsync, and remove the temporary folder. Returns the file names moved."""
        self._finish_tensors()
        dest = Path(dest)
        moved = []
        for si in dict.fromkeys(si for si, _ in self.order):
            name = self.shard_names[si]
            with open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp / name, dest / name)
            moved.append(name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return moved

    def adopt_shards(self, folder: str | os.PathLike) -> None:
        """Take every planned shard file, finished, from `folder` (hard link, or copy across file
        systems) instead of writing tensors; checks each file's size against the plan."""
        if self._pos:
            raise RuntimeError("adopt_shards: tensors were already written to this writer")
        folder = Path(folder)
        for si in dict.fromkeys(si for si, _ in self.order):
            name = self.shard_names[si]
            src = folder / name
            want = self.shard_file_size(si)
            if not src.is_file():
                raise CheckpointError(f"{src}: shard file is missing")
            if src.stat().st_size != want:
                raise CheckpointError(f"{src}: shard file has {src.stat().st_size} bytes, the plan needs {want}")
            try:
                os.link(src, self.tmp / name)
            except OSError:
                shutil.copy2(src, self.tmp / name)
        self.bytes_written = sum(t.nbytes for _, t in self.order)
        self._pos = len(self.order)

    def commit(self) -> Path:
        self._finish_tensors()
        weight_map = {t.name: self.shard_names[si] for si, t in self.order}
        index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
        self.write_json(INDEX_NAME, index)
        for p in self.tmp.iterdir():  # durability before the rename
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        return atomic_replace_dir(self.tmp, self.out_dir)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.tmp, ignore_errors=True)


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<state>tmp|new|old)-(?P<pid>\d+)-(?P<tok>[0-9a-f]+)$")


def _exists(p: Path) -> bool:
    return os.path.lexists(p)


def atomic_replace_dir(tmp: Path, target: Path) -> Path:
    """Rename the finished folder `tmp` into place as `target` (steps 2-5 below); an existing
    target is swapped out, then removed. If a rename fails (an error, not a crash) the earlier
    target is put back and the new folder, this call's own, is removed.

    The atomic replace, as a state machine. A write into target X by process P goes through folders
    beside X that all carry the same tag T = "<pid>-<random>":

      1. write      .X.tmp-T   being written; incomplete until renamed (never read by anyone)
      2. finish     .X.tmp-T -> .X.new-T    (after fsync: complete, not yet in place)
      3. swap out   X -> .X.old-T           (only when X exists: the previous, complete output)
      4. swap in    .X.new-T -> X
      5. drop       remove .X.old-T         (the commit is done; the old output is superseded)

    A process killed between any two steps leaves a state that `clean_stale_temporaries` (run by the
    next write into X, and only for tags whose process is gone) resolves without losing a complete
    output:

      left behind              meaning                          recovery
      .tmp-T alone             killed while writing (1)         remove .tmp-T (provably incomplete)
      .new-T, X                killed between 2 and 3           roll forward: steps 3, 4, 5
      .new-T, no X, no .old-T  first write, killed before 4     rename .new-T -> X
      .new-T, .old-T, no X     killed between 3 and 4           rename .new-T -> X, then step 5
      .old-T, X, no .new-T     killed between 4 and 5           step 5 (X is the new output)
      .old-T, no X, no .new-T  X lost otherwise                 rename .old-T -> X (restore)
      .new-T, .old-T, X        X re-created by hand             nothing (warns): every folder kept

    Earlier merge_dag versions, before the .new- step, swapped a finished folder in straight from
    .tmp-T, so a .tmp-T that has an .old-T beside it was complete: it is
    treated as .new-T. Only .tmp- folders, which no step ever reads, are ever removed unrecovered.
    """
    tmp, target = Path(tmp), Path(target)
    m = _TEMP_RE.match(tmp.name)
    tag = f"{m['pid']}-{m['tok']}" if m and m["name"] == target.name else f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new = target.parent / f".{target.name}.new-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    os.rename(tmp, new)  # 2
    swapped = False
    try:
        if _exists(target):
            os.rename(target, old)  # 3
            swapped = True
        os.rename(new, target)  # 4
    except BaseException:
        if swapped and _exists(old) and not _exists(target):
            os.rename(old, target)
        shutil.rmtree(new, ignore_errors=True)
        raise
    if swapped:
        shutil.rmtree(old, ignore_errors=True)  # 5
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Resolve what writes into `out_dir` that were killed left beside it (the table in
    `atomic_replace_dir`'s docstring):
    complete outputs are put (back) in place, never deleted; incomplete `.tmp-` folders are removed.

    Only folders whose writer's process is gone are touched, so a merge still running into the same
    target is left alone. Returns the folders removed.
    """
    import warnings

    out_dir = Path(out_dir).absolute()
    parent = out_dir.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    groups: dict[str, dict[str, Path]] = {}
    for p in parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if not m or m["name"] != out_dir.name or p.is_symlink() or not p.is_dir():
            continue
        if _pid_alive(int(m["pid"])):
            continue
        groups.setdefault(f"{m['pid']}-{m['tok']}", {})[m["state"]] = p

    def mtime(g: dict[str, Path]) -> float:
        return max(q.stat().st_mtime for q in g.values())

    for tag, g in sorted(groups.items(), key=lambda kv: mtime(kv[1])):  # the newest interrupted write last
        tmp, new, old = g.get("tmp"), g.get("new"), g.get("old")
        if tmp is not None and old is not None and new is None:
            new, tmp = tmp, None  # legacy naming: a .tmp- beside its .old- was complete
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        if new is not None:
            if old is not None and _exists(out_dir):
                warnings.warn(
                    f"{out_dir}: an interrupted write left {new.name} and {old.name}, and "
                    f"{out_dir.name} exists again; all three are kept, resolve them by hand",
                    stacklevel=2,
                )
                continue
            if old is None and _exists(out_dir):
                old = parent / f".{out_dir.name}.old-{tag}"
                os.rename(out_dir, old)
            os.rename(new, out_dir)
        if old is not None:
            if _exists(out_dir):
                shutil.rmtree(old, ignore_errors=True)  # superseded by the finished write now at out_dir
                removed.append(old)
            else:
                os.rename(old, out_dir)  # restore the earlier complete output
    return removed
