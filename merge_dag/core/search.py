"""Search recipes: tune a merge recipe's numbers with Optuna on validation evals (pure: no Dagster).

    # <data>/searches/ta_lambda.yaml
    recipe: task_arithmetic              # a recipe under <data>/recipes (its name or file stem), or a path
    parameters:                          # path in the recipe -> range
      parameters.lambda: {low: 0.2, high: 1.5}
      models[arev].parameters.weight: {low: 0.5, high: 1.5, step: 0.1}
      guidance.sparsity.gamma: {low: 0.1, high: 0.5, log: true}
      parameters.density: {choices: [0.3, 0.5, 0.7]}
    objective:
      tasks: [zoo_arev_val, zoo_sort_val]   # lm-eval tasks on a *validation* split (default: the recipe's evals)
      metric: exact_match                # default: each task's first metric
      aggregate: mean                    # mean | min | weighted (with `weights`) | pareto (one objective per task)
      weights: {zoo_arev_val: 2.0}       # weighted only; tasks left out weigh 1
      not_below_base: false              # a trial with any task below the base's score is infeasible
    optimizer: tpe                       # tpe (default) | cmaes | nsga2 | random
    seed: 0
    budget:
      trials: 20                         # finished trials in the study (completed or pruned)
      wall_time: 3600                    # seconds of this run
      halving: {rows: 16, fraction: 0.25}   # successive halving: every trial first on 16 examples per
                                         # task; the full evaluation only for the top quarter so far
    keep_best: 3                         # merged trial checkpoints kept (the others are deleted)
    report: [zoo_arev, zoo_sort]         # test-split tasks: the best recipe only, once, after the search

A parameter path is dotted keys into the recipe's YAML; ``models[i]`` picks the i-th models entry
(0-based, after glob expansion), ``models[ref]`` the entry whose model is ``ref`` or whose folder
is named ``ref``. Paths under ``parameters`` (the recipe's or an entry's) may name any parameter of
the method; any other path must already exist in the recipe (``guidance.sparsity.gamma`` needs a
``guidance.sparsity`` block). Both ends of every range are applied to the recipe and validated at
load time, so a value the method refuses is reported before any trial runs.

A trial's key is the sha256 of its resolved recipe (canonical JSON, without `name`): two trials
with the same parameters are the same key, merged and evaluated once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MergeDagError, SearchError
from .recipe import Recipe, _fmt_loc, parse_recipe, read_recipe_yaml

AGGREGATES = ("mean", "min", "weighted", "pareto")
OPTIMIZERS = ("tpe", "cmaes", "nsga2", "random")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Range(_Strict):
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = Field(default=None, gt=0)
    log: bool = False
    choices: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _shape(self) -> "Range":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either `choices` or `low`/`high` (with optional `step`, `log`), not both")
            if not self.choices:
                raise ValueError("`choices` is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give `low` and `high` (or `choices`)")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("`step` and `log: true` cannot be combined (Optuna)")
        return self

    def ends(self) -> list[Any]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class Objective(_Strict):
    tasks: list[str] = Field(default_factory=list)
    metric: Optional[str] = None
    aggregate: str = "mean"
    weights: dict[str, float] = Field(default_factory=dict)
    not_below_base: bool = False

    @field_validator("aggregate")
    @classmethod
    def _aggregate(cls, v: str) -> str:
        if v not in AGGREGATES:
            raise ValueError(f"must be one of {', '.join(AGGREGATES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Objective":
        if self.weights and self.aggregate != "weighted":
            raise ValueError("`weights` is only used with aggregate: weighted")
        return self


class Halving(_Strict):
    """Successive halving (Optuna's SuccessiveHalvingPruner, one rung): each trial is evaluated on
    the first `rows` examples of every objective task; it gets the full evaluation only when that
    small-subset objective is among the best `fraction` of all trials' small-subset objectives so far
    (reduction factor eta = round(1 / fraction); while fewer than eta trials compete, only the best
    so far is promoted). Trials not promoted are Optuna's PRUNED trials."""

    rows: int = Field(ge=1)
    fraction: float = Field(default=0.25, gt=0, le=0.5)

    @property
    def eta(self) -> int:
        return max(2, round(1 / self.fraction))


class Budget(_Strict):
    trials: int = Field(default=20, ge=1)
    wall_time: Optional[float] = Field(default=None, gt=0)  # seconds
    halving: Optional[Halving] = None


class SearchFile(_Strict):
    name: Optional[str] = None
    recipe: str
    parameters: dict[str, Range]
    objective: Objective = Field(default_factory=Objective)
    optimizer: str = "tpe"
    seed: int = 0
    budget: Budget = Field(default_factory=Budget)
    keep_best: int = Field(default=3, ge=1)
    report: list[str] = Field(default_factory=list)  # test-split tasks: the best recipe, once, after the search

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"must be one of {', '.join(OPTIMIZERS)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SearchFile":
        if not self.parameters:
            raise ValueError("no parameters to search")
        if self.optimizer == "nsga2" and self.objective.aggregate != "pareto":
            self.objective.aggregate = "pareto"  # NSGA-II optimizes every task's score at once
        if self.objective.aggregate == "pareto" and self.optimizer == "cmaes":
            raise ValueError("cmaes optimizes one objective; use nsga2 (or tpe) for aggregate: pareto")
        if self.budget.halving is not None and self.objective.aggregate == "pareto":
            raise ValueError(
                "budget.halving needs one objective (Optuna prunes single-objective studies only); "
                "use aggregate mean, min or weighted, or drop halving"
            )
        return self


@dataclass
class Search:
    """A validated search: the base recipe (globs expanded) and where each parameter goes."""

    name: str
    file: Path
    spec: SearchFile
    recipe_file: Path
    base: dict  # the base recipe as YAML data (Recipe.to_yaml_dict)
    root: Optional[Path]
    paths: dict[str, list[Any]] = field(default_factory=dict)  # parameter path as written -> resolved keys

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.objective.tasks)

    def resolve(self, values: dict[str, Any]) -> dict:
        """The trial recipe (YAML data) with `values` (parameter path -> value) set."""
        data = copy.deepcopy(self.base)
        for path, value in values.items():
            _set(data, self.paths[path], value)
        data["evals"] = self.tasks
        return data

    def check(self, data: dict, where: str) -> Recipe:
        """Parse and validate a trial recipe (a RecipeError names `where`)."""
        return parse_recipe(data, where=where, source_path=self.recipe_file, root=self.root)


