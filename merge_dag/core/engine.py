"""The streaming merge engine: plan a recipe, then merge one tensor at a time into a new checkpoint.

Memory: for each output tensor the engine holds that tensor of every input (float32), the method's
temporaries, and the raw bytes of the next tensor being read ahead on a second thread, so peak
memory is about (inputs + 2) x the largest tensor whatever the model size (more for the methods
that declare more `work_copies`: sce, multislerp and the SVD-based ones). Everything is checked
before the first byte is written (names, shapes, paths, parameters); what can only be seen while
reading (NaN/Inf, identical inputs) aborts the merge and removes its temporary folder, so no output
folder ever exists unless it is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import __version__
from . import params as pmap
from .checkpoint import (
    COPIED_FILES,
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointWriter,
    OutTensor,
    check_output_target,
    clean_stale_temporaries,
    copyable_files,
    parse_dtype,
    parse_size,
    plan_shards,
)
from .errors import CheckpointError, MergeInputError, MergeOutputError, OutputError, RecipeError
from .fingerprint import checkpoint_fingerprint, short
from .lora import LoraCheckpoint
from .methods.base import MergeMethod, TensorTask
from .methods.registry import get_method
from .recipe import Recipe, load_recipe, parse_recipe
from .markdown import md_text
from .version import merge_code_version

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Source:
    """One tensor of one input: which checkpoint, which tensor name, with what parameters."""

    model: int                 # index into MergePlan.inputs
    tensor: str
    params: dict[str, Any]     # per-model parameters resolved for this tensor
    delta: Optional[Checkpoint] = None   # read this task vector (float32) and add the base, instead


@dataclass
class TensorStep:
    name: str                          # output tensor name
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    base: Optional[Source]
    sources: list[Source]
    params: dict[str, Any]             # global parameters resolved for this tensor
    t: float                           # layer position in [0, 1]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class MergePlan:
    recipe: Recipe
    method: type[MergeMethod]
    inputs: list[Checkpoint]           # every checkpoint read; index 0 is the base when there is one
    roles: list[str]                   # "base" or "model"
    steps: list[TensorStep]
    out_dtype: torch.dtype
    config: dict
    tokenizer_from: Optional[Checkpoint]
    device: str

    @property
    def out_bytes(self) -> int:
        return sum(s.numel * torch.tensor([], dtype=s.out_dtype).element_size() for s in self.steps)

    @property
    def largest_tensor(self) -> int:
        return max((s.numel for s in self.steps), default=0)

    def estimated_peak_bytes(self) -> int:
        """(inputs + the method's work copies, 2 for most) float32 copies of the largest tensor, plus raw
        read-ahead of one more set."""
        n_in = max(len(s.sources) + (1 if s.base else 0) for s in self.steps) if self.steps else 0
        n_models = max(len(s.sources) for s in self.steps) if self.steps else 0
        big = self.largest_tensor
        raw = max((s.numel * torch.tensor([], dtype=s.in_dtype).element_size() for s in self.steps), default=0)
        return (n_in + self.method.work_copies(n_models)) * big * 4 + n_in * raw

    def describe(self, max_rows: Optional[int] = None) -> str:
        gb = 1e9
        lines = [
            f"recipe:     {self.recipe.where}",
            f"method:     {self.method.name}",
            f"device:     {self.device}",
            "inputs:",
        ]
        for ck, role in zip(self.inputs, self.roles):
            lines.append(f"  {role:<5} {ck.name}  ({len(ck.tensors)} tensors, {ck.total_bytes / gb:.3f} GB)")
        lines += [
            f"output:     {len(self.steps)} tensors, {self.out_bytes / gb:.3f} GB as {str(self.out_dtype).removeprefix('torch.')}",
            f"largest:    {self.largest_tensor:,} elements",
            f"est. peak memory for tensors: {self.estimated_peak_bytes() / gb:.3f} GB",
            "",
            "tensors (name, shape, parameters):",
        ]
        rows = self.steps if max_rows is None else self.steps[:max_rows]
        for s in rows:
            per_model = "; ".join(
                f"{self.inputs[src.model].name}:{_fmt_params(src.params)}" for src in s.sources if src.params
            )
            glob = _fmt_params(s.params)
            lines.append(f"  {s.name} {list(s.shape)}  {glob}{'  ' if glob and per_model else ''}{per_model}")
        if max_rows is not None and len(self.steps) > max_rows:
            lines.append(f"  ... {len(self.steps) - max_rows} more")
        return "\n".join(lines)


def _fmt_params(p: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


@dataclass
class MergeResult:
    out_dir: Path
    tensor_count: int
    bytes: int
    seconds: float
    fingerprints: dict[str, str]       # input name -> fingerprint
    output_fingerprint: str
    method: str
    card: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


def _resolve(value_sources: list[dict[str, Any]], spec_name: str, default: Any, name: str, t: float) -> Any:
    for src in value_sources:
        if spec_name in src:
            v = pmap.evaluate(src[spec_name], name, t)
            if v is not None:
                return v
    return default


def _num_layers(config: dict, names: list[str]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    idx = [pmap.layer_index(n) for n in names]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 1


def _open(recipe: Recipe, ref: str) -> Checkpoint:
    """A model the recipe names; `base+adapter` opens as a LoraCheckpoint (base + delta per tensor)."""
    return recipe.open_model(ref)


def plan_merge(recipe: Recipe, device: str = "cpu", task_vectors: Optional[dict[str, str | Path]] = None) -> MergePlan:
    """Check everything that can be checked without reading tensor data, and order the work.

    task_vectors: {model reference in the recipe: folder of its task vector (expert - base, float32)}.
    Those experts are read as base + task vector, so a cached task vector is reused across recipes.
    """
    method = get_method(recipe.merge_method)
    check_device(device)
    if recipe.guidance is not None:
        raise RecipeError(f"{recipe.where}: guidance: data-guided merges need their calibration statistics, "
                          "which the Dagster layer computes and caches; materialize merged/<recipe> "
                          "(`merge-dag demo`, `merge-dag compare` or `merge-dag dev`) instead of `merge-dag merge`")
    if method.name == "passthrough" and recipe.slices:
        return _checked(_plan_slices(recipe, method, device))

    inputs: list[Checkpoint] = []
    roles: list[str] = []
    base_idx: Optional[int] = None
    use_base = method.takes_base(recipe.base_model)
    if use_base:
        inputs.append(_open(recipe, recipe.base_model))
        roles.append("base")
        base_idx = 0
    model_entries = [m for m in recipe.models if not (use_base and m.model == recipe.base_model)]
    for m in model_entries:
        inputs.append(_open(recipe, m.model))
        roles.append("model")
    _check_distinct_paths(recipe, inputs)

    ref = inputs[0]
    names = ref.tensor_names
    for ck in inputs[1:]:
        _check_same_tensors(ref, ck)
    _check_dtypes(method, inputs)

    config = ref.config()
    n_layers = _num_layers(config, names)
    out_dtype = _out_dtype(recipe, ref)
    offset = 0 if base_idx is None else 1
    deltas: list[Optional[Checkpoint]] = [None] * len(model_entries)
    for ref_name, folder in (task_vectors or {}).items():
        if base_idx is None:
            raise MergeInputError(f"{recipe.where}: task vectors need a base model; {method.name} takes none")
        hits = [i for i, m in enumerate(model_entries) if m.model == ref_name]
        if not hits:
            raise MergeInputError(f"{recipe.where}: task vector given for {ref_name!r}, which the recipe does not merge")
        tv = Checkpoint(folder, name=f"task_vector({ref_name})")
        _check_same_tensors(ref, tv)
        deltas[hits[0]] = tv
    steps = []
    for name in names:
        info = ref.info(name)
        t = pmap.layer_position(name, n_layers)
        sources = [
            Source(offset + i, name, _model_params(method, [m.parameters, recipe.parameters], name, t), deltas[i])
            for i, m in enumerate(model_entries)
        ]
        base = Source(0, name, {}) if base_idx is not None else None
        steps.append(TensorStep(name, info.shape, info.dtype,
                                out_dtype if info.dtype in FLOAT_DTYPES else info.dtype,
                                base, sources, _global_params(method, recipe.parameters, name, t), t))
    return _checked(MergePlan(recipe, method, inputs, roles, steps, out_dtype, config,
                              _tokenizer_source(recipe, ref), device))


def _plan_slices(recipe: Recipe, method: type[MergeMethod], device: str) -> MergePlan:
    """passthrough with slices: output layers are the slices' layers, renumbered consecutively."""
    refs = list(dict.fromkeys(([recipe.base_model] if recipe.base_model else []) +
                              [src.model for s in recipe.slices for src in s.sources]))
    inputs = [_open(recipe, r) for r in refs]
    _check_distinct_paths(recipe, inputs)
    index = {r: i for i, r in enumerate(refs)}
    roles = ["base" if recipe.base_model and r == recipe.base_model else "model" for r in refs]
    for s_i, s in enumerate(recipe.slices):
        if len(s.sources) != 1:
            raise MergeInputError(f"{recipe.where}: slices[{s_i}].sources: passthrough takes exactly one "
                                  f"source per slice, got {len(s.sources)}")
    first = inputs[index[recipe.base_model or recipe.slices[0].sources[0].model]]
    config = dict(first.config())
    out_dtype = _out_dtype(recipe, first)
    names = first.tensor_names
    non_layer = [n for n in names if pmap.layer_index(n) is None]
    total_layers = sum(src.layer_range[1] - src.layer_range[0] for s in recipe.slices for src in s.sources)

    steps: list[TensorStep] = []

    def add(out_name: str, ck_i: int, in_name: str, slice_params: list[dict], t: float):
        ck = inputs[ck_i]
        info = ck.tensors.get(in_name)
        if info is None:
            raise MergeInputError(f"model {ck.name!r}: tensor {in_name!r} is missing (needed for {out_name!r})")
        src = Source(ck_i, in_name, _model_params(method, slice_params, out_name, t))
        steps.append(TensorStep(out_name, info.shape, info.dtype,
                                out_dtype if info.dtype in FLOAT_DTYPES else info.dtype,
                                None, [src], _global_params(method, recipe.parameters, out_name, t), t))

    head = [n for n in non_layer if not _is_post_weight(n)]
    tail = [n for n in non_layer if _is_post_weight(n)]
    first_idx = index[recipe.base_model or recipe.slices[0].sources[0].model]
    for n in head:
        add(n, first_idx, n, [recipe.parameters], 0.0)
    out_layer = 0
    for s_i, s in enumerate(recipe.slices):
        src = s.sources[0]
        ck_i = index[src.model]
        ck = inputs[ck_i]
        ck_layers = _num_layers(ck.config(), ck.tensor_names)
        if src.layer_range[1] > ck_layers:
            raise MergeInputError(f"{recipe.where}: slices[{s_i}].sources[0].layer_range: {list(src.layer_range)} "
                                  f"exceeds model {src.model!r}, which has {ck_layers} layers")
        layer_names: dict[int, list[str]] = {}
        for n in ck.tensor_names:
            li = pmap.layer_index(n)
            if li is not None:
                layer_names.setdefault(li, []).append(n)
        span = src.layer_range[1] - src.layer_range[0]
        for k, li in enumerate(range(*src.layer_range)):
            t = k / (span - 1) if span > 1 else 1.0
            for n in layer_names.get(li, []):
                out_name = _renumber(n, li, out_layer)
                add(out_name, ck_i, n, [src.parameters, s.parameters, recipe.parameters], t)
            out_layer += 1
    for n in tail:
        add(n, first_idx, n, [recipe.parameters], 0.0)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            config[key] = total_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = (config["layer_types"] * (total_layers // max(1, len(config["layer_types"])) + 1))[:total_layers]
    return MergePlan(recipe, method, inputs, roles, steps, out_dtype, config, _tokenizer_source(recipe, first), device)


def _is_post_weight(name: str) -> bool:
    return name.startswith("lm_head") or name.endswith("norm.weight") and pmap.layer_index(name) is None \
        and not name.startswith("model.embed")


def _renumber(name: str, old: int, new: int) -> str:
    m = pmap.LAYER_RE.search(name)
    s, e = m.span(1)
    return name[:s] + str(new) + name[e:]


def _model_params(method: type[MergeMethod], value_sources: list[dict], name: str, t: float) -> dict[str, Any]:
    return {p.name: _resolve(value_sources, p.name, p.default, name, t) for p in method.params if p.per_model}


def _global_params(method: type[MergeMethod], top: dict, name: str, t: float) -> dict[str, Any]:
    return {p.name: _resolve([top], p.name, p.default, name, t) for p in method.params if not p.per_model}


def _out_dtype(recipe: Recipe, ref: Checkpoint) -> torch.dtype:
    if recipe.out_dtype:
        return parse_dtype(recipe.out_dtype)
    if recipe.dtype:
        return parse_dtype(recipe.dtype)
    for info in ref.tensors.values():
        if info.dtype in FLOAT_DTYPES:
            return info.dtype
    return torch.float32


def _check_distinct_paths(recipe: Recipe, inputs: list[Checkpoint]) -> None:
    """Refuse the same checkpoint twice: the same reference listed twice, two references resolving to
    one folder (symbolic links, `a/../a`), or two folders sharing a weight file (hard links). A LoRA
    expert is the pair (adapter folder, base folder); it reads the base's weight files, so the
    hard-link check covers plain checkpoints only."""
    seen: dict = {}
    files: dict[tuple[int, int], tuple[str, Path]] = {}
    for ck in inputs:
        lora_base = getattr(ck, "base", None)
        real = ck.path.resolve() if lora_base is None else (ck.path.resolve(), lora_base.path.resolve())
        if real in seen:
            same = "is listed twice" if seen[real] == ck.name else f"and model {seen[real]!r} are the same checkpoint"
            raise MergeInputError(f"{recipe.where}: model {ck.name!r} {same} ({real}); a model cannot be merged "
                                  "with itself")
        seen[real] = ck.name
        if lora_base is not None:
            continue
        for f in dict.fromkeys(i.file for i in ck.tensors.values()):
            st = f.stat()
            key = (st.st_dev, st.st_ino)
            other = files.get(key)
            if other is not None and other[0] != ck.name:
                raise MergeInputError(f"{recipe.where}: model {ck.name!r} and model {other[0]!r} share the weight "
                                      f"file {f} (a hard link of {other[1]}); a model cannot be merged with itself")
            files[key] = (ck.name, f)


def _check_dtypes(method: type[MergeMethod], inputs: list[Checkpoint]) -> None:
    """A tensor is float in every input or in none: an integer tensor is never merged as a float."""
    ref = inputs[0]
    for ck in inputs[1:]:
        for name, info in ref.tensors.items():
            other = ck.tensors[name].dtype
            if (info.dtype in FLOAT_DTYPES) != (other in FLOAT_DTYPES):
                raise MergeInputError(f"model {ck.name!r}: tensor {name!r} is {str(other).removeprefix('torch.')}, "
                                      f"but {ref.name!r} has {str(info.dtype).removeprefix('torch.')}; "
                                      f"integer and bool tensors are never merged as floats")


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named by `device`, refused (MergeInputError) if torch cannot use it here."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MergeInputError(f"--device: {device!r} is not a torch device (expected cpu, cuda, cuda:1 or mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeInputError(f"device {str(device)!r} was asked for, but torch sees no CUDA device")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise MergeInputError(f"device {str(device)!r}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise MergeInputError(f"device {str(device)!r} was asked for, but torch sees no MPS device")
    elif d.type != "cpu":
        raise MergeInputError(f"--device: {device!r} is not supported (expected cpu, cuda, cuda:1 or mps)")
    return d


NO_TOKENIZER = "none"   # tokenizer_source: none -- write the output without tokenizer files, on purpose


def _tokenizer_source(recipe: Recipe, default: Checkpoint) -> Optional[Checkpoint]:
    """The checkpoint whose tokenizer files the output gets; it must hold some (or the recipe says
    `tokenizer_source: none`). Every file to copy is checked now (copyable_files)."""
    ref = recipe.tokenizer_source
    if ref is not None and ref.strip().lower() == NO_TOKENIZER:
        return None
    tok = default if ref in (None, "base") else _open(recipe, ref)
    if not copyable_files(tok.folder, TOKENIZER_FILES):
        raise CheckpointError(f"{recipe.where}: tokenizer_source: model {tok.name!r} has no tokenizer files in "
                              f"{tok.folder} (one of {', '.join(TOKENIZER_FILES[:4])} ...); name a model that has "
                              f"them, or write `tokenizer_source: none` to write the output without a tokenizer")
    return tok


_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def check_config(config: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The output config.json must describe the output tensors, or transformers cannot load it:
    vocab_size and hidden_size against the embedding, the layer count against the layer indices,
    intermediate_size against the MLP projections (each checked only where both exist)."""
    def bad(key: str, tensor: str, detail: str) -> None:
        raise CheckpointError(f"{where}: {key} is {config[key]!r}, but tensor {tensor!r} {detail}; "
                              "config.json disagrees with the weights")

    emb = next((n for n in shapes if n.endswith(_EMBED_SUFFIXES) and len(shapes[n]) == 2), None)
    if emb is not None:
        if isinstance(config.get("vocab_size"), int) and shapes[emb][0] != config["vocab_size"]:
            bad("vocab_size", emb, f"has {shapes[emb][0]} rows")
        if isinstance(config.get("hidden_size"), int) and shapes[emb][1] != config["hidden_size"]:
            bad("hidden_size", emb, f"has {shapes[emb][1]} columns")
    layers = {pmap.layer_index(n): n for n in shapes}
    layers.pop(None, None)
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)
                and not isinstance(config.get(k), bool)), None)
    if key is not None and layers:
        top = max(layers)
        if top + 1 != config[key]:
            bad(key, layers[top], f"is in layer {top} (the weights hold {top + 1} layers)")
    inter = config.get("intermediate_size")
    if isinstance(inter, int) and not isinstance(inter, bool):
        for n, shape in shapes.items():
            if len(shape) != 2:
                continue
            if re.search(r"\.mlp\.(gate_proj|up_proj)\.weight$", n) and shape[0] != inter:
                bad("intermediate_size", n, f"has shape {list(shape)}")
            if re.search(r"\.mlp\.down_proj\.weight$", n) and shape[1] != inter:
                bad("intermediate_size", n, f"has shape {list(shape)}")


def _checked(plan: MergePlan) -> MergePlan:
    """The checks every plan passes before any tensor is read."""
    if plan.config:
        check_config(plan.config, {s.name: s.shape for s in plan.steps}, str(plan.inputs[0].folder / "config.json"))
    copyable_files(plan.inputs[0].folder, COPIED_FILES)
    return plan


def plan_input_paths(plan: MergePlan) -> list[tuple[str, Path]]:
    """(name, path) of everything a merge reads: inputs, task vectors, the tokenizer source."""
    out = [(ck.name, ck.path) for ck in plan.inputs]
    out += [(s.delta.name, s.delta.path) for st in plan.steps[:1] for s in st.sources if s.delta is not None]
    if plan.tokenizer_from is not None:
        out.append((plan.tokenizer_from.name, plan.tokenizer_from.folder))
    return out


def check_target(plan: MergePlan, out_dir: str | Path, overwrite: bool = False) -> Path:
    """check_output_target for this plan's inputs (what `--dry-run` and `execute` both run)."""
    return check_output_target(out_dir, plan_input_paths(plan), overwrite=overwrite)


def _check_same_tensors(ref: Checkpoint, ck: Checkpoint) -> None:
    for name, info in ref.tensors.items():
        other = ck.tensors.get(name)
        if other is None:
            raise MergeInputError(f"model {ck.name!r}: tensor {name!r} is missing (present in {ref.name!r})")
        if other.shape != info.shape:
            raise MergeInputError(f"model {ck.name!r}: tensor {name!r} has shape {list(other.shape)}, "
                                  f"but {ref.name!r} has {list(info.shape)}")
    extra = [n for n in ck.tensors if n not in ref.tensors]
    if extra:
        raise MergeInputError(f"model {ck.name!r}: tensor {extra[0]!r} is not in {ref.name!r}"
                              f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; tensor names disagree")


# ---------------------------------------------------------------------------------------------
# execution
# ---------------------------------------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _read_raw(plan: MergePlan, step: TensorStep) -> tuple[list[torch.Tensor], list[str]]:
    """Raw tensors (storage dtype, CPU) of the base then each source, and their sha256 digests.

    Runs on the read-ahead thread: file reads and hashing release the GIL, so both overlap the
    merge arithmetic of the previous tensor.
    """
    srcs = ([step.base] if step.base else []) + step.sources
    raws = [(s.delta or plan.inputs[s.model]).get(s.tensor) for s in srcs]
    digests = [hashlib.sha256(memoryview(r.reshape(-1).view(torch.uint8).numpy())).hexdigest() for r in raws]
    if step.base and step.in_dtype in FLOAT_DTYPES:
        base32 = None
        for i, s in enumerate(srcs):
            if s.delta is not None:  # expert = base + task vector, exact in float32 for bf16/fp16 inputs
                if base32 is None:
                    base32 = raws[0].to(torch.float32)
                raws[i] = raws[i].to(torch.float32).add_(base32)
                digests[i] = "delta:" + digests[i]
    return raws, digests


def execute(plan: MergePlan, out_dir: str | Path, shard_size: str | int = "2GB",
            progress: bool = True, card_extra: Optional[dict] = None,
            on_tensor: Optional[Callable[[int, int], None]] = None, overwrite: bool = False) -> MergeResult:
    """Merge `plan` into `out_dir`, atomically. An existing `out_dir` is replaced only if it is an
    earlier merge_dag output (`overwrite`: even one holding files a merge does not write); see
    check_output_target for what is always refused."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with output_errors(out_dir):
        clean_stale_temporaries(out_dir)
    check_target(plan, out_dir, overwrite)
    device = merge_device(plan)
    digests = input_digest_maps(plan)
    same_pairs = input_pairs(plan)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.steps), unit="tensor", desc=f"{plan.method.name}", dynamic_ncols=True)

    def tick(k: int) -> None:
        if bar is not None:
            bar.update(1)
        if on_tensor is not None:
            on_tensor(k, len(plan.steps))

    try:
        with output_errors(out_dir), CheckpointWriter(out_dir, out_tensors(plan), parse_size(shard_size),
                                                      metadata=shard_metadata(plan)) as writer:
            merge_steps(plan, plan.steps, device, writer.write, digests, same_pairs, tick)
            raise_if_identical(plan, same_pairs)
            fps = input_fingerprints(plan, digests)
            card = _write_metadata(plan, writer, fps, card_extra or {})
            elapsed = time.perf_counter() - t0
            writer.commit()
    finally:
        if bar is not None:
            bar.close()
    out_fp = checkpoint_fingerprint(Checkpoint(out_dir))
    return MergeResult(out_dir, len(plan.steps), plan.out_bytes, elapsed, fps, out_fp, plan.method.name, card)


# The pieces of `execute`, shared with merges split into parts (merge_dag.core.parts), so a split
# merge writes the same bytes and computes the same fingerprints as a one-step one.


def merge_device(plan: MergePlan) -> torch.device:
    return check_device(plan.device)


class output_errors:
    """Context manager: an OSError while writing `out_dir` (disk full, read-only, permission)
    becomes one OutputError naming the folder and the cause; the writer has already removed its
    temporary folder, so nothing is left at the target."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def __enter__(self) -> "output_errors":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, OSError):
            return False
        cause = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise OutputError(f"{self.out_dir}: cannot write the output: {cause}{where}; nothing was written "
                          "there") from exc


def out_tensors(plan: MergePlan) -> list[OutTensor]:
    """The output tensors in write order: what CheckpointWriter (and plan_shards) lays out."""
    return [OutTensor(s.name, s.shape, s.out_dtype) for s in plan.steps]


def shard_metadata(plan: MergePlan) -> dict[str, str]:
    """The __metadata__ of every output shard."""
    return {"merge_dag": __version__, "method": plan.method.name}


def input_digest_maps(plan: MergePlan) -> list[dict[str, str]]:
    """Per input (by index in plan.inputs), {tensor name: sha256} of what a merge read; empty."""
    return [dict() for _ in plan.inputs]


def input_pairs(plan: MergePlan) -> set[tuple[int, int]]:
    """Every pair of inputs: each stays suspect of being the same model while every tensor agrees."""
    return {(a, b) for a, b in combinations(range(len(plan.inputs)), 2)}


def merge_steps(plan: MergePlan, steps: list[TensorStep], device: torch.device,
                write: Callable[[str, torch.Tensor], None], digests: list[dict[str, str]],
                same_pairs: set[tuple[int, int]], tick: Optional[Callable[[int], None]] = None) -> None:
    """Merge `steps` in order and hand each result to `write`, reading the next tensor ahead on a
    second thread. Records every input tensor's digest in `digests` (task-vector reads excepted)
    and drops from `same_pairs` each pair of inputs seen to differ."""
    method = plan.method()
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read")
    try:
        pending = io.submit(_read_raw, plan, steps[0]) if steps else None
        for k, step in enumerate(steps):
            raws, raw_digests = pending.result()
            pending = io.submit(_read_raw, plan, steps[k + 1]) if k + 1 < len(steps) else None
            srcs = ([step.base] if step.base else []) + step.sources
            for s, d in zip(srcs, raw_digests):
                if s.delta is None:
                    digests[s.model][s.tensor] = d
            # identical inputs: a pair stays suspect while every tensor's digest agrees
            if same_pairs:
                by_model = {s.model: d for s, d in zip(srcs, raw_digests)}
                for a, b in list(same_pairs):
                    if a in by_model and b in by_model and by_model[a] != by_model[b]:
                        same_pairs.discard((a, b))
            out = _merge_one(plan, method, step, srcs, raws, device)
            write(step.name, out)
            del out, raws
            if tick is not None:
                tick(k + 1)
    finally:
        io.shutdown(wait=True, cancel_futures=True)


def raise_if_identical(plan: MergePlan, same_pairs: set[tuple[int, int]]) -> None:
    if plan.method.name != "passthrough":
        for a, b in sorted(same_pairs):
            raise MergeInputError(
                f"model {plan.inputs[a].name!r} and model {plan.inputs[b].name!r} hold identical "
                "weights in every tensor: the same model under two names cannot be merged with itself")


def input_fingerprints(plan: MergePlan, digests: list[dict[str, str]]) -> dict[str, str]:
    """Each input's content fingerprint, from the digests a merge computed while reading it."""
    return {ck.name: checkpoint_fingerprint(ck, digests[i]) for i, ck in enumerate(plan.inputs)}


def _all_finite(t: torch.Tensor) -> bool:
    """True if no NaN/Inf: min and max are finite (NaN propagates into both). One reduction pass
    with no temporary: 30x faster than isfinite().all() on bf16 weights."""
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _merge_one(plan: MergePlan, method: MergeMethod, step: TensorStep, srcs: list[Source],
               raws: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    for s, raw in zip(srcs, raws):
        if raw.dtype in FLOAT_DTYPES and raw.numel() and not _all_finite(raw):
            bad = "NaN" if bool(torch.isnan(raw).any()) else "Inf"
            raise MergeInputError(f"model {plan.inputs[s.model].name!r}: tensor {s.tensor!r} contains {bad} values")
    if step.in_dtype not in FLOAT_DTYPES:
        # integer/bool tensors: passthrough copies its one source; other methods copy the tensor only
        # when every input holds the same bytes (a buffer such as position ids), else refuse it
        if plan.method.name != "passthrough":
            for s, raw in zip(srcs[1:], raws[1:]):
                if s.delta is None and not torch.equal(raw, raws[0]):
                    raise MergeInputError(
                        f"model {plan.inputs[s.model].name!r}: tensor {s.tensor!r} is "
                        f"{str(raw.dtype).removeprefix('torch.')} and differs from {plan.inputs[srcs[0].model].name!r}; "
                        f"{plan.method.name} merges only float tensors (integer and bool tensors are copied "
                        "only when identical in every input; passthrough copies them as they are)")
        return raws[0]
    # raw buffers are fresh per read and already hashed, so methods may work on them in place
    floats = [r.to(device=device, dtype=torch.float32) for r in raws]
    base = floats[0] if step.base else None
    models = floats[1:] if step.base else floats
    gen = None
    if plan.method.randomized:
        gen = torch.Generator(device=device)
        gen.manual_seed(_tensor_seed(plan.recipe.seed, step.name))
    task = TensorTask(step.name, base, models, [s.params for s in step.sources], step.params, gen)
    out = method.merge(task)
    if tuple(out.shape) != step.shape:
        raise RuntimeError(f"{plan.method.name} returned shape {list(out.shape)} for {step.name!r}, expected {list(step.shape)}")
    out = out.to(step.out_dtype)
    if out.numel() and not _all_finite(out):  # the same single aminmax pass as for the inputs
        bad = "NaN" if bool(torch.isnan(out).any()) else "Inf"
        raise MergeOutputError(
            f"merged tensor {step.name!r} contains {bad} values after {plan.method.name} and the cast to "
            f"{str(step.out_dtype).removeprefix('torch.')} (parameters {_fmt_params(step.params) or 'none'}; "
            f"per model {[_fmt_params(s.params) for s in step.sources]}); nothing was written")
    return out


def _write_metadata(plan: MergePlan, writer: CheckpointWriter, fps: dict[str, str], extra: dict) -> dict:
    config = dict(plan.config)
    dt = str(plan.out_dtype).removeprefix("torch.")
    if "torch_dtype" in config or "dtype" not in config:
        config["torch_dtype"] = dt
    if "dtype" in config:
        config["dtype"] = dt
    if config:
        writer.write_json("config.json", config)
    base_ck = plan.inputs[0]
    writer.copy_files(base_ck.folder, [n for n in COPIED_FILES if n != "config.json"])
    if plan.tokenizer_from is not None:  # tokenizer, chat template, special tokens, generation config
        writer.copy_files(plan.tokenizer_from.folder, TOKENIZER_FILES + ("generation_config.json",))
    recipe_yaml = plan.recipe.to_yaml_dict()
    card = {
        "merge_dag_version": __version__,
        "code_version": merge_code_version(),
        "method": plan.method.name,
        "recipe": recipe_yaml,
        "recipe_file": plan.recipe.where,
        "inputs": [_card_input(ck, role, fps[ck.name]) for ck, role in zip(plan.inputs, plan.roles)],
        "out_dtype": dt,
        "seed": plan.recipe.seed,
        "tokenizer_source": plan.tokenizer_from.name if plan.tokenizer_from else None,
        "tensor_count": len(plan.steps),
        **extra,
    }
    writer.write_json("merge_dag.json", card)
    writer.write_text("README.md", model_card(card))
    return card


def _card_input(ck, role: str, fingerprint: str) -> dict:
    out = {"role": role, "model": ck.name, "path": str(ck.path.resolve()), "fingerprint": fingerprint}
    if isinstance(ck, LoraCheckpoint):  # base + adapter: both, with the base's own fingerprint
        out.update(adapter=str(ck.adapter_dir.resolve()), base_path=str(ck.base.path.resolve()),
                   base_fingerprint=checkpoint_fingerprint(ck.base))
    return out


def write_card(folder: str | Path, card: dict) -> None:
    """(Re)write merge_dag.json and the model card README.md of a finished folder not yet in place
    (post-processing steps such as AIM, or merges written outside the engine such as RegMean)."""
    folder = Path(folder)
    (folder / "merge_dag.json").write_text(json.dumps(card, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(card))


def _fence(body: str) -> str:
    """A backtick fence longer than any backtick run in `body`, so nothing inside can close it."""
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    return "`" * max(3, longest + 1)


def model_card(card: dict) -> str:
    """The README.md of a merged model. Every user string (names, paths, parameters) is escaped
    (md_text) or sits in a code fence it cannot close."""
    import yaml

    base = next((i["model"] for i in card["inputs"] if i["role"] == "base"), None)
    front = {"library_name": "transformers", "tags": ["merge", "merge_dag", str(card["method"])]}
    if base:
        front["base_model"] = [str(base)]
    title = card.get("name") or card["recipe"].get("name") or "merged model"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {md_text(title)}", "",
             f"Merged by merge_dag {md_text(card['merge_dag_version'])} (code version {md_text(card['code_version'])}) "
             f"with the **{md_text(card['method'])}** method, written as {md_text(card['out_dtype'])}."]
    if card.get("artifact_id"):
        aid = md_text(card["artifact_id"])
        lines += ["", f"Artifact id: <code>{aid}</code> (trace it with <code>merge-dag audit {aid}</code>)."]
    lines += ["", "## Inputs", "", "| role | model | content fingerprint |", "|---|---|---|"]
    for i in card["inputs"]:
        lines.append(f"| {md_text(i['role'])} | <code>{md_text(i['model'])}</code> | "
                     f"<code>{md_text(i['fingerprint'])}</code> |")
    recipe_text = yaml.safe_dump(card["recipe"], sort_keys=False).strip()
    fence = _fence(recipe_text)
    lines += ["", "## Recipe (method and all parameters)", "", f"{fence}yaml", recipe_text, fence, "",
              "Fingerprints are sha256 hash trees over tensor names, dtypes, shapes and bytes plus "
              "config.json (see merge_dag/core/fingerprint.py). Machine-readable provenance: merge_dag.json.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# one-call API
# ---------------------------------------------------------------------------------------------


def merge(recipe: Recipe | dict | str | Path, out_dir: str | Path, device: str = "cpu",
          shard_size: str | int = "2GB", progress: bool = False, card_extra: Optional[dict] = None,
          overwrite: bool = False) -> MergeResult:
    """Merge a recipe (object, mergekit-shaped dict, or YAML path) into `out_dir`. `overwrite`: as
    `merge-dag merge --overwrite` (see execute)."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    plan = plan_merge(recipe, device=device)
    return execute(plan, out_dir, shard_size=shard_size, progress=progress, card_extra=card_extra,
                   overwrite=overwrite)


__all__ = ["MergePlan", "MergeResult", "plan_merge", "execute", "merge", "CheckpointError", "MergeInputError",
           "plan_shards", "short", "json"]
