"""Merge recipes: pydantic models for mergekit-shaped YAML.

    merge_method: ties
    base_model: data/models/ci/base
    models:
      - model: data/models/ci/add
        parameters: {weight: 1.0, density: 0.5}
      - model: data/models/ci/rev
        parameters:
          density: [0.3, 0.7]            # gradient over layers
          weight: [{filter: mlp, value: 0.8}, {value: 1.0}]
    parameters: {lambda: 1.0}
    dtype: float32                        # accepted; merge_dag computes in float32 always
    out_dtype: bfloat16                   # written dtype (default: dtype, else the base's)
    tokenizer_source: base                # or a model path; `union` (merge_dag.core.vocab); `none`: no tokenizer
    # tokenizer: {source: union, pad_to_multiple_of: 64}   # mergekit's block form of the same (+ padding)
    missing_tensors: error                # a tensor some inputs lack: error (default), base or skip
    seed: 0                               # random methods (dare, della) repeat exactly under it

A `models` entry may name experts by glob instead of by path: ``- glob: data/models/math-*`` (with
optional `parameters`, applied to every match) stands for every folder matching the pattern when
the recipe is loaded, in sorted order, skipping hidden folders (a copy in progress written as
``.name.tmp-*``), the base, and models already named. A new fine-tune that matches joins the merge
without editing the recipe.

A LoRA adapter folder (PEFT: adapter_config.json + adapter_model.safetensors) is an expert too:
``- model: base+adapter`` (mergekit's form), ``- {model: base, lora: adapter}``, ``- {lora: adapter}``
(on top of base_model), a `model` that is an adapter folder, or a glob match that is one (both on
top of base_model). All are spelled ``base+adapter`` once parsed (merge_dag.core.lora reads them).

Relative model paths are resolved against the project root when the recipe belongs to a project (the
Dagster layer), else against the working directory, then against the recipe's folder.
Every error names the file and the key.
"""

from __future__ import annotations

import glob as globlib
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import params as pmap
from .checkpoint import parse_dtype
from .errors import RecipeError
from .lora import is_adapter_folder

Scalar = Union[bool, int, float, str]
ParamValue = Any  # checked by params.validate_shape (pydantic unions over lists of dicts give poor errors)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)
    NEW_KEYS: ClassVar[tuple[str, ...]] = ()  # options added after the first release (None = unset)

    def settings_dump(self) -> dict:
        """model_dump for cache keys: options added later are left out while unset (None), so a recipe
        that does not use them keeps the key it had before they existed."""
        return self.model_dump(mode="json", exclude={k for k in self.NEW_KEYS if getattr(self, k) is None})


class InputModel(_Strict):
    model: Optional[str] = None
    glob: Optional[str] = None
    lora: Optional[str] = None  # a PEFT adapter folder on top of `model` (default: base_model)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    calibration: Optional[str] = None  # this model's own task calibration set (data-guided merging)
    from_glob: Optional[str] = Field(default=None, exclude=True)  # the pattern this entry came from

    @model_validator(mode="after")
    def _one_of(self) -> "InputModel":
        if self.glob is not None and self.lora is not None:
            raise ValueError("`lora` names one adapter; a `glob` matching adapter folders needs no `lora`")
        if (
            self.model is not None
            and self.glob is not None
            or self.model is None
            and self.glob is None
            and self.lora is None
        ):
            raise ValueError("give exactly one of `model` (a path) or `glob` (a pattern), or `lora` (an adapter)")
        return self


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    sources: list[InputSlice]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SparsityGuidance(_Strict):
    """LEWIS: per expert x layer x module densities from activation-based importance shifts."""

    method: Literal["lewis"] = "lewis"
    calibration: Optional[str] = None  # one set for every expert; default: each expert's own `calibration`
    gamma: float = Field(default=0.3, gt=0, le=1)  # lowest density
    epsilon: float = Field(default=0.8, gt=0, le=1)  # highest density
    mean_density: Optional[float] = Field(default=None, gt=0, le=1)  # shift the map to this parameter-weighted mean
    sequential: bool = False  # the official code's layer-by-layer Wanda-pruned statistics
    wanda_sparsity: float = Field(default=0.5, ge=0, lt=1)
    # robust variants (None = the faithful default, left out of the dumps so existing keys stay):
    scaling: Optional[Literal["minmax", "rank", "quantile"]] = None  # how shifts map to [gamma, epsilon]; minmax
    quantile: Optional[float] = Field(default=None, ge=0, lt=0.5)  # scaling quantile: the tail q (default 0.05)
    clip_quantile: Optional[float] = Field(default=None, gt=0, le=1)  # clip each linear's s at this quantile

    NEW_KEYS: ClassVar[tuple[str, ...]] = ("scaling", "quantile", "clip_quantile")

    @model_validator(mode="after")
    def _order(self) -> "SparsityGuidance":
        if self.gamma > self.epsilon:
            raise ValueError(f"gamma ({self.gamma}) must not exceed epsilon ({self.epsilon})")
        if self.quantile is not None and self.scaling != "quantile":
            raise ValueError("quantile applies to scaling: quantile")
        return self


