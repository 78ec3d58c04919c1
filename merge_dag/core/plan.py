"""Planning a merge: everything that can be checked before a tensor is read, and the work in order.

`plan_merge(recipe)` opens every input (headers only) and checks tensor names, shapes, dtypes,
paths, the config and the device; it resolves each tensor's parameters (merge_dag.core.params:
scalars, layer gradients, filters) and returns a MergePlan with one TensorStep per output tensor.
merge_dag.core.merge executes a plan; merge_dag.core.card writes its card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import params as pmap
from .checkpoint import COPIED_FILES, TOKENIZER_FILES, Checkpoint, check_output_target, copyable_files, parse_dtype
from .errors import CheckpointError, MergeInputError, MissingTensorError, RecipeError
from .methods.base import MergeMethod
from .methods.registry import get_method
from .recipe import Recipe
from .vocab import VocabMap, plan_vocab

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class TensorInput:
    """One tensor of one input: which checkpoint, which tensor name, with what parameters."""

    model: int  # index into MergePlan.inputs
    tensor: str
    params: dict[str, Any]  # per-model parameters resolved for this tensor
    delta: Optional[Checkpoint] = None  # read this task vector (float32) and add the base, instead


@dataclass
class TensorStep:
    name: str  # output tensor name
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    base: Optional[TensorInput]
    sources: list[TensorInput]
    params: dict[str, Any]  # global parameters resolved for this tensor
    t: float  # layer position in [0, 1]
    vocab: Optional[VocabMap] = None  # rows indexed by token: map each input's rows onto the output vocabulary

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
    inputs: list[Checkpoint]  # every checkpoint read; index 0 is the base when there is one
    roles: list[str]  # "base" or "model"
    steps: list[TensorStep]
    out_dtype: torch.dtype
    config: dict
    tokenizer_from: Optional[Checkpoint]
    device: str
    skipped: list[str] = field(default_factory=list)  # tensors left out (`missing_tensors: skip`)
    stand_ins: dict[str, list[str]] = field(default_factory=dict)  # tensor -> models read as the base there
    vocab: Optional[VocabMap] = None  # the inputs' vocabularies differ, or tokenizer_source: union

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
            f"output:     {len(self.steps)} tensors, {self.out_bytes / gb:.3f} GB as "
            f"{str(self.out_dtype).removeprefix('torch.')}",
            f"largest:    {self.largest_tensor:,} elements",
            *self._notes(),
            f"est. peak memory for tensors: {self.estimated_peak_bytes() / gb:.3f} GB",
            "",
            "tensors (name, shape, parameters):",
        ]
        rows = self.steps if max_rows is None else self.steps[:max_rows]
        for s in rows:
            per_model = "; ".join(
                f"{self.inputs[src.model].name}:{format_params(src.params)}" for src in s.sources if src.params
            )
            glob = format_params(s.params)
            lines.append(f"  {s.name} {list(s.shape)}  {glob}{'  ' if glob and per_model else ''}{per_model}")
        if max_rows is not None and len(self.steps) > max_rows:
            lines.append(f"  ... {len(self.steps) - max_rows} more")
        return "\n".join(lines)

    def _notes(self) -> list[str]:
        """describe()'s lines on vocabularies and tensors some inputs lack (none when neither applies)."""
        out = []
        if self.vocab is not None:
            mapped = ", ".join(sorted(self.vocab.tensors))
            added = f" (union added {len(self.vocab.added)})" if self.vocab.added else ""
            out.append(f"vocabulary: {self.vocab.size} tokens{added}; rows mapped by token in {mapped}")
        if self.skipped:
            out.append(f"skipped:    {len(self.skipped)} tensor(s) some inputs lack (missing_tensors: skip)")
        if self.stand_ins:
            out.append(f"from base:  {len(self.stand_ins)} tensor(s) some models lack (missing_tensors: base)")
        return out


