"""Per-channel input statistics of every linear in the decoder layers, from forward hooks.

For each nn.Linear inside model.model.layers[*] (q, k, v, o, gate, up, down in Llama) and each of
its input channels j, over the selected tokens of the calibration batches (every real, non-padding
token; only the answer tokens with calibration tokens="answer", see calibration.py):
    count        number of tokens N (one number per linear)
    sumsq[j]     sum x_j^2            (LEWIS / Wanda: s_j = sumsq_j / N)
    sumabs[j]    sum |x_j|            (AIM: mean |x_j| = sumabs_j / N)
    maxabs[j]    max |x_j|
    gram         X^T X  (d_in x d_in, only with gram=True; RegMean: G = X^T X / N)
all accumulated in float32 whatever the model's dtype.

Saved as a folder: `stats.safetensors` with tensors "<weight name>::<kind>" (e.g.
"model.layers.0.self_attn.q_proj.weight::sumsq", "...::count" is a 0-d int64) and `stats.json`
(meta: settings, token counts).

Grams are keyed by distinct linear input: linears that receive the very same input tensor in a forward
pass (q/k/v read one normed hidden state, gate/up another) share one Gram matrix, stored once under
the first of them (the "leader", in forward order); `stats.json` maps every other one to its leader
("gram_shared": {follower: leader}) and `gram_sum` / `gram_mean` resolve it, so every weight still
finds its Gram. Sharing is detected, not assumed: the hook compares the input tensor objects (kept as
weak references, so a freed tensor's address can never alias a later one) and the grouping must be
the same in every batch. The vector statistics (count, sums, max) stay per linear (they are small).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file

from .calibration import Batch
from .errors import GuidanceError
from .model import decoder_layers, linear_modules
from .stats_io import read_stats_meta, save_stats_folder

STATS_FILE = "stats.safetensors"
META_FILE = "stats.json"
KINDS = ("count", "sumsq", "sumabs", "maxabs", "gram")
FORMAT = 1


@dataclass
class ActivationStats:
    count: dict[str, int]
    sumsq: dict[str, torch.Tensor]
    sumabs: dict[str, torch.Tensor]
    maxabs: dict[str, torch.Tensor]
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # keyed by leader (module docstring)
    meta: dict = field(default_factory=dict)
    source: str = "<memory>"  # where these were loaded from, for error messages
    shared: dict[str, str] = field(default_factory=dict)  # follower -> leader whose Gram it shares

    @property
    def names(self) -> list[str]:
        return list(self.count)

    @property
    def has_gram(self) -> bool:
        return bool(self.gram)

    def require(self, name: str, kind: str = "sumsq") -> None:
        if name not in self.count:
            raise GuidanceError(f"activation statistics {self.source}: no entry for tensor {name!r}")
        if self.count[name] <= 0:
            raise GuidanceError(f"activation statistics {self.source}: tensor {name!r} saw no tokens")
        if kind == "gram" and self.shared.get(name, name) not in self.gram:
            raise GuidanceError(
                f"activation statistics {self.source}: no Gram matrix for tensor {name!r} (collect with gram=True)"
            )

    def mean_sq(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """s_j = sum_tokens x_j^2 / N."""
        self.require(name)
        return self.sumsq[name].to(device) / self.count[name]

    def mean_abs(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        self.require(name)
        return self.sumabs[name].to(device) / self.count[name]

    def gram_sum(self, name: str) -> torch.Tensor:
        """X^T X of `name`'s input (its leader's, when the input is shared)."""
        self.require(name, "gram")
        return self.gram[self.shared.get(name, name)]

    def gram_mean(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """G = X^T X / N."""
        return self.gram_sum(name).to(device) / self.count[name]

    # ---- persistence ----
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n in self.count:
            out[f"{n}::count"] = torch.tensor(self.count[n], dtype=torch.int64)
            out[f"{n}::sumsq"] = self.sumsq[n]
            out[f"{n}::sumabs"] = self.sumabs[n]
            out[f"{n}::maxabs"] = self.maxabs[n]
            if n in self.gram:
                out[f"{n}::gram"] = self.gram[n]
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write stats.safetensors + stats.json into `folder` (atomically: a temporary folder renamed)."""
        meta = {"format": FORMAT, "gram": self.has_gram, "linears": len(self.count), **self.meta}
        if self.shared:
            meta["gram_shared"] = dict(sorted(self.shared.items()))
        return save_stats_folder(folder, self.tensors(), (STATS_FILE, META_FILE), meta)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ActivationStats":
        tpath, mpath, meta = read_stats_meta(folder, (STATS_FILE, META_FILE), "activation statistics")
        try:
            raw = load_file(str(tpath))
        except Exception as e:  # safetensors raises its own error types
            raise GuidanceError(f"{tpath}: cannot read activation statistics: {e}") from e
        stats = cls({}, {}, {}, {}, {}, meta, str(folder), dict(meta.get("gram_shared", {})))
        for key, t in raw.items():
            name, sep, kind = key.rpartition("::")
            if not sep or kind not in KINDS:
                raise GuidanceError(
                    f"{tpath}: unexpected tensor {key!r} (expected '<weight name>::<kind>', "
                    f"kind one of {', '.join(KINDS)})"
                )
            if kind == "count":
                stats.count[name] = int(t)
            else:
                getattr(stats, kind)[name] = t
        for n in stats.count:
            for kind in ("sumsq", "sumabs", "maxabs"):
                if n not in getattr(stats, kind):
                    raise GuidanceError(f"{tpath}: tensor {n!r} has a count but no {kind}")
        for f, lead in stats.shared.items():
            if lead not in stats.gram:
                raise GuidanceError(f"{mpath}: gram_shared maps {f!r} to {lead!r}, which has no Gram matrix")
        return stats


