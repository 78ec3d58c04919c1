"""PEFT LoRA adapters as merge inputs: an expert = base + the adapter's delta, one tensor at a time.

An adapter folder holds adapter_config.json and adapter_model.safetensors (what peft's
`save_pretrained` writes). For an adapted linear module m with base weight W ([out, in]):

    delta_m = s * B_m A_m              A_m: [r, in], B_m: [out, r]
    s       = alpha / r                (alpha / sqrt(r) when use_rslora)
    delta_m^T instead                  when fan_in_fan_out (GPT-2 Conv1D weights are [in, out])

r and alpha come from `rank_pattern` / `alpha_pattern` when a pattern matches the module's name
(peft's rule: the pattern matches a dotted suffix of the name), else `r` / `lora_alpha`. An adapted
embedding (lora_embedding_A: [r, vocab], lora_embedding_B: [dim, r]) has delta = s (B A)^T. Every
other adapter tensor (modules_to_save, the `base_layer` copy of a targeted embedding, trained
biases) replaces the base tensor of the same name: delta = saved - base (plus the low-rank term
when that module is also adapted, as peft loads it). Every tensor the adapter
does not touch has delta 0.

`LoraCheckpoint` reads like a `Checkpoint` of the adapted model (same tensor names, shapes and
dtypes as the base): `get(name)` reads that base tensor and adds its delta, computed from the
adapter's two small factors at that moment, so a dense expert never exists on disk or in memory.
Everything is checked when it is opened (before any output is written): every adapter tensor must
name a base tensor, and every factor's shape must fit it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMB_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")
# adapter features merge_dag cannot express as a per-tensor delta of the same shapes
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "lora_bias": "lora_bias",
}


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A PEFT adapter folder (complete or not): it has adapter_config.json or adapter_model.safetensors."""
    p = Path(path)
    return p.is_dir() and ((p / ADAPTER_CONFIG).exists() or (p / ADAPTER_WEIGHTS).exists())


