"""A merge_dag project on disk: the recipes under data/recipes and everything they name.

Pure (no Dagster): the Dagster layer turns a Project into asset definitions. Adding or editing a
recipe file changes the Project, never Python code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .core.errors import MergeDagError, RecipeError
from .core.methods.registry import get_method
from .core.paths import data_dir, models_dir
from .core.recipe import Recipe, parse_recipe, read_recipe_yaml
from .settings import settings


def asset_name(text: str) -> str:
    """A Dagster-safe name: letters, digits and underscores."""
    out = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    return out if out and not out[0].isdigit() else f"m_{out}"


@dataclass(frozen=True)
class ModelSource:
    name: str  # asset-safe name, e.g. ci_add
    ref: str  # as written in recipes, e.g. data/models/ci/add (`base+adapter` for a LoRA expert)
    path: Path  # absolute folder (a LoRA expert: the adapter folder)
    base: Optional[Path] = None  # a LoRA expert: its base's folder (config, tokenizer and weights)
    base_name: Optional[str] = None  # a LoRA expert: its base's asset-safe name

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def model_folder(self) -> Path:
        """The folder with config.json and the tokenizer: the model's own, or a LoRA expert's base."""
        return self.base if self.base is not None else self.path

    def open(self):
        """The checkpoint, read lazily: a Checkpoint, or for a LoRA expert a LoraCheckpoint (base + delta)."""
        from .core.lora import open_model

        return open_model(self.path, name=self.ref, base=self.base)

    def fingerprint(self) -> str:
        """Content fingerprint (a LoRA expert's covers its base, adapter config and adapter weights)."""
        from .core.fingerprint import checkpoint_fingerprint

        return checkpoint_fingerprint(self.open() if self.is_adapter else self.path)

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))


@dataclass(frozen=True)
class CalibrationSource:
    name: str  # asset-safe name, e.g. arev
    ref: str  # as written in recipes
    path: Path  # the jsonl file


@dataclass(frozen=True)
class StatsSpec:
    """One statistics pass: a model on a calibration set (activations, grams, sensitivity or fisher)."""

    name: str
    model: ModelSource
    calibration: CalibrationSource
    sequential: Optional[float] = None  # LEWIS sequential-Wanda variant (its sparsity), activations only
    tokens: str = "all"  # calibration tokens the statistic covers: "all" or "answer"
    chat_template: bool = False  # prompt/answer rows rendered with the tokenizer's chat template
    estimator: Optional[str] = None  # Fisher passes only: "sampled" or "empirical" (merge_dag.guidance.fisher)

    @property
    def row_options(self) -> dict:
        """How the pass reads its calibration rows (keyword arguments of `load_batches`)."""
        return {"tokens": self.tokens, "chat_template": self.chat_template}

    @property
    def row_settings(self) -> dict:
        """The row options that differ from the defaults, for the cache key (a statistic without them
        keeps the key it had before the options existed)."""
        return {
            **({"calibration_tokens": self.tokens} if self.tokens != "all" else {}),
            **({"chat_template": True} if self.chat_template else {}),
        }


@dataclass(frozen=True)
class ImportanceSpec:
    name: str
    base: StatsSpec
    expert: StatsSpec
    clip_quantile: Optional[float] = None  # LEWIS robust variant: each linear's s clipped at this quantile


@dataclass(frozen=True)
class AlignmentSpec:
    """Sens-Merging's cross-task alignment of a set of experts, each on its own calibration set (the
    sensitivity passes `members` name the pairs): one asset shared by every recipe with that set."""

    name: str
    members: tuple[StatsSpec, ...]  # sorted by name


@dataclass
class RecipeSpec:
    name: str
    file: Path
    recipe: Recipe
    base: Optional[ModelSource]
    experts: list[ModelSource]
    uses_task_vectors: bool
    evals: list[str]

    @property
    def members(self) -> list[ModelSource]:
        """Every model the recipe merges: the base (if any), then the experts."""
        return ([self.base] if self.base else []) + self.experts

    @property
    def guidance(self):
        return self.recipe.guidance

    def calibration(self, ref: str) -> CalibrationSource:
        """A calibration set named in the recipe, as a source."""
        path = self.recipe.calibration_path(ref)
        cal_root = data_dir(self.recipe.root or Path.cwd()) / "calibration"
        try:
            label = str(path.relative_to(cal_root).with_suffix(""))
        except ValueError:
            label = path.stem
        return CalibrationSource(asset_name(label), ref, path)

    def own_calibration(self, m: ModelSource) -> Optional[CalibrationSource]:
        """The `calibration` a models entry gives for `m` (its own task's set)."""
        for entry in self.recipe.models or []:
            if entry.model == m.ref and entry.calibration:
                return self.calibration(entry.calibration)
        return None

    def sparsity_calibration(self, m: ModelSource) -> CalibrationSource:
        g = self.guidance.sparsity
        return self.calibration(g.calibration) if g.calibration else self.own_calibration(m)