class _Accumulator:
    def __init__(self, d_in: int, device: torch.device):
        self.count = 0
        self.sumsq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.sumabs = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.maxabs = torch.zeros(d_in, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """x: (N, d_in) selected tokens only."""
        x = x.to(torch.float32)
        a = x.abs()
        self.count += x.shape[0]
        self.sumsq += (x * x).sum(0)
        self.sumabs += a.sum(0)
        if x.shape[0]:
            torch.maximum(self.maxabs, a.amax(0), out=self.maxabs)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layers of interest have run."""


def collect_activation_stats(
    model,
    batches: Iterable[Batch],
    device: str | torch.device = "cpu",
    gram: bool = False,
    layers: Optional[Iterable[int]] = None,
    meta: Optional[dict] = None,
) -> ActivationStats:
    """Run `batches` through `model` (moved to `device`) and accumulate the input statistics of every
    linear in the decoder layers (only those of `layers` if given; the forward pass then stops after
    the last of them). Only the batches' selected positions (`Batch.select`: every real token, or the
    answer tokens) are accumulated; padding never is."""
    device = torch.device(device)
    model.to(device)
    _, layer_list = decoder_layers(model)
    selected = None if layers is None else sorted(set(layers))
    mods = {n: (i, m) for n, (i, m) in linear_modules(model).items() if selected is None or i in selected}
    if not mods:
        raise GuidanceError(f"{type(model).__name__}: no linear modules in layers {selected}")
    acc = {n: _Accumulator(m.in_features, device) for n, (_, m) in mods.items()}
    grams: dict[str, torch.Tensor] = {}  # leader -> X^T X
    shared: dict[str, str] = {}  # follower -> leader (decided in the first batch, checked in every other)
    state: dict = {}

    def hook_for(name: str):
        def hook(_module, args, _output):
            x = args[0]
            mask = state["mask"]
            if tuple(x.shape[:-1]) != tuple(mask.shape):
                raise GuidanceError(
                    f"tensor {name!r}: linear input of shape {tuple(x.shape)} does not match the "
                    f"batch's token layout {tuple(mask.shape)}"
                )
            rows = x.detach()[mask]
            acc[name].add(rows)
            if not gram:
                return
            seen = state["inputs"].get(id(x))
            leader = seen[1] if seen is not None and seen[0]() is x else None
            if leader is None:
                state["inputs"][id(x)] = (weakref.ref(x), name)
            if state["first"]:
                if leader is not None:
                    shared[name] = leader
            elif shared.get(name) != leader:
                raise GuidanceError(
                    f"tensor {name!r}: shares its input with {leader or 'no other linear'} in this batch but "
                    f"with {shared.get(name) or 'no other linear'} in the first; cannot share its Gram matrix"
                )
            if leader is None:
                r = rows.to(torch.float32)
                if name not in grams:
                    grams[name] = torch.zeros(r.shape[1], r.shape[1], dtype=torch.float32, device=device)
                grams[name] += r.T @ r

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, (_, m) in mods.items()]
    if selected is not None:

        def stop(_module, _args, _output):
            raise _Stop()

        handles.append(layer_list[selected[-1]].register_forward_hook(stop))
    n_batches = n_seqs = n_tokens = n_selected = 0
    try:
        with torch.no_grad():
            for b in batches:
                b = b.to(device)
                state["mask"] = b.select
                state["inputs"] = {}
                state["first"] = n_batches == 0
                try:
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                except _Stop:
                    pass
                n_batches += 1
                n_seqs += b.input_ids.shape[0]
                n_tokens += b.tokens
                n_selected += b.selected_tokens
    finally:
        for h in handles:
            h.remove()
        state.clear()
    if n_batches == 0:
        raise GuidanceError("no calibration batches")
    info = {
        "batches": n_batches,
        "sequences": n_seqs,
        "tokens": n_tokens,
        **({"selected_tokens": n_selected} if n_selected != n_tokens else {}),
        "layers": selected if selected is not None else "all",
        **(meta or {}),
    }
    return ActivationStats(
        count={n: a.count for n, a in acc.items()},
        sumsq={n: a.sumsq for n, a in acc.items()},
        sumabs={n: a.sumabs for n, a in acc.items()},
        maxabs={n: a.maxabs for n, a in acc.items()},
        gram=grams,
        meta=info,
        shared=shared,
    )


def merge_stats(parts: Iterable[ActivationStats]) -> ActivationStats:
    """Join statistics of disjoint sets of linears (e.g. one per layer) into one object."""
    out = ActivationStats({}, {}, {}, {}, {}, {})
    for p in parts:
        for n in p.count:
            if n in out.count:
                raise GuidanceError(f"activation statistics {p.source}: tensor {n!r} appears twice")
            out.count[n] = p.count[n]
            out.sumsq[n], out.sumabs[n], out.maxabs[n] = p.sumsq[n], p.sumabs[n], p.maxabs[n]
            if n in p.gram:
                out.gram[n] = p.gram[n]
            if n in p.shared:
                out.shared[n] = p.shared[n]
        if not out.meta:
            out.meta = {k: v for k, v in p.meta.items() if k != "layers"}
    return out


def sum_stats(parts: list[ActivationStats]) -> ActivationStats:
    """Statistics of the union of several calibration sets on the same linears: counts and sums add,
    maxima take the maximum (Gram matrices add too)."""
    if not parts:
        raise GuidanceError("no activation statistics to combine")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if set(p.count) != set(first.count):
            diff = sorted(set(p.count) ^ set(first.count))[0]
            raise GuidanceError(f"activation statistics {p.source} and {first.source} differ in tensor {diff!r}")
    out = ActivationStats({}, {}, {}, {}, {}, {"sources": [p.source for p in parts]}, "+".join(p.source for p in parts))
    for n in first.count:
        out.count[n] = sum(p.count[n] for p in parts)
        out.sumsq[n] = sum(p.sumsq[n] for p in parts)
        out.sumabs[n] = sum(p.sumabs[n] for p in parts)
        out.maxabs[n] = torch.stack([p.maxabs[n] for p in parts]).amax(0)
    # Grams add per distinct input when every part groups the inputs alike; else each tensor its own sum
    same = all(p.shared == first.shared for p in parts)
    for n in first.count:
        if not all(p.shared.get(n, n) in p.gram for p in parts):
            continue
        if same and n in first.shared:
            out.shared[n] = first.shared[n]
        else:
            out.gram[n] = sum(p.gram[p.shared.get(n, n)] for p in parts)
    return out