def format_params(p: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


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
        raise RecipeError(
            f"{recipe.where}: guidance: data-guided merges need their calibration statistics first: "
            "`merge-dag merge` (merge_dag.guidance.offline.guided_merge) computes them, the Dagster "
            "project computes and caches them (materialize merged/<recipe>)"
        )
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
    tok_input = _tokenizer_input(recipe, inputs)
    vocab = plan_vocab(
        recipe.where, inputs, base_idx, tok_input, _is_union(recipe.tokenizer_source), recipe.pad_vocab_to
    )
    if vocab is not None and tok_input is None and _names_a_model(recipe.tokenizer_source):
        raise MergeInputError(
            f"{recipe.where}: tokenizer_source: {recipe.tokenizer_source!r} is not one of the merged models, "
            "but their vocabularies differ, so the output's rows follow a merged model's vocabulary; name "
            "`base`, a merged model, or `union`"
        )
    names, holders, skipped = _tensor_names(recipe, inputs, base_idx, vocab.tensors if vocab else set())
    _check_dtypes(method, inputs)

    config = ref.config()
    if vocab is not None and config:
        config = dict(config)
        config["vocab_size"] = vocab.size
    n_layers = _num_layers(config, names)
    out_dtype = _out_dtype(recipe, ref)
    offset = 0 if base_idx is None else 1
    deltas = _task_vector_deltas(recipe, method, ref, model_entries, task_vectors, base_idx is not None)
    steps = []
    stand_ins: dict[str, list[str]] = {}
    for name in names:
        info = ref.info(name)
        t = pmap.layer_position(name, n_layers)
        have = holders[name]
        by_token = vocab if vocab is not None and name in vocab.tensors else None
        sources = [
            TensorInput(
                offset + i if offset + i in have else 0,  # missing_tensors: base -- the base stands in
                name,
                _model_params(method, [m.parameters, recipe.parameters], name, t),
                _delta_for(deltas[i], name, info.shape) if offset + i in have and by_token is None else None,
            )
            for i, m in enumerate(model_entries)
        ]
        base = TensorInput(0, name, {}) if base_idx is not None else None
        if len(have) < len(inputs):
            stand_ins[name] = [inputs[k].name for k in range(len(inputs)) if k not in have]
        steps.append(
            TensorStep(
                name,
                (vocab.size, *info.shape[1:]) if by_token else info.shape,
                info.dtype,
                out_dtype if info.dtype in FLOAT_DTYPES else info.dtype,
                base,
                sources,
                _global_params(method, recipe.parameters, name, t),
                t,
                by_token,
            )
        )
    plan = MergePlan(recipe, method, inputs, roles, steps, out_dtype, config, _tokenizer_source(recipe, ref), device)
    plan.skipped, plan.stand_ins, plan.vocab = skipped, stand_ins, vocab
    return _checked(plan)


UNION = "union"


def _is_union(ref: Optional[str]) -> bool:
    return ref is not None and ref.strip().lower() == UNION


def _names_a_model(ref: Optional[str]) -> bool:
    return ref is not None and ref != "base" and not _is_union(ref) and ref.strip().lower() != NO_TOKENIZER


def _tokenizer_input(recipe: Recipe, inputs: list[Checkpoint]) -> Optional[int]:
    """The index in `inputs` of the model `tokenizer_source` names (None: the default, or union/none;
    also None when it names a model that is not merged: its vocabulary cannot map rows it has not)."""
    ref = recipe.tokenizer_source
    if not _names_a_model(ref):
        return None
    path = recipe.model_location(ref)[0].resolve()
    for k, ck in enumerate(inputs):
        if ck.path.resolve() == path:
            return k
    return None


MISSING_TENSOR_POLICIES = ("error", "base", "skip")


def _tensor_names(
    recipe: Recipe, inputs: list[Checkpoint], base_idx: Optional[int], by_token: set[str] = frozenset()
) -> tuple[list[str], dict[str, set[int]], list[str]]:
    """The output tensor names, which inputs hold each, and the names left out.

    The plan is the union of the inputs' safetensors indexes (headers), in the first input's order
    then each later input's extras: no per-architecture list, so any architecture merges and no
    tensor is dropped unseen. Where the inputs disagree on the tensor set, `missing_tensors` decides
    (default `error`: one MissingTensorError naming the tensor, the models that have it and those
    that lack it); `base`: an expert lacking a tensor is read there as the base (its task vector is
    zero there), a tensor the base lacks is still an error; `skip`: tensors not in every input are
    left out of the output (listed in the card). Shapes must agree wherever a tensor exists (for the
    tensors indexed by token, `by_token`, all but the first dimension: the vocabulary map aligns rows)."""
    policy = recipe.missing_tensors or "error"
    union: dict[str, set[int]] = {}
    for k, ck in enumerate(inputs):
        for n in ck.tensor_names:
            union.setdefault(n, set()).add(k)
    ref_shape: dict[str, tuple[Checkpoint, tuple[int, ...]]] = {}
    for n, have in union.items():
        for k in sorted(have):
            shape = inputs[k].tensors[n].shape
            if n not in ref_shape:
                ref_shape[n] = (inputs[k], shape)
            elif shape != ref_shape[n][1] and not (n in by_token and shape[1:] == ref_shape[n][1][1:]):
                first = ref_shape[n][0]
                raise MergeInputError(
                    f"model {inputs[k].name!r}: tensor {n!r} has shape {list(shape)}, "
                    f"but {first.name!r} has {list(ref_shape[n][1])}"
                )
    partial = {n: have for n, have in union.items() if len(have) < len(inputs)}
    if not partial:
        return list(union), union, []

    def names(ks) -> str:
        return ", ".join(repr(inputs[k].name) for k in sorted(ks))

    def refuse(n: str, hint: str) -> None:
        have = partial[n]
        more = f" (and {len(partial) - 1} more tensor(s))" if len(partial) > 1 else ""
        lack = set(range(len(inputs))) - have
        raise MissingTensorError(
            f"{recipe.where}: tensor {n!r} is in {names(have)} but missing from {names(lack)}{more}; {hint}"
        )

    if policy == "error":
        refuse(
            next(iter(partial)),
            "set `missing_tensors: base` (a missing expert tensor reads as the base's) or `skip` "
            "(leave such tensors out of the output)",
        )
    if policy == "skip":
        return [n for n in union if n not in partial], union, list(partial)
    # policy == "base"
    if base_idx is None:
        raise RecipeError(
            f"{recipe.where}: missing_tensors: `base` reads a missing tensor from the base model, but "
            f"{recipe.merge_method} reads no base_model here; use `error` or `skip`"
        )
    no_base = [n for n, have in partial.items() if base_idx not in have]
    if no_base:
        partial = {n: partial[n] for n in no_base}
        refuse(no_base[0], "the base lacks it, so `missing_tensors: base` cannot fill it in (use `skip`)")
    return list(union), union, []


def _task_vector_deltas(
    recipe: Recipe,
    method: type[MergeMethod],
    ref: Checkpoint,
    model_entries: list,
    task_vectors: Optional[dict[str, str | Path]],
    has_base: bool,
) -> list[Optional[Checkpoint]]:
    """Per model entry, the task vector checkpoint to read it from (base + delta), or None."""
    deltas: list[Optional[Checkpoint]] = [None] * len(model_entries)
    for ref_name, folder in (task_vectors or {}).items():
        if not has_base:
            raise MergeInputError(f"{recipe.where}: task vectors need a base model; {method.name} takes none")
        hits = [i for i, m in enumerate(model_entries) if m.model == ref_name]
        if not hits:
            raise MergeInputError(
                f"{recipe.where}: task vector given for {ref_name!r}, which the recipe does not merge"
            )
        deltas[hits[0]] = Checkpoint(folder, name=f"task_vector({ref_name})")
    return deltas


def _delta_for(tv: Optional[Checkpoint], name: str, shape: tuple[int, ...]) -> Optional[Checkpoint]:
    """The task vector to read tensor `name` of an expert from (base + delta), or None to read the
    expert itself: where the task vector lacks the tensor or holds it at another shape (a task vector
    covers only what the expert and the base share; core.task_vector.common_layout)."""
    if tv is None:
        return None
    info = tv.tensors.get(name)
    return tv if info is not None and info.shape == shape else None


def _plan_slices(recipe: Recipe, method: type[MergeMethod], device: str) -> MergePlan:
    """passthrough with slices: output layers are the slices' layers, renumbered consecutively."""
    refs = list(
        dict.fromkeys(
            ([recipe.base_model] if recipe.base_model else []) + [src.model for s in recipe.slices for src in s.sources]
        )
    )
    inputs = [_open(recipe, r) for r in refs]
    _check_distinct_paths(recipe, inputs)
    index = {r: i for i, r in enumerate(refs)}
    roles = ["base" if recipe.base_model and r == recipe.base_model else "model" for r in refs]
    for s_i, s in enumerate(recipe.slices):
        if len(s.sources) != 1:
            raise MergeInputError(
                f"{recipe.where}: slices[{s_i}].sources: passthrough takes exactly one "
                f"source per slice, got {len(s.sources)}"
            )
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
        src = TensorInput(ck_i, in_name, _model_params(method, slice_params, out_name, t))
        steps.append(
            TensorStep(
                out_name,
                info.shape,
                info.dtype,
                out_dtype if info.dtype in FLOAT_DTYPES else info.dtype,
                None,
                [src],
                _global_params(method, recipe.parameters, out_name, t),
                t,
            )
        )

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
            raise MergeInputError(
                f"{recipe.where}: slices[{s_i}].sources[0].layer_range: {list(src.layer_range)} "
                f"exceeds model {src.model!r}, which has {ck_layers} layers"
            )
        layer_names = _names_by_layer(ck.tensor_names)
        span = src.layer_range[1] - src.layer_range[0]
        for k, li in enumerate(range(*src.layer_range)):
            t = k / (span - 1) if span > 1 else 1.0
            for n in layer_names.get(li, []):
                out_name = _renumber(n, li, out_layer)
                add(out_name, ck_i, n, [src.parameters, s.parameters, recipe.parameters], t)
            out_layer += 1
    for n in tail:
        add(n, first_idx, n, [recipe.parameters], 0.0)
    _set_layer_count(config, total_layers)
    return MergePlan(recipe, method, inputs, roles, steps, out_dtype, config, _tokenizer_source(recipe, first), device)


def _names_by_layer(names: list[str]) -> dict[int, list[str]]:
    """Layer index -> the tensor names of that layer, in checkpoint order."""
    out: dict[int, list[str]] = {}
    for n in names:
        li = pmap.layer_index(n)
        if li is not None:
            out.setdefault(li, []).append(n)
    return out


def _set_layer_count(config: dict, total_layers: int) -> None:
    """A sliced model's config: its layer count, and `layer_types` repeated or cut to that count."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            config[key] = total_layers
    if isinstance(config.get("layer_types"), list):
        types = config["layer_types"]
        config["layer_types"] = (types * (total_layers // max(1, len(types)) + 1))[:total_layers]


def _is_post_weight(name: str) -> bool:
    return (
        name.startswith("lm_head")
        or name.endswith("norm.weight")
        and pmap.layer_index(name) is None
        and not name.startswith("model.embed")
    )


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
            raise MergeInputError(
                f"{recipe.where}: model {ck.name!r} {same} ({real}); a model cannot be merged with itself"
            )
        seen[real] = ck.name
        if lora_base is not None:
            continue
        for f in dict.fromkeys(i.file for i in ck.tensors.values()):
            st = f.stat()
            key = (st.st_dev, st.st_ino)
            other = files.get(key)
            if other is not None and other[0] != ck.name:
                raise MergeInputError(
                    f"{recipe.where}: model {ck.name!r} and model {other[0]!r} share the weight "
                    f"file {f} (a hard link of {other[1]}); a model cannot be merged with itself"
                )
            files[key] = (ck.name, f)


def _check_dtypes(method: type[MergeMethod], inputs: list[Checkpoint]) -> None:
    """A tensor is float in every input or in none: an integer tensor is never merged as a float."""
    ref = inputs[0]
    for ck in inputs[1:]:
        for name, info in ref.tensors.items():
            if name not in ck.tensors:
                continue
            other = ck.tensors[name].dtype
            if (info.dtype in FLOAT_DTYPES) != (other in FLOAT_DTYPES):
                raise MergeInputError(
                    f"model {ck.name!r}: tensor {name!r} is {str(other).removeprefix('torch.')}, "
                    f"but {ref.name!r} has {str(info.dtype).removeprefix('torch.')}; "
                    f"integer and bool tensors are never merged as floats"
                )


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named by `device`, refused (MergeInputError) if torch cannot use it here."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MergeInputError(
            f"--device: {device!r} is not a torch device (expected cpu, cuda, cuda:1 or mps)"
        ) from None
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


NO_TOKENIZER = "none"  # tokenizer_source: none -- write the output without tokenizer files, on purpose


def _tokenizer_source(recipe: Recipe, default: Checkpoint) -> Optional[Checkpoint]:
    """The checkpoint whose tokenizer files the output gets; it must hold some (or the recipe says
    `tokenizer_source: none`). Every file to copy is checked now (copyable_files)."""
    ref = recipe.tokenizer_source
    if ref is not None and ref.strip().lower() == NO_TOKENIZER:
        return None
    tok = default if ref in (None, "base") or _is_union(ref) else _open(recipe, ref)
    if not copyable_files(tok.folder, TOKENIZER_FILES):
        raise CheckpointError(
            f"{recipe.where}: tokenizer_source: model {tok.name!r} has no tokenizer files in "
            f"{tok.folder} (one of {', '.join(TOKENIZER_FILES[:4])} ...); name a model that has "
            f"them, or write `tokenizer_source: none` to write the output without a tokenizer"
        )
    return tok


_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def check_config(config: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The output config.json must describe the output tensors, or transformers cannot load it:
    vocab_size and hidden_size against the embedding, the layer count against the layer indices,
    intermediate_size against the MLP projections (each checked only where both exist)."""

    def bad(key: str, tensor: str, detail: str) -> None:
        raise CheckpointError(
            f"{where}: {key} is {config[key]!r}, but tensor {tensor!r} {detail}; config.json disagrees with the weights"
        )

    emb = next((n for n in shapes if n.endswith(_EMBED_SUFFIXES) and len(shapes[n]) == 2), None)
    if emb is not None:
        if isinstance(config.get("vocab_size"), int) and shapes[emb][0] != config["vocab_size"]:
            bad("vocab_size", emb, f"has {shapes[emb][0]} rows")
        if isinstance(config.get("hidden_size"), int) and shapes[emb][1] != config["hidden_size"]:
            bad("hidden_size", emb, f"has {shapes[emb][1]} columns")
    layers = {pmap.layer_index(n): n for n in shapes}
    layers.pop(None, None)
    key = next(
        (
            k
            for k in ("num_hidden_layers", "n_layer", "num_layers")
            if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)
        ),
        None,
    )
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
    deltas = {s.delta.path: s.delta.name for st in plan.steps for s in st.sources if s.delta is not None}
    out += [(name, path) for path, name in deltas.items()]
    if plan.tokenizer_from is not None:
        out.append((plan.tokenizer_from.name, plan.tokenizer_from.folder))
    return out


def check_target(plan: MergePlan, out_dir: str | Path, overwrite: bool = False) -> Path:
    """check_output_target for this plan's inputs (what `--dry-run` and `execute` both run)."""
    return check_output_target(out_dir, plan_input_paths(plan), overwrite=overwrite)