class CoefficientGuidance(_Strict):
    """Sens-Merging: per expert x layer coefficients from sensitivity and cross-task alignment."""

    method: Literal["sens"] = "sens"
    temperature: float = Field(default=2.0, gt=0)
    alignment: bool = True  # False: tau = 1 (sensitivity only)
    normalize: Optional[Literal["l2", "rms", "layer"]] = None  # alpha's normalisation; None = l2 (faithful)

    NEW_KEYS: ClassVar[tuple[str, ...]] = ("normalize",)


class AimGuidance(_Strict):
    """AIM: relax the merged task vector per input channel by the base's activation magnitude."""

    calibration: Union[str, list[str]]  # one set, or several whose statistics are summed
    omega: float = Field(default=0.4, ge=0, le=1)

    @property
    def calibrations(self) -> list[str]:
        return [self.calibration] if isinstance(self.calibration, str) else list(self.calibration)


class RegMeanGuidance(_Strict):
    """RegMean: linears merged in closed form from each model's Gram matrices on its own calibration set."""

    a: float = Field(default=0.9, ge=0, le=1)  # off-diagonal scale
    ridge: float = Field(default=0.0, ge=0)


class FisherGuidance(_Strict):
    """Fisher merging: each parameter averaged with weights w_i F_i, F_i expert i's diagonal Fisher on its
    own calibration set (merge_dag.guidance.fisher)."""

    estimator: Literal["sampled", "empirical"] = "sampled"  # y ~ the model's own distribution, or the data's
    epsilon: float = Field(default=1e-6, gt=0)  # the Fisher floor (with base_model: the base's Fisher)
    normalize: Optional[Literal["global", "tensor"]] = None  # each F_i / its mean (over all parameters, or the tensor)


class Guidance(_Strict):
    sparsity: Optional[SparsityGuidance] = None
    coefficients: Optional[CoefficientGuidance] = None
    aim: Optional[AimGuidance] = None
    regmean: Optional[RegMeanGuidance] = None
    fisher: Optional[FisherGuidance] = None
    # how every statistic of the recipe reads its calibration rows (merge_dag.guidance.calibration);
    # None means the default (all tokens; no chat template for prompt/answer rows) and is left out of
    # the recipe's dump, so recipes that do not use these options keep their fingerprints
    tokens: Optional[Literal["all", "answer"]] = None  # "answer": statistics and losses on answer tokens only
    chat_template: Optional[bool] = None  # render prompt/answer rows as a user/assistant chat

    @property
    def row_options(self) -> dict:
        """The calibration options as keyword arguments of `load_batches` (defaults filled in)."""
        return {"tokens": self.tokens or "all", "chat_template": bool(self.chat_template)}


class TokenizerSpec(_Strict):
    """mergekit's `tokenizer:` block: `source` (as `tokenizer_source`: base, a model, union, none) and
    `pad_to_multiple_of` (the output vocabulary's rows rounded up to a multiple of N; the added rows
    are zero, past the tokenizer's last id). mergekit's per-token `tokens:` overrides are not supported
    (an unknown key is an error naming it)."""

    source: Optional[str] = None
    pad_to_multiple_of: Optional[int] = Field(default=None, ge=1)