def trial_key(data: dict) -> str:
    """sha256 of the resolved recipe, canonical JSON without `name` (what the trial merges)."""
    body = {k: v for k, v in data.items() if k != "name"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _split_path(path: str) -> list[Any]:
    """`models[arev].parameters.weight` -> ['models', ('sel', 'arev'), 'parameters', 'weight']."""
    out: list[Any] = []
    for part in path.split("."):
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\]]+\])*)", part)
        if not m:
            raise ValueError(f"cannot read path part {part!r} (write keys.separated.by.dots, models[0] or models[ref])")
        out.append(m.group(1))
        out += [("sel", s) for s in re.findall(r"\[([^\]]+)\]", m.group(2))]
    return out


def _resolve_path(base: dict, path: str) -> list[Any]:
    """The concrete keys (str for mappings, int for lists) of a parameter path in the base recipe."""
    parts = _split_path(path)
    keys: list[Any] = []
    node: Any = base
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if isinstance(part, tuple):
            if not isinstance(node, list):
                raise ValueError(f"{_show(keys)} is not a list")
            sel = part[1]
            if re.fullmatch(r"-?\d+", sel):
                i = int(sel)
                if not -len(node) <= i < len(node):
                    raise ValueError(f"{_show(keys)} has {len(node)} entries, no [{i}]")
                i %= len(node)
            else:
                hits = [
                    j
                    for j, e in enumerate(node)
                    if isinstance(e, dict)
                    and isinstance(e.get("model"), str)
                    and (e["model"] == sel or Path(e["model"].split("+")[-1]).name == sel)
                ]
                if len(hits) != 1:
                    names = [e.get("model") for e in node if isinstance(e, dict)]
                    what = "no entry" if not hits else "more than one entry"
                    raise ValueError(f"{_show(keys)} has {what} for [{sel}] (entries: {', '.join(map(str, names))})")
                i = hits[0]
            keys.append(i)
            node = node[i]
            if last:
                raise ValueError("a path must end at a value, not a list entry")
            continue
        if not isinstance(node, dict):
            raise ValueError(f"{_show(keys)} is not a mapping")
        in_params = bool(keys) and keys[-1] == "parameters"
        if part not in node and not (last and in_params):
            if part == "parameters" and not last:  # an entry without parameters yet
                node[part] = {}
            else:
                raise ValueError(f"the recipe has no {_show(keys + [part])}")
        keys.append(part)
        if not last:
            node = node[part]
        elif isinstance(node.get(part), (dict, list)) and not in_params:
            raise ValueError(f"{_show(keys)} is a block, not a value")
    return keys


def _show(keys: list[Any]) -> str:
    return _fmt_loc(tuple(keys)) or "the recipe"


