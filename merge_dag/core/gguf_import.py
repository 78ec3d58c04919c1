"""``merge-dag import``: a GGUF file (llama.cpp's format) into a Hugging Face safetensors folder.

mergekit and the merge engine read safetensors folders; users keep llama.cpp files. transformers
can dequantize the GGUF block formats (Q4_0, Q4_1, Q8_0, K-quants, ...) of the architectures it
knows; this module drives it and writes a normal folder::

    <out>/config.json              the model config, without the GGUF quantization config
    <out>/model.safetensors        every tensor in float32 (or --dtype), written with safetensors;
                                   a tied lm_head is not stored (config.tie_word_embeddings)
    <out>/generation_config.json
    <out>/tokenizer.json, tokenizer_config.json, chat_template.jinja (whatever the GGUF holds)
    <out>/merge_dag.json           the import card: the GGUF's sha256 (the source), its path,
                                   architecture, library versions, and the model-source artifact id

Dequantization is exact arithmetic on the stored blocks: w = d·q (+ m) per block of 32 (or 256)
weights, so the folder reproduces transformers' own loading of the GGUF bit for bit.

The folder is written into a temporary folder beside ``out`` and renamed into place, so it is
either complete or absent. An existing non-empty ``out`` is replaced only when it is this command's
own earlier output (its ``merge_dag.json`` says ``"kind": "gguf_import"``); an import of the same
GGUF bytes into its own complete earlier output is a no-op.

Lineage: the GGUF is a source (kind ``gguf``, fingerprint ``sha256:<hex of the file>``) and the
folder a ``model`` source (its checkpoint fingerprint); an edge ``gguf --imported_from--> model``
links them. :func:`lineage_ops` builds those records from a folder's card, so the import command
and the Dagster model-source observation record the same thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .errors import MergeDagError

GGUF_MAGIC = b"GGUF"
CARD_FILE = "merge_dag.json"
CARD_KIND = "gguf_import"
IMPORT_FORMAT = 1  # bump when the folder this writes for the same GGUF changes


class GGUFImportError(MergeDagError):
    """A GGUF file cannot be imported: not GGUF, an architecture transformers cannot dequantize,
    or an output folder that is not ours to replace."""


@dataclass
class ImportResult:
    out_dir: str
    sha256: str  # hex digest of the GGUF file
    architecture: str
    tensor_count: int
    parameters: int
    seconds: float
    reused: bool  # the folder was already this GGUF's complete import
    model_fingerprint: str  # checkpoint fingerprint of the folder (the model source's version)

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_magic(path: Path) -> None:
    if not path.exists():
        raise GGUFImportError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFImportError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (starts with {head!r}, expected b'GGUF')")


def read_metadata(path: Path) -> dict:
    """The scalar metadata of a GGUF (``general.architecture``, ``general.name``, ...), via the
    ``gguf`` package. Arrays (the vocabulary) are left out."""
    path = Path(path)
    _check_magic(path)
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises bare ValueError/struct.error/IndexError on garbage
        raise GGUFImportError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or len(field.data) != 1:
            continue
        try:
            value = field.contents()
        except Exception:  # noqa: BLE001 - an exotic type: skip it
            continue
        if isinstance(value, (str, int, float, bool)):
            out[key] = value
    out["tensor_count"] = len(reader.tensors)
    return out


def supported_architectures() -> set[str]:
    """GGUF architecture names (``general.architecture``) this transformers can dequantize."""
    archs: set[str] = set()
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        archs |= set(GGUF_ARCHS)
    except ImportError:
        pass
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        archs |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    return archs


def read_card(folder: Path) -> Optional[dict]:
    """The import card of ``folder`` (None when it has none or it is not an import card)."""
    p = Path(folder) / CARD_FILE
    try:
        card = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and card.get("kind") == CARD_KIND else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "torch", "gguf", "safetensors", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _complete(folder: Path, sha: str, dtype: str) -> bool:
    card = read_card(folder)
    return (
        card is not None
        and card.get("source", {}).get("sha256") == sha
        and card.get("dtype") == dtype
        and card.get("format") == IMPORT_FORMAT
        and (folder / "model.safetensors").is_file()
        and (folder / "config.json").is_file()
    )


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GGUFImportError(f"{out}: exists and is not a folder; refusing to overwrite it")
    if out.is_dir() and any(out.iterdir()) and read_card(out) is None:
        raise GGUFImportError(
            f"{out}: folder exists, is not empty and is not an earlier 'merge-dag import' output; "
            "refusing to overwrite it (choose another folder or empty it)"
        )


def _load(gguf: Path, dtype):
    """transformers' own loading of the GGUF: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GGUFImportError(f"{gguf}: transformers cannot load it as a causal LM: {first}") from None
    return model, tok


def plain_config(model):
    """The model's config as a normal (unquantized) config object: GGUF's quantization config removed."""
    cfg = model.config
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)
    plain = type(cfg).from_dict(d)
    plain.architectures = [type(model).__name__]
    return plain


def state_dict_for_saving(model) -> dict:
    """The tensors to store: contiguous copies, the lm_head left out when it is tied to the embeddings."""
    sd = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for name, t in sd.items():
        if tied and name == "lm_head.weight":
            continue
        out[name] = t.detach().contiguous().clone()
    return out