class Recipe(_Strict):
    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSpec] = None  # mergekit's block form: {source, pad_to_multiple_of}
    # a tensor in some inputs and not others: `error` (the default, None), `base` (the base stands in
    # for an expert that lacks it) or `skip` (leave it out of the output); see plan._tensor_names
    missing_tensors: Optional[Literal["error", "base", "skip"]] = None
    seed: int = 0
    name: Optional[str] = None
    evals: list[str] = Field(default_factory=list)  # lm-eval task names (used by the Dagster layer)
    parts: int = Field(default=1, ge=1)  # Dagster layer: split the merge into this many tensor-range steps
    guidance: Optional[Guidance] = None  # data-guided merging (the Dagster layer computes the statistics)

    # where the recipe came from, and the project root relative paths are resolved against (not YAML)
    source_path: Optional[Path] = Field(default=None, exclude=True)
    root: Optional[Path] = Field(default=None, exclude=True)
    _globs: list[str] = []

    @model_validator(mode="after")
    def _tokenizer_block(self) -> "Recipe":
        """`tokenizer: {source: X}` is `tokenizer_source: X` (moved there); both at once is an error."""
        if self.tokenizer is not None and self.tokenizer.source is not None:
            if self.tokenizer_source is not None:
                raise ValueError("give the tokenizer's source once: `tokenizer_source` or `tokenizer.source`, not both")
            self.tokenizer_source, self.tokenizer.source = self.tokenizer.source, None
        return self

    @property
    def pad_vocab_to(self) -> Optional[int]:
        """`tokenizer.pad_to_multiple_of`, or None."""
        return self.tokenizer.pad_to_multiple_of if self.tokenizer is not None else None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            parse_dtype(v)
        return v

    # ---- helpers -------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return str(self.source_path) if self.source_path else "<recipe>"

    def resolve_path(self, ref: str) -> Path:
        p = Path(os.path.expanduser(ref))
        if p.is_absolute():
            return p
        if self.root is not None:
            return (self.root / p).absolute()
        if p.exists() or self.source_path is None:
            return p.absolute()
        alt = self.source_path.parent / p
        return alt.absolute() if alt.exists() else p.absolute()

    def split_ref(self, ref: str) -> tuple[str, Optional[str]]:
        """(model ref, adapter ref or None): mergekit's `base+adapter` names a LoRA adapter folder on top
        of a base. A path that exists as written is never split; otherwise it splits at the first `+`
        whose left part exists (else the first `+`)."""
        if "+" not in ref or self.resolve_path(ref).exists():
            return ref, None
        cuts = [i for i, c in enumerate(ref) if c == "+"]
        for i in cuts:
            if self.resolve_path(ref[:i]).exists():
                return ref[:i], ref[i + 1 :]
        return ref[: cuts[0]], ref[cuts[0] + 1 :]

    def model_location(self, ref: str) -> tuple[Path, Optional[Path]]:
        """(folder, base folder or None): for `base+adapter`, the adapter folder and its base's."""
        model, adapter = self.split_ref(ref)
        if adapter is None:
            return self.resolve_path(model), None
        return self.resolve_path(adapter), self.resolve_path(model)

    def open_model(self, ref: str):
        """The model a recipe names: a Checkpoint, or a LoraCheckpoint for `base+adapter`."""
        from .lora import open_model

        path, base = self.model_location(ref)
        return open_model(path, name=ref, base=base)

    def calibration_path(self, ref: str) -> Path:
        """A calibration set by name (`arev` -> <data>/calibration/arev.jsonl, the project's data folder:
        `merge_dag.core.paths.data_dir`, data/ under the root by default) or path."""
        if "/" not in ref and not ref.endswith((".jsonl", ".json")):
            from .paths import data_folder

            ref = f"{data_folder()}/calibration/{ref}.jsonl"
        return self.resolve_path(ref)

    @property
    def globs(self) -> list[str]:
        """The glob patterns the recipe file named (kept after expansion)."""
        return list(self._globs)

    def to_yaml_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True, exclude={"source_path", "root"}, exclude_defaults=False)


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def expand_globs(recipe: Recipe) -> None:
    """Replace every `glob` entry of `models` by one `model` entry per matching folder (in place)."""
    if not recipe.models or all(m.glob is None for m in recipe.models):
        return
    base = recipe.resolve_path(recipe.base_model) if recipe.base_model else None
    named = {recipe.model_location(m.model)[0].absolute() for m in recipe.models if m.model is not None}
    out: list[InputModel] = []
    patterns: list[str] = []
    for m in recipe.models:
        if m.glob is None:
            out.append(m)
            continue
        patterns.append(m.glob)
        pattern = recipe.resolve_path(m.glob)
        for hit in sorted(globlib.glob(str(pattern))):
            path = Path(hit)
            if not path.is_dir() or path.name.startswith(".") or path == base or path.absolute() in named:
                continue
            named.add(path.absolute())
            ref = str(path)
            if recipe.root is not None:
                try:
                    ref = str(path.absolute().relative_to(recipe.root))
                except ValueError:
                    pass
            if is_adapter_folder(path):  # an adapter on top of the recipe's base
                if not recipe.base_model:
                    raise RecipeError(
                        f"{recipe.where}: models: glob {m.glob!r} matched the LoRA adapter folder "
                        f"{ref}, which needs a base: give base_model"
                    )
                ref = f"{recipe.base_model}+{ref}"
            out.append(
                InputModel(model=ref, parameters=dict(m.parameters), calibration=m.calibration, from_glob=m.glob)
            )
    recipe.models = out
    recipe._globs = patterns