@dataclass(frozen=True)
class BrokenRecipe:
    """A recipe file that could not join the graph: its own `recipe/<name>` reports `error`."""

    name: str  # asset-safe, unique among recipes (the file's stem when its `name:` is unusable)
    file: Path
    error: str  # one or more lines, each naming the file and the cause


@dataclass
class Project:
    root: Path
    data: Optional[Path] = None  # default: data_dir(root)
    recipes: dict[str, RecipeSpec] = field(default_factory=dict)
    broken: dict[str, BrokenRecipe] = field(default_factory=dict)  # name -> a recipe file that does not load
    models: dict[str, ModelSource] = field(default_factory=dict)
    task_vectors: dict[str, tuple[ModelSource, ModelSource]] = field(default_factory=dict)  # name -> (base, expert)
    model_evals: dict[str, list[str]] = field(default_factory=dict)  # model name -> tasks (baselines)
    # data-guided merging: every statistic any recipe needs, each once (shared by every recipe using it)
    calibrations: dict[str, CalibrationSource] = field(default_factory=dict)
    activations: dict[str, StatsSpec] = field(default_factory=dict)
    grams: dict[str, StatsSpec] = field(default_factory=dict)
    fishers: dict[str, StatsSpec] = field(default_factory=dict)
    sensitivities: dict[str, StatsSpec] = field(default_factory=dict)
    importances: dict[str, ImportanceSpec] = field(default_factory=dict)
    alignments: dict[str, AlignmentSpec] = field(default_factory=dict)

    def __post_init__(self):
        if self.data is None:
            self.data = data_dir(self.root)

    @property
    def recipes_dir(self) -> Path:
        return self.data / "recipes"

    @property
    def tasks_dir(self) -> Path:
        return self.data / "tasks"

    @property
    def eval_dir(self) -> Path:
        return self.data / "eval"

    def known_task_vector(self, base: ModelSource, expert: ModelSource) -> Optional[str]:
        """The task_vector asset of `expert` over `base`, if the loaded graph has one."""
        name = self.tv_name(base, expert)
        return name if self.task_vectors.get(name) == (base, expert) else None

    def stats(
        self,
        table: str,
        model: ModelSource,
        cal: CalibrationSource,
        sequential: Optional[float] = None,
        tokens: str = "all",
        chat_template: bool = False,
        estimator: Optional[str] = None,
    ) -> StatsSpec:
        """The statistics pass of `model` on `cal` in `table` (activations, grams, sensitivities, fishers),
        registered once whichever recipe asks (the row options, when not the defaults, name their own;
        so does a Fisher estimator other than the default "sampled")."""
        name = (
            f"{model.name}__{cal.name}"
            + (f"__seqwanda{round(sequential * 100)}" if sequential is not None else "")
            + (f"__{estimator}" if estimator not in (None, "sampled") else "")
            + ("__answer" if tokens == "answer" else "")
            + ("__chat" if chat_template else "")
        )
        src = StatsSpec(name, model, cal, sequential, tokens, chat_template, estimator)
        known = getattr(self, table).setdefault(name, src)
        if known != src:
            raise RecipeError(f"{table} {name!r} would stand for both {known} and {src}")
        self.calibrations.setdefault(cal.name, cal)
        return src

    def importance(
        self,
        base: ModelSource,
        expert: ModelSource,
        cal: CalibrationSource,
        sequential: Optional[float] = None,
        clip_quantile: Optional[float] = None,
        **rows,
    ) -> ImportanceSpec:
        b = self.stats("activations", base, cal, sequential, **rows)
        e = self.stats("activations", expert, cal, sequential, **rows)
        stem = e.name + (f"__clip{clip_quantile:g}".replace(".", "p") if clip_quantile is not None else "")
        name = (
            stem
            if self.importances.get(stem, ImportanceSpec(stem, b, e, clip_quantile)).base == b
            else f"{stem}__on__{base.name}"
        )
        return self.importances.setdefault(name, ImportanceSpec(name, b, e, clip_quantile))

    def alignment(self, members: list[StatsSpec]) -> AlignmentSpec:
        """The alignment of the experts of `members` (sensitivity passes: expert x own set), registered
        once whichever recipe asks; named by its members (a hash when that grows past 120 characters)."""
        ms = tuple(sorted(set(members), key=lambda m: m.name))
        name = "__and__".join(m.name for m in ms)
        if len(name) > 120:
            import hashlib

            name = f"{len(ms)}_experts_" + hashlib.sha256(name.encode()).hexdigest()[:12]
        spec = AlignmentSpec(name, ms)
        known = self.alignments.setdefault(name, spec)
        if known != spec:
            raise RecipeError(f"alignment {name!r} would stand for two different sets of experts")
        return known

    def tv_name(self, base: ModelSource, expert: ModelSource) -> str:
        return (
            expert.name
            if self.task_vectors.get(expert.name, (base, expert))[0] == base
            else f"{expert.name}__on__{base.name}"
        )