def pattern_key(patterns, module: str) -> Optional[str]:
    """The first pattern matching a dotted suffix of `module` (peft's rank/alpha pattern rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class Factor:
    """One adapted module: its base tensor, its two factors and its scale."""

    target: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    a: str  # adapter tensor names
    b: str
    scale: float
    embedding: bool  # delta = (B A)^T
    transpose: bool  # fan_in_fan_out: delta = (B A)^T


class LoraCheckpoint(Checkpoint):
    """base + LoRA adapter, read like a Checkpoint of the adapted model (see the module docstring).

    `path` is the adapter folder, `folder` the base's (config.json and tokenizer files are the base's),
    `tensors` the base's tensor infos. A Checkpoint subclass so every reader of checkpoints takes it;
    it overrides every method that touches data."""

    def __init__(self, base: Checkpoint, adapter: str | os.PathLike, name: Optional[str] = None):  # noqa: D107 (no Checkpoint.__init__: nothing of the base is re-read)
        self.base = base
        self.adapter_dir = Path(adapter)
        self.path = self.adapter_dir
        self.folder = base.folder
        self.name = name or f"{base.name}+{adapter}"
        self.tensors: dict[str, TensorInfo] = base.tensors
        self.adapter_config = read_adapter_config(self.adapter_dir, self.name)
        weights = self.adapter_dir / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise AdapterError(
                f"adapter {self.name!r}: {weights} is missing (peft save_pretrained writes it; "
                "pickled adapter_model.bin is not read)"
            )
        self.weights = Checkpoint(weights, name=f"adapter {self.name}", allow_adapter=True)
        self.factors: dict[str, Factor] = {}
        self.replaced: dict[str, str] = {}  # base tensor name -> adapter tensor name
        self._plan()

    # ---- opening: map every adapter tensor onto the base ----
    def _plan(self) -> None:
        cfg, where = self.adapter_config, f"adapter {self.name!r}"
        parts: dict[tuple[str, bool], dict[str, str]] = {}
        for key in self.weights.tensor_names:
            inner = key.removeprefix(PEFT_PREFIX)
            m = _FACTOR.match(inner) or _EMB_FACTOR.match(inner)
            if m:
                emb = "embedding" in m.group("kind")
                parts.setdefault((m.group("module"), emb), {})[m.group("kind")[-1]] = key
                continue
            target = inner.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            if target not in self.base.tensors:
                raise AdapterError(
                    f"{where}: tensor {key!r} replaces {target!r}, which base {self.base.name!r} "
                    "does not have (unknown module, or a tied lm_head the base does not store)"
                )
            self._check_shape(key, self.weights.info(key).shape, target, self.base.info(target).shape)
            self.replaced[target] = key
        r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        for (module, emb), ab in sorted(parts.items()):
            if set(ab) != {"A", "B"}:
                missing = "B" if "A" in ab else "A"
                kind = f"lora_{'embedding_' if emb else ''}"
                raise AdapterError(
                    f"{where}: module {module!r} has {kind}{'A' if missing == 'B' else 'B'} but no {kind}{missing}"
                )
            target = f"{module}.weight"
            if target not in self.base.tensors:
                raise AdapterError(
                    f"{where}: tensor {ab['A']!r} adapts module {module!r}, which base "
                    f"{self.base.name!r} does not have (no tensor {target!r})"
                )
            rk, ak = pattern_key(ranks, module), pattern_key(alphas, module)
            r = ranks[rk] if rk is not None else r0
            alpha = alphas[ak] if ak is not None else alpha0
            a_shape, b_shape = self.weights.info(ab["A"]).shape, self.weights.info(ab["B"]).shape
            w_shape = self.base.info(target).shape
            fan = bool(cfg.get("fan_in_fan_out")) and not emb
            if emb:
                want_a, want_b = (r, w_shape[0]), (w_shape[1], r) if len(w_shape) == 2 else None
            elif len(w_shape) == 2:
                out_f, in_f = (w_shape[1], w_shape[0]) if fan else w_shape
                want_a, want_b = (r, in_f), (out_f, r)
            else:
                want_a = want_b = None
            if want_b is None:
                raise AdapterError(
                    f"{where}: module {module!r}: base tensor {target!r} has shape {list(w_shape)}; "
                    "only 2-d linear and embedding weights can be LoRA-adapted here"
                )
            for key, got, want in ((ab["A"], a_shape, want_a), (ab["B"], b_shape, want_b)):
                if tuple(got) != tuple(want):
                    raise AdapterError(
                        f"{where}: tensor {key!r} has shape {list(got)}, expected {list(want)} for "
                        f"rank {r} on base tensor {target!r} {list(w_shape)}"
                    )
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.factors[target] = Factor(target, ab["A"], ab["B"], float(scale), emb, fan)

    def _check_shape(self, key: str, got, target: str, want) -> None:
        if tuple(got) != tuple(want):
            raise AdapterError(
                f"adapter {self.name!r}: tensor {key!r} has shape {list(got)}, but base tensor "
                f"{target!r} has {list(want)}"
            )

    # ---- Checkpoint interface ----
    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def config(self) -> dict:
        return self.base.config()

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    def reads_stored_bytes(self, name: str) -> bool:
        """An adapted or saved-whole tensor is not the base file's bytes (its cached digests are the base's)."""
        return name not in self.factors and name not in self.replaced

    @property
    def touched(self) -> list[str]:
        """Base tensors this adapter changes (adapted or replaced)."""
        return [n for n in self.tensors if n in self.factors or n in self.replaced]

    def delta(
        self, name: str, device: str | torch.device = "cpu", base: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """delta of tensor `name` in float32 (None where the adapter does not touch it). `base`: the
        base tensor when the caller has read it already (needed for replaced tensors only)."""
        low = self._low_rank(name, device)
        key = self.replaced.get(name)
        if key is None:
            return low
        if base is None:
            base = self.base.get(name, device=device)
        d = self.weights.get(key, device=device, dtype=torch.float32).sub_(base.to(device, torch.float32))
        return d if low is None else d.add_(low)

    def _low_rank(self, name: str, device) -> Optional[torch.Tensor]:
        f = self.factors.get(name)
        if f is None:
            return None
        a = self.weights.get(f.a, device=device, dtype=torch.float32)
        b = self.weights.get(f.b, device=device, dtype=torch.float32)
        d = b @ a
        if f.embedding or f.transpose:
            d = d.T
        return d.mul_(f.scale).contiguous()

    def get(
        self,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The adapted model's tensor: base + delta, float32 where the adapter touches it (the sum of a
        bf16 base and a float32 delta is not rounded back), else the base tensor as stored. `out` (a
        reused CPU uint8 buffer of at least the base tensor's size, as Checkpoint.get takes) receives
        the base tensor's bytes; a tensor the adapter saves whole is read into a fresh buffer."""
        if name in self.replaced:  # saved whole (modules_to_save, a targeted embedding's base_layer copy)
            t = self.weights.get(self.replaced[name], device=device)
        else:
            t = self.base.get(name, device=device, out=out)
        if name in self.factors:
            t = t.to(torch.float32).add_(self._low_rank(name, device))
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.name!r}, {len(self.factors)} adapted, {len(self.replaced)} replaced)"


def read_adapter_config(folder: Path, name: str) -> dict:
    p = folder / ADAPTER_CONFIG
    if not p.is_file():
        raise AdapterError(f"adapter {name!r}: {p} is missing")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{p}: not a JSON object")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"{p}: peft_type: {cfg.get('peft_type')!r} adapters are not supported (only LORA)")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise AdapterError(
                f"{p}: {key}: {what} adapters are not supported (not a low-rank delta of the base's own tensors)"
            )
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise AdapterError(f"{p}: {key}: must be a positive number, got {v!r}")
    return cfg


def open_model(path: str | os.PathLike, name: Optional[str] = None, base: Optional[str | os.PathLike] = None):
    """A checkpoint folder, or (with `base`) the LoRA adapter folder `path` on top of it."""
    if base is None:
        return Checkpoint(path, name=name)
    base_ck = Checkpoint(base, name=str(base))
    if not Path(path).exists():
        raise AdapterError(f"adapter {name or str(path)!r}: path does not exist: {path}")
    return LoraCheckpoint(base_ck, path, name=name)