def normalize_adapters(recipe: Recipe) -> None:
    """Spell every LoRA expert as `base+adapter` (in place): `{model: B, lora: A}` and `{lora: A}` (on
    top of base_model), and a `model` that is an adapter folder (on top of base_model)."""
    for i, m in enumerate(recipe.models or []):
        if m.lora is not None:
            base = m.model or recipe.base_model
            if not base:
                raise RecipeError(
                    f"{recipe.where}: models[{i}].lora: an adapter needs a base: give `model` "
                    "(its base) or the recipe's base_model"
                )
            m.model, m.lora = f"{base}+{m.lora}", None
        elif (
            m.model is not None
            and recipe.split_ref(m.model)[1] is None
            and is_adapter_folder(recipe.resolve_path(m.model))
        ):
            if not recipe.base_model:
                raise RecipeError(
                    f"{recipe.where}: models[{i}].model: {m.model} is a LoRA adapter folder, which "
                    "needs a base: give base_model, or write `base+adapter`"
                )
            m.model = f"{recipe.base_model}+{m.model}"
    if recipe.base_model and is_adapter_folder(recipe.resolve_path(recipe.base_model)):
        raise RecipeError(
            f"{recipe.where}: base_model: {recipe.base_model} is a LoRA adapter folder; name it "
            "with its own base as `base+adapter`"
        )


def parse_recipe(
    data: Any, where: str = "<recipe>", source_path: Optional[Path] = None, root: Optional[Path] = None
) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _fmt_loc(tuple(err["loc"]))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            lines.append(f"{where}: {loc}: {msg}")
        raise RecipeError("\n".join(lines)) from None
    except ValueError as e:  # dtype parse errors surface here in some pydantic paths
        raise RecipeError(f"{where}: {e}") from None
    recipe.source_path = source_path
    recipe.root = Path(root).absolute() if root is not None else None
    normalize_adapters(recipe)
    expand_globs(recipe)
    validate_recipe(recipe)
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (`*name`). A recipe has no use for them, and nested
    aliases (a "billion laughs") expand into exponentially large values that hang every later step;
    refusing them keeps loading linear in the file's size."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            mark = event.start_mark
            raise RecipeError(
                f"{mark.name}:{mark.line + 1}: YAML alias *{event.anchor} is not allowed in a recipe "
                "(anchors and aliases are refused; write the value out)"
            )
        return super().compose_node(parent, index)