def _model_source(root: Path, recipe: Recipe, ref: str) -> ModelSource:
    path, base = recipe.model_location(ref)
    return ModelSource(_source_name(root, path), ref, path, base, _source_name(root, base) if base else None)


def _source_name(root: Path, path: Path) -> str:
    models_root = models_dir(root)
    try:
        rel = path.relative_to(models_root)
    except ValueError:
        try:
            rel = path.relative_to(root)
        except ValueError:
            rel = Path(path.name)
    return asset_name(str(rel))


def recipe_spec(root: Path, f: Path) -> RecipeSpec:
    """One recipe file as the project sees it now (globs expanded against the folders on disk)."""
    data = read_recipe_yaml(f)
    recipe = parse_recipe(data, where=str(f), source_path=f.absolute(), root=root)
    name = asset_name(recipe.name or f.stem)
    method = get_method(recipe.merge_method)
    base = _model_source(root, recipe, recipe.base_model) if recipe.base_model else None
    refs = [m.model for m in recipe.models or []] + [s.model for sl in recipe.slices or [] for s in sl.sources]
    experts = [_model_source(root, recipe, r) for r in dict.fromkeys(refs) if r != recipe.base_model]
    uses_tv = method.uses_task_vectors and base is not None
    return RecipeSpec(name, f, recipe, base, experts, uses_tv, list(recipe.evals))


def current_spec(project: "Project", spec: RecipeSpec) -> RecipeSpec:
    """The recipe as its file says now: edits and new glob matches since the definitions loaded
    count at run time (the graph's shape follows at the next code-location reload)."""
    return recipe_spec(project.root, spec.file)


def load_project(root: str | os.PathLike | None = None, data: str | os.PathLike | None = None) -> Project:
    """Every recipe under <data>/recipes (data: see `data_dir`), and the models, task vectors and baselines they name.

    One bad recipe file never stops the others: a file that does not parse or validate, whose
    `name:` another file already uses, or whose models or statistics clash with another recipe's,
    goes to `project.broken` (with the error naming the file) and adds nothing else to the graph.
    Of two files with the same `name:`, the one whose file stem is that name keeps it (else the
    first in sorted order); the other is broken under its own file stem.

    Glob entries are expanded here, when the definitions load; a folder that appears later is
    picked up by the sensor and the merge step (which expand the glob again at run time), and shows
    as its own assets at the next reload of the code location. A glob recipe that matches too few
    folders yet is broken (its error says which glob) until a reload after the first match exists."""
    root = settings().project_root(root)
    project = Project(root=root, data=Path(data).absolute() if data is not None else None)
    files = sorted(project.recipes_dir.glob("*.yaml")) + sorted(project.recipes_dir.glob("*.yml"))
    parsed: list[tuple[Path, RecipeSpec | None, str]] = []
    for f in files:
        try:
            parsed.append((f, recipe_spec(root, f), ""))
        except MergeDagError as e:
            parsed.append((f, None, str(e)))
        except Exception as e:  # noqa: BLE001 - whatever the parser did not name, reported naming the file
            parsed.append((f, None, f"{f}: {type(e).__name__}: {e}"))
    # a name belongs to the file whose stem is that name, else to the first file using it
    owner: dict[str, Path] = {}
    for f, spec, _ in parsed:
        if spec is not None and (
            spec.name not in owner or asset_name(f.stem) == spec.name and asset_name(owner[spec.name].stem) != spec.name
        ):
            owner[spec.name] = f
    broken: list[tuple[Path, str]] = []
    for f, spec, error in parsed:
        if spec is None:
            broken.append((f, error))
        elif owner[spec.name] != f:
            broken.append((f, f"{f}: name: recipe name {spec.name!r} is also used by {owner[spec.name]}"))
        else:
            try:
                _add_recipe(project, spec)
            except MergeDagError as e:
                broken.append((f, str(e) if str(f) in str(e) else f"{f}: {e}"))
            except Exception as e:  # noqa: BLE001 - one recipe's surprise never takes the others down
                broken.append((f, f"{f}: {type(e).__name__}: {e}"))
    for f, error in broken:
        name = asset_name(f.stem)
        n = 1
        while name in project.recipes or name in project.broken:
            n += 1
            name = f"{asset_name(f.stem)}_{n}"
        project.broken[name] = BrokenRecipe(name, f, error)
    return project