def _set(data: dict, keys: list[Any], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if isinstance(node, dict) and k not in node:
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _read_yaml(p: Path) -> Any:
    from .errors import RecipeError

    try:
        return read_recipe_yaml(p)
    except RecipeError as e:
        raise SearchError(str(e).replace("recipe", "search file", 1)) from None


def searches_dir(data: Path) -> Path:
    return Path(data) / "searches"


def find_search(data: Path, name: str) -> Path:
    """A search by name (<data>/searches/<name>.yaml) or path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    for ext in (".yaml", ".yml"):
        f = searches_dir(data) / f"{name}{ext}"
        if f.exists():
            return f
    raise SearchError(f"{searches_dir(data) / (name + '.yaml')}: search file does not exist")


def _find_recipe(ref: str, data: Path, root: Optional[Path], where: Path) -> Path:
    p = Path(os.path.expanduser(ref))
    tries = [p] if p.is_absolute() else [(root or Path.cwd()) / p, where.parent / p]
    if p.suffix not in (".yaml", ".yml"):
        tries = [Path(data) / "recipes" / f"{ref}{ext}" for ext in (".yaml", ".yml")] + tries
    for t in tries:
        if t.is_file():
            return t.absolute()
    # a recipe whose `name:` differs from its file stem
    for f in sorted((Path(data) / "recipes").glob("*.y*ml")):
        try:
            d = read_recipe_yaml(f)
        except MergeDagError:
            continue
        if isinstance(d, dict) and d.get("name") == ref:
            return f.absolute()
    raise SearchError(f"{where}: recipe: no recipe {ref!r} (not in {Path(data) / 'recipes'}, not a file)")


def load_search(path: str | os.PathLike, data: str | os.PathLike, root: Optional[Path] = None) -> Search:
    """Read and validate a search file; every problem is one SearchError naming the file and key."""
    p = Path(path)
    raw = _read_yaml(p)
    if not isinstance(raw, dict):
        raise SearchError(f"{p}: a search file must be a YAML mapping, got {type(raw).__name__}")
    try:
        spec = SearchFile.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _fmt_loc(tuple(err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            lines.append(f"{p}: {loc}: {msg}" if loc else f"{p}: {msg}")
        raise SearchError("\n".join(lines)) from None
    name = spec.name or p.stem
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", name):
        raise SearchError(f"{p}: name: {name!r} must be letters, digits, _ and - only")
    recipe_file = _find_recipe(spec.recipe, Path(data), root, p)
    recipe = parse_recipe(read_recipe_yaml(recipe_file), where=str(recipe_file), source_path=recipe_file, root=root)
    base = recipe.to_yaml_dict()
    base.pop("name", None)
    search = Search(name, p, spec, recipe_file, base, root)
    if not spec.objective.tasks:
        if not recipe.evals:
            raise SearchError(f"{p}: objective.tasks: no tasks given and recipe {recipe_file} has no evals")
        spec.objective.tasks = list(recipe.evals)
    for i, t in enumerate(spec.report):
        if t in spec.objective.tasks:
            raise SearchError(f"{p}: report[{i}]: {t!r} is also an objective task (its scores would choose the trial)")
    for t in spec.objective.weights:
        if t not in spec.objective.tasks:
            raise SearchError(f"{p}: objective.weights.{t}: not one of the objective's tasks")
    for path, rng in spec.parameters.items():
        try:
            search.paths[path] = _resolve_path(search.base, path)
        except ValueError as e:
            raise SearchError(f"{p}: parameters.{path}: {e}") from None
        if spec.optimizer == "cmaes" and rng.choices is not None:
            raise SearchError(f"{p}: parameters.{path}: cmaes searches numbers only (no `choices`)")
    # both ends of every range (each alone, the others at the recipe's values) make a valid recipe
    for path, rng in spec.parameters.items():
        for value in rng.ends():
            try:
                search.check(search.resolve({path: value}), str(recipe_file))
            except MergeDagError as e:
                first = str(e).splitlines()[0].replace(f"{recipe_file}: ", "")
                raise SearchError(f"{p}: parameters.{path}: value {value!r} makes an invalid recipe: {first}") from None
    return search


def aggregate(objective: Objective, scores: dict[str, float]) -> list[float]:
    """The objective value(s) of a trial from its per-task scores (pareto: one per task, in order).

    mean:     (1/T) sum_t s_t
    min:      min_t s_t
    weighted: sum_t w_t s_t / sum_t w_t   (w_t = 1 unless given)
    """
    vals = [scores[t] for t in objective.tasks]
    if objective.aggregate == "pareto":
        return vals
    if objective.aggregate == "min":
        return [min(vals)]
    if objective.aggregate == "weighted":
        w = [objective.weights.get(t, 1.0) for t in objective.tasks]
        return [sum(a * b for a, b in zip(w, vals)) / sum(w)]
    return [sum(vals) / len(vals)]


def pareto_front(points: list[list[float]]) -> list[int]:
    """Indices of the non-dominated points (every coordinate maximized): p is dominated when some
    q has q_i >= p_i for every i and q_j > p_j for some j. Equal points are all on the front."""
    out = []
    for i, p in enumerate(points):
        if not any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for q in points):
            out.append(i)
    return out


def task_scores(metrics: list, tasks: list[str], metric: Optional[str], where: str) -> dict[str, float]:
    """Each task's score from an eval artifact's metrics rows [task, metric, value, stderr, n]."""
    out: dict[str, float] = {}
    for t in tasks:
        rows = [r for r in metrics if r[0] == t and (metric is None or r[1] == metric)]
        if not rows:
            raise SearchError(f"{where}: objective: task {t!r} has no {'metric ' + metric if metric else 'metric'}")
        v = float(rows[0][2])
        out[t] = v if math.isfinite(v) else float("-inf")
    return out


def dump_recipe(data: dict) -> str:
    """A recipe's YAML text (key order as the recipe model has it)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


__all__ = [
    "Search",
    "SearchError",
    "aggregate",
    "dump_recipe",
    "find_search",
    "load_search",
    "pareto_front",
    "trial_key",
]