def read_recipe_yaml(path: str | os.PathLike) -> Any:
    """The YAML data of a recipe file. Every problem is one RecipeError naming the file: missing,
    a folder, unreadable, not UTF-8, invalid YAML, YAML aliases."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: recipe file does not exist")
    if p.is_dir():
        raise RecipeError(f"{p}: is a folder, not a recipe file (name the .yaml file)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the recipe as UTF-8"
        ) from None
    loader = _RecipeLoader(text)
    loader.name = str(p)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def load_recipe(path: str | os.PathLike, root: Optional[Path] = None) -> Recipe:
    p = Path(path)
    data = read_recipe_yaml(p)
    return parse_recipe(data, where=str(p), source_path=p.absolute(), root=root)


def validate_recipe(recipe: Recipe) -> None:
    """Method-aware checks: known method, known parameters, required ones present, values in range."""
    from .methods.registry import get_method  # late import: methods import nothing from here

    where = recipe.where
    try:
        method = get_method(recipe.merge_method)
    except RecipeError as e:
        raise RecipeError(f"{where}: merge_method: {e}") from None

    if method.name == "passthrough":
        if not recipe.slices and not recipe.models:
            raise RecipeError(f"{where}: passthrough needs `slices` (or one entry in `models`)")
    else:
        if recipe.slices:
            raise RecipeError(
                f"{where}: slices: only the passthrough method takes `slices`; {method.name} takes `models`"
            )
        if recipe.models is None:
            raise RecipeError(f"{where}: models: required key is missing (a list of models to merge)")
    if recipe.slices and recipe.models:
        raise RecipeError(f"{where}: give either `slices` or `models`, not both")
    if method.requires_base and not recipe.base_model:
        raise RecipeError(f"{where}: base_model: required by merge_method {method.name!r}")

    experts = (
        [m for m in (recipe.models or []) if m.model != recipe.base_model]
        if method.takes_base(recipe.base_model)
        else list(recipe.models or [])
    )
    if recipe.models is not None:
        n = len(experts)
        if n < method.min_models:
            hint = "".join(
                f"; glob {g!r} matched no model folder"
                for g in recipe.globs
                if not any(m.from_glob == g for m in recipe.models)
            )
            raise RecipeError(
                f"{where}: models: {method.name} needs at least {method.min_models} "
                f"model(s) besides the base, got {n}{hint}"
            )
        if method.max_models is not None and n > method.max_models:
            raise RecipeError(
                f"{where}: models: {method.name} takes at most {method.max_models} model(s) besides the base, got {n}"
            )

    _validate_parameters(recipe, method, experts)

    if recipe.guidance is not None:
        _validate_guidance(recipe, method, experts)


def _check_value(where: str, method, loc: str, name: str, value: Any, allow_global: bool) -> None:
    """One parameter value as `method` takes it: known, placed where it may be (a per-model parameter is
    welcome anywhere, at top level as the default for every model, as in mergekit; a global one only
    where `allow_global`), well-shaped, of its kind and in range."""
    spec = method.param(name)
    if spec is None:
        known = ", ".join(p.name for p in method.params) or "none"
        raise RecipeError(f"{where}: {loc}.{name}: unknown parameter for {method.name} (known: {known})")
    if not spec.per_model and not allow_global:
        raise RecipeError(
            f"{where}: {loc}.{name}: {name} is a global parameter of {method.name}; "
            "give it under the top-level `parameters`"
        )
    err = pmap.validate_shape(value)
    if err:
        raise RecipeError(f"{where}: {loc}.{name}: {err}")
    for leaf in pmap.leaves(value):
        if spec.kind is bool:
            if not isinstance(leaf, bool):
                raise RecipeError(f"{where}: {loc}.{name}: must be true or false, got {leaf!r}")
            continue
        if isinstance(leaf, float) and not math.isfinite(leaf):
            raise RecipeError(f"{where}: {loc}.{name}: must be a finite number, got {leaf!r}")
        if spec.kind in (int, float):
            if isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
                raise RecipeError(f"{where}: {loc}.{name}: must be a number, got {leaf!r}")
        if spec.check is not None:
            msg = spec.check(leaf)
            if msg:
                raise RecipeError(f"{where}: {loc}.{name}: {msg}")


def _validate_parameters(recipe: Recipe, method, experts: list[InputModel]) -> None:
    """Every parameter given anywhere in the recipe, then the required ones."""
    where = recipe.where

    def check(loc: str, name: str, value: Any, allow_global: bool) -> None:
        _check_value(where, method, loc, name, value, allow_global)

    for name, value in recipe.parameters.items():
        check("parameters", name, value, allow_global=True)
    for i, m in enumerate(recipe.models or []):
        for name, value in m.parameters.items():
            check(f"models[{i}].parameters", name, value, allow_global=False)
    for si, s in enumerate(recipe.slices or []):
        for name, value in s.parameters.items():
            check(f"slices[{si}].parameters", name, value, allow_global=True)
        for j, src in enumerate(s.sources):
            for name, value in src.parameters.items():
                check(f"slices[{si}].sources[{j}].parameters", name, value, allow_global=False)

    # required parameters: per-model ones must reach every expert (own or top-level default)
    for spec in method.params:
        if not spec.required:
            continue
        if spec.per_model:
            for i, m in enumerate(recipe.models or []):
                if m in experts and spec.name not in m.parameters and spec.name not in recipe.parameters:
                    raise RecipeError(
                        f"{where}: models[{i}].parameters.{spec.name}: required by "
                        f"{method.name} (give it per model or under top-level `parameters`)"
                    )
        elif spec.name not in recipe.parameters:
            raise RecipeError(f"{where}: parameters.{spec.name}: required by {method.name}")


def _validate_guidance(recipe: Recipe, method, experts: list[InputModel]) -> None:
    from .methods.registry import COEFFICIENT_METHODS, SPARSIFYING

    where, g = recipe.where, recipe.guidance

    def need_own_calibration(what: str, models: list[InputModel]) -> None:
        for i, m in enumerate(recipe.models or []):
            if m in models and not m.calibration:
                raise RecipeError(
                    f"{where}: models[{i}].calibration: required by guidance.{what} (the name or path "
                    f"of {m.model}'s own task calibration set, e.g. data/calibration/<task>.jsonl)"
                )

    def check_file(loc: str, ref: str) -> None:
        p = recipe.calibration_path(ref)
        if not p.is_file():
            raise RecipeError(f"{where}: {loc}: calibration set {ref!r} not found ({p})")

    if g.regmean is not None:
        if method.name != "linear":
            raise RecipeError(
                f"{where}: guidance.regmean: RegMean replaces the linears of a `linear` merge; "
                f"merge_method is {method.name!r}"
            )
        if g.sparsity or g.coefficients or g.aim:
            raise RecipeError(f"{where}: guidance.regmean: cannot be combined with sparsity, coefficients or aim")
        need_own_calibration("regmean", list(recipe.models or []))
    if g.fisher is not None:
        if method.name != "linear":
            raise RecipeError(
                f"{where}: guidance.fisher: Fisher merging weights the average of a `linear` merge; "
                f"merge_method is {method.name!r}"
            )
        if g.sparsity or g.coefficients or g.aim or g.regmean:
            raise RecipeError(
                f"{where}: guidance.fisher: cannot be combined with sparsity, coefficients, aim or regmean"
            )
        if recipe.slices:
            raise RecipeError(f"{where}: guidance.fisher: merges whole models; give `models`, not `slices`")
        # the experts are the models besides base_model (with a base_model, the base is Fisher's prior)
        need_own_calibration("fisher", [m for m in recipe.models or [] if m.model != recipe.base_model])
    if g.sparsity is not None:
        if not method.sparsifies:
            raise RecipeError(
                f"{where}: guidance.sparsity: {method.name} does not sparsify; LEWIS densities apply "
                f"to {', '.join(SPARSIFYING)}"
            )
        if g.sparsity.calibration:
            check_file("guidance.sparsity.calibration", g.sparsity.calibration)
        else:
            need_own_calibration("sparsity (no guidance.sparsity.calibration given)", experts)
    if g.coefficients is not None:
        if not method.takes_coefficients:
            raise RecipeError(
                f"{where}: guidance.coefficients: Sens-Merging coefficients apply to "
                f"{', '.join(COEFFICIENT_METHODS)}, not {method.name}"
            )
        need_own_calibration("coefficients", experts)
    if g.aim is not None:
        if not recipe.base_model:
            raise RecipeError(f"{where}: guidance.aim: AIM relaxes the merge towards the base; give base_model")
        if not g.aim.calibrations:
            raise RecipeError(f"{where}: guidance.aim.calibration: name at least one calibration set")
        for ref in g.aim.calibrations:
            check_file("guidance.aim.calibration", ref)
    for i, m in enumerate(recipe.models or []):
        if m.calibration:
            check_file(f"models[{i}].calibration", m.calibration)