_TABLES = (
    "recipes",
    "models",
    "task_vectors",
    "model_evals",
    "calibrations",
    "activations",
    "grams",
    "fishers",
    "sensitivities",
    "importances",
    "alignments",
)


def _add_recipe(project: Project, spec: RecipeSpec) -> None:
    """Register one recipe and everything it names, or (on a clash) nothing at all."""
    saved = {t: dict(getattr(project, t)) for t in _TABLES}
    saved["model_evals"] = {k: list(v) for k, v in project.model_evals.items()}
    try:
        _register(project, spec)
    except BaseException:
        for t, value in saved.items():
            setattr(project, t, value)
        raise


def _register(project: Project, spec: RecipeSpec) -> None:
    f, name, base, experts = spec.file, spec.name, spec.base, spec.experts
    project.recipes[name] = spec
    for m in spec.members:
        known = project.models.get(m.name)
        if known is not None and (known.path, known.base) != (m.path, m.base):
            raise RecipeError(f"{f}: model {m.ref!r} maps to asset name {m.name!r}, already used by {known.path}")
        project.models[m.name] = m
        if spec.evals:
            tasks = project.model_evals.setdefault(m.name, [])
            tasks.extend(t for t in spec.evals if t not in tasks)
    if spec.uses_task_vectors:
        for e in experts:
            if not e.is_adapter:  # an adapter's delta is computed per tensor inside the merge
                project.task_vectors[project.tv_name(base, e)] = (base, e)
    register_guidance(project, spec)


def register_guidance(project: Project, spec: RecipeSpec) -> dict[str, list]:
    """Register the statistics `spec`'s guidance needs; returns them by role for the merge's deps."""
    g = spec.guidance
    need: dict[str, list] = {
        "importance": [],
        "sensitivity": [],
        "grams": [],
        "aim": [],
        "alignment": [],
        "fishers": [],
    }
    if g is None:
        return need
    rows = g.row_options
    if g.sparsity is not None:
        seq = g.sparsity.wanda_sparsity if g.sparsity.sequential else None
        need["importance"] = [
            project.importance(spec.base, e, spec.sparsity_calibration(e), seq, g.sparsity.clip_quantile, **rows)
            for e in spec.experts
        ]
    if g.coefficients is not None:
        need["sensitivity"] = [project.stats("sensitivities", e, spec.own_calibration(e), **rows) for e in spec.experts]
        for e in spec.experts:  # the alignment reads every expert on every other's texts
            project.calibrations.setdefault(spec.own_calibration(e).name, spec.own_calibration(e))
        if g.coefficients.alignment and len(spec.experts) > 1:
            need["alignment"] = [project.alignment(need["sensitivity"])]
    if g.aim is not None:
        need["aim"] = [project.stats("activations", spec.base, spec.calibration(c), **rows) for c in g.aim.calibrations]
    if g.regmean is not None:
        need["grams"] = [project.stats("grams", m, spec.own_calibration(m), **rows) for m in spec.members]
    if g.fisher is not None:  # the experts only: with a base_model the base is the prior, with no pass of its own
        est = g.fisher.estimator
        need["fishers"] = [
            project.stats("fishers", e, spec.own_calibration(e), estimator=est, **rows) for e in spec.experts
        ]
    return need