def import_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32", force: bool = False
) -> ImportResult:
    """Import ``gguf_path`` into the folder ``out_dir``; see the module docstring."""

    from .checkpoint import atomic_replace_dir, clean_stale_temporaries, parse_dtype
    from .fingerprint import checkpoint_fingerprint

    t0 = time.perf_counter()
    gguf = Path(gguf_path).absolute()
    out = Path(out_dir).absolute()
    meta = read_metadata(gguf)
    arch = _architecture(gguf, meta)
    try:
        torch_dtype = parse_dtype(dtype)
    except (ValueError, KeyError) as e:
        raise GGUFImportError(f"--dtype: {e}") from None
    _check_target(out)
    sha = sha256_file(gguf)
    if not force and _complete(out, sha, dtype):
        card = read_card(out)
        return ImportResult(
            out_dir=str(out),
            sha256=sha,
            architecture=arch,
            tensor_count=card.get("tensor_count", 0),
            parameters=card.get("parameters", 0),
            seconds=round(time.perf_counter() - t0, 2),
            reused=True,
            model_fingerprint=checkpoint_fingerprint(out),
        )

    model, tok = _load(gguf, torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = _write_model(tmp, model, tok, torch_dtype)
        card = {
            "kind": CARD_KIND,
            "format": IMPORT_FORMAT,
            "method": "gguf_import",
            "name": out.name,
            "source": {
                "kind": "gguf",
                "path": str(gguf),
                "sha256": sha,
                "bytes": gguf.stat().st_size,
                "architecture": arch,
                "name": meta.get("general.name"),
                "file_type": meta.get("general.file_type"),
            },
            "inputs": [
                {"role": "imported_from", "model": gguf.name, "fingerprint": f"sha256:{sha}", "path": str(gguf)}
            ],
            "dtype": dtype,
            "tensor_count": len(tensors),
            "parameters": sum(p.numel() for p in model.parameters()),
            "versions": _versions(),
        }
        fp = checkpoint_fingerprint(tmp)
        from ..artifacts import artifact_id

        card["artifact_id"] = artifact_id("model", fp.removeprefix("sha256:"))
        card["model_fingerprint"] = fp
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        _check_target(out)  # still ours to replace (nothing landed there meanwhile)
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(
        out_dir=str(out),
        sha256=sha,
        architecture=arch,
        tensor_count=card["tensor_count"],
        parameters=card["parameters"],
        seconds=round(time.perf_counter() - t0, 2),
        reused=False,
        model_fingerprint=fp,
    )


def _architecture(gguf: Path, meta: dict) -> str:
    """The GGUF's architecture, if this transformers can dequantize it."""
    arch = str(meta.get("general.architecture", ""))
    if not arch:
        raise GGUFImportError(f"{gguf}: no 'general.architecture' in the GGUF metadata")
    supported = supported_architectures()
    if supported and arch not in supported:
        import transformers

        raise GGUFImportError(
            f"{gguf}: architecture {arch!r} cannot be dequantized by transformers "
            f"{transformers.__version__} (supported: {', '.join(sorted(supported))})"
        )
    return arch


def _write_model(folder: Path, model, tok, torch_dtype) -> dict:
    """model.safetensors, config.json (a plain config in `torch_dtype`), generation config and
    tokenizer into `folder`; returns the saved tensors."""
    from safetensors.torch import save_file

    tensors = state_dict_for_saving(model)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = plain_config(model)
    cfg.dtype = torch_dtype
    cfg.save_pretrained(str(folder))
    model.generation_config.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return tensors


# --- lineage -------------------------------------------------------------------------------------


def lineage_ops(
    folder: str | os.PathLike,
    *,
    name: Optional[str] = None,
    run_id: Optional[str] = None,
    model_fingerprint: Optional[str] = None,
    model: bool = True,
) -> list[tuple[str, dict]]:
    """Lineage records of an imported folder (LineageStore.record_batch operations): the GGUF source
    (kind ``gguf``), the folder's model source (``model=False``: left out, for a caller that records
    it itself), the edge between them and an 'observed' event for each. Empty when ``folder`` has
    no import card."""
    from ..artifacts import artifact_id
    from .fingerprint import checkpoint_fingerprint

    folder = Path(folder).absolute()
    card = read_card(folder)
    if card is None:
        return []
    src = card.get("source") or {}
    sha = src.get("sha256")
    if not isinstance(sha, str) or not sha:
        return []
    gguf_fp = f"sha256:{sha}"
    gid = artifact_id("gguf", sha)
    fp = model_fingerprint or checkpoint_fingerprint(folder)
    mid = artifact_id("model", fp.removeprefix("sha256:"))
    mname = name or folder.name
    nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    gname = Path(str(src.get("path") or "model.gguf")).name
    params = {k: src.get(k) for k in ("architecture", "name", "file_type") if src.get(k) is not None}
    ops = [
        (
            "record_artifact",
            dict(
                artifact_id=gid,
                kind="gguf",
                name=gname,
                key_hash=gguf_fp,
                path=src.get("path"),
                bytes=src.get("bytes"),
                code_version="-",
                params=params,
                run_id=run_id,
                data_version=gguf_fp,
            ),
        ),
        ("record_event", dict(artifact_id=gid, run_id=run_id, step=f"gguf/{gname}", event="observed")),
    ]
    if model:
        ops += [
            (
                "record_artifact",
                dict(
                    artifact_id=mid,
                    kind="model",
                    name=mname,
                    key_hash=fp,
                    path=str(folder),
                    bytes=nbytes,
                    code_version="-",
                    params={},
                    run_id=run_id,
                    data_version=fp,
                ),
            ),
            ("record_event", dict(artifact_id=mid, run_id=run_id, step=f"model/{mname}", event="observed")),
        ]
    return ops + [("record_edge", dict(parent_id=gid, child_id=mid, role="imported_from", fingerprint=gguf_fp))]


__all__ = [
    "GGUFImportError",
    "ImportResult",
    "import_gguf",
    "read_metadata",
    "read_card",
    "lineage_ops",
    "supported_architectures",
    "sha256_file",
]
