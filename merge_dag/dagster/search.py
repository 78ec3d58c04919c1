"""Run a search (merge_dag.core.search) on the cached asset graph: Optuna proposes, Dagster builds.

Each new trial is one in-process Dagster run of a project holding only the trial's recipe
(`<data>/searches/<name>/trials/<key>.yaml`, recipe name `<name>_<key[:12]>`): its sources are
observed, its task vectors and statistics are the ordinary cached assets (cache hits after the first
trial), then `merged/<name>_<key>` and `eval/merged/<name>_<key>` (and, for `not_below_base`, the
base's own `eval/model/<base>`, cached). Every step goes through steps.run_step, so every trial is in
lineage and in the Dagster UI (runs tagged `merge_dag/search` and `merge_dag/trial`).

The Optuna study lives in `<data>/searches/<name>/study.db` (SQLite): a search that stops (budget,
Ctrl-C, a crash) resumes from it; trials still marked running are marked failed and proposed again
by the sampler if it wants them. A trial whose resolved recipe has the key of a completed trial is
told that trial's score and merges nothing.

At the end, `search/<name>` is materialized: an artifact holding `best.yaml` (a normal recipe) and
`trials.json`, with edges to the best trial's merged model and to every trial's evaluation; the
best recipe is also copied to `<data>/searches/<name>/best.yaml`. Merged trial checkpoints other
than the best `keep_best` are deleted (their lineage rows stay; a later identical trial rebuilds).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg

from ..core.errors import SearchError
from ..core.search import Search, aggregate, dump_recipe, find_search, load_search, task_scores, trial_key
from ..project import Project, _add_recipe, asset_name, recipe_spec
from .resources import MergeDagResource, resource_from_env

STUDY_FILE = "study.db"
MAX_FAILURES = 3  # trials in a row whose run fails: the search stops (one failure does not)
_SET_CONSTRAINT = hasattr(__import__("optuna").trial.Trial, "set_constraint")


@dataclass
class TrialResult:
    number: int
    key: str
    params: dict[str, Any]
    scores: dict[str, float]
    values: list[float]
    feasible: bool
    recipe: str  # the trial's recipe name (merged/<recipe>)
    merged: Optional[dict] = None  # artifact_id, key, path of the merged checkpoint
    eval: Optional[dict] = None  # artifact_id, key of its evaluation
    output_fingerprint: Optional[str] = None
    duplicate_of: Optional[int] = None
    run_id: Optional[str] = None


@dataclass
class SearchResult:
    name: str
    trials: list[TrialResult]
    best: Optional[TrialResult]
    best_file: Optional[Path]
    new_trials: int
    seconds: float
    removed: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    report: Optional[dict] = None  # the best recipe's scores on the report tasks (and the base's)


def search_dir(res: MergeDagResource, name: str) -> Path:
    return res.data_path / "searches" / name


def _sampler(search: Search, seed: int, constrained: bool):
    import optuna

    spec = search.spec
    # Optuna 5 reads constraints set on the trial (Trial.set_constraint); Optuna 4 asks a function
    cons = (lambda t: t.user_attrs.get("constraint", [0.0])) if constrained and not _SET_CONSTRAINT else None
    if spec.optimizer == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if spec.optimizer == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cons)
    if spec.optimizer == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constraints_func=cons)


def _distributions(search: Search) -> dict:
    import optuna.distributions as od

    out = {}
    for path, r in search.spec.parameters.items():
        if r.choices is not None:
            out[path] = od.CategoricalDistribution(r.choices)
        elif r.step is not None:
            out[path] = od.FloatDistribution(r.low, r.high, step=r.step)
        else:
            out[path] = od.FloatDistribution(r.low, r.high, log=r.log)
    return out


def _trial_project(res: MergeDagResource, search: Search, data: dict, key: str) -> tuple[Project, str, Path]:
    """A project holding only the trial's recipe (written under the search's folder)."""
    rname = asset_name(f"{search.name}_{key[:12]}")
    folder = search_dir(res, search.name) / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"{key[:16]}.yaml"
    if not f.exists():
        tmp = f.with_suffix(".yaml.tmp")
        tmp.write_text(dump_recipe({"name": rname, **data}))
        tmp.replace(f)
    project = Project(root=res.root_path.absolute(), data=res.data_path)
    spec = recipe_spec(project.root, f)
    _add_recipe(project, spec)
    for m in list(project.model_evals):  # only the base's baseline is needed (not_below_base)
        if spec.base is None or m != spec.base.name:
            del project.model_evals[m]
    return project, rname, f


def _execute(job, instance, tags: dict, quiet: bool, raise_on_error: bool = False):
    """Run `job` in process; `quiet`: one line per asset (the demo's progress logger) instead of
    Dagster's console log."""
    run_config = None
    if quiet:
        from ..commands.demo import progress_logger_def

        job = job.with_logger_defs({"progress": progress_logger_def()})
        run_config = {"loggers": {"progress": {}}}
    return job.execute_in_process(instance=instance, raise_on_error=raise_on_error, tags=tags, run_config=run_config)


def _materialize(
    project: Project, res: MergeDagResource, instance, keys: list[list[str]], tags: dict, quiet: bool = False
):
    """One trial's run: `keys` and everything upstream of them, with every source observed first.
    `quiet`: one line per asset (the demo's progress logger) instead of Dagster's console log."""
    from .definitions import build_definitions

    defs = build_definitions(project=project, resource=res)
    selection = dg.AssetSelection.assets(*[dg.AssetKey(k) for k in keys]).upstream()
    sources = dg.AssetSelection.all(include_sources=True) - dg.AssetSelection.all()
    # the merge's soundness checks run (blocking); the score checks compare with whatever baseline
    # evaluation ran last and are the search's own business (its objective and `not_below_base`)
    soundness = ("loads_and_matches_base", "embeddings_sane")
    score_checks = [k for c in defs.asset_checks or [] for k in c.check_keys if k.name not in soundness]
    job = dg.define_asset_job("search_trial", selection=(selection | sources) - dg.AssetSelection.checks(*score_checks))
    defs = dg.Definitions(
        assets=list(defs.assets or []),
        asset_checks=list(defs.asset_checks or []),
        jobs=[job],
        resources=dict(defs.resources or {}),
    )
    result = _execute(defs.resolve_job_def("search_trial"), instance, tags, quiet)
    mats = {}
    for ev in result.get_asset_materialization_events():
        m = ev.event_specific_data.materialization
        md = m.metadata
        mats[tuple(m.asset_key.path)] = {
            k: md[k].value for k in ("artifact_id", "key", "path", "output_fingerprint") if k in md
        }
    return result, mats


def _metrics(res: MergeDagResource, eval_art: dict) -> list:
    from ..artifacts import read_json
    from .steps import META_FILE, resolve_path

    info = read_json(Path(resolve_path(res.root, eval_art["path"])) / META_FILE) or {}
    return info.get("metrics", [])


def _known(study) -> dict[str, Any]:
    import optuna

    return {
        t.user_attrs["key"]: t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "key" in t.user_attrs and t.user_attrs.get("duplicate_of") is None
    }


def _result(t) -> TrialResult:
    a = t.user_attrs
    return TrialResult(
        number=t.number,
        key=a["key"],
        params=dict(t.params),
        scores=a.get("scores", {}),
        values=list(t.values or []),
        feasible=a.get("feasible", True),
        recipe=a.get("recipe", ""),
        merged=a.get("merged"),
        eval=a.get("eval"),
        output_fingerprint=a.get("output_fingerprint"),
        duplicate_of=a.get("duplicate_of"),
        run_id=a.get("run_id"),
    )


def rank_key(search: Search, t: TrialResult) -> tuple:
    """Higher is better: feasible first, then the objective (pareto: the mean over tasks)."""
    v = t.values[0] if len(t.values) == 1 else (sum(t.values) / len(t.values) if t.values else -math.inf)
    return (t.feasible, v, -t.number)


def run_search(
    root: str | Path,
    name: str,
    *,
    data: str | Path | None = None,
    resource: Optional[MergeDagResource] = None,
    instance: Optional[dg.DagsterInstance] = None,
    trials: Optional[int] = None,
    log: Callable[[str], None] = print,
    quiet: bool = False,
) -> SearchResult:
    """Run (or resume) the search `name` (<data>/searches/<name>.yaml, or a path) until its study
    holds `trials` (default: the file's budget) completed trials or the wall time is spent. Without
    an `instance`, runs go to the project's DAGSTER_HOME (as `merge-dag demo`'s do)."""
    if instance is not None:
        return _run_search(root, name, data, resource, instance, trials, log, quiet)
    res = resource or resource_from_env(root, data)
    from ..commands.home import ensure_dagster_home

    ensure_dagster_home(res.root_path.absolute())
    with dg.DagsterInstance.get() as instance:
        return _run_search(root, name, data, res, instance, trials, log, quiet)


def _run_search(root, name, data, resource, instance, trials, log, quiet) -> SearchResult:
    import optuna

    t0 = time.perf_counter()
    res = resource or resource_from_env(root, data)
    root_path = res.root_path.absolute()
    search = load_search(find_search(res.data_path, name), res.data_path, root_path)
    spec = search.spec
    if spec.optimizer == "cmaes":
        try:
            import cmaes  # noqa: F401 - Optuna's CmaEsSampler imports it at the first CMA-ES proposal
        except ImportError:
            need = "needs the `cmaes` package (pip install cmaes)"
            raise SearchError(f"{search.file}: optimizer: cmaes {need}") from None
    budget = trials if trials is not None else spec.budget.trials
    folder = search_dir(res, search.name)
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / STUDY_FILE}"
    pareto = spec.objective.aggregate == "pareto"
    directions = ["maximize"] * (len(search.tasks) if pareto else 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the sampler's seed moves on with the study, so a resumed search does not replay its first proposals
    probe = optuna.create_study(study_name=search.name, storage=storage, load_if_exists=True, directions=directions)
    if list(probe.directions) != [optuna.study.StudyDirection.MAXIMIZE] * len(directions):
        raise SearchError(
            f"{search.file}: objective: the stored study {folder / STUDY_FILE} has "
            f"{len(probe.directions)} objective(s), this file {len(directions)}; remove the study to start over"
        )
    stale = [t for t in probe.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:  # interrupted earlier: failed, so the budget counts only finished trials
        probe.tell(t.number, state=optuna.trial.TrialState.FAIL)
    seed = spec.seed + len(probe.trials)
    study = optuna.load_study(
        study_name=search.name,
        storage=storage,
        sampler=_sampler(search, seed, spec.objective.not_below_base),
    )
    dists = _distributions(search)
    done = lambda: len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))  # noqa: E731
    new, run_ids, failures = 0, [], 0
    base_scores: Optional[dict[str, float]] = None
    while done() < budget:
        if spec.budget.wall_time is not None and time.perf_counter() - t0 > spec.budget.wall_time:
            log(f"search {search.name}: wall time {spec.budget.wall_time:.0f} s spent; stopping (resume later)")
            break
        trial = study.ask(dists)
        data_ = search.resolve(dict(trial.params))
        key = trial_key(data_)
        trial.set_user_attr("key", key)
        known = _known(study)
        if key in known:
            prev = known[key]
            for k in ("scores", "feasible", "recipe", "merged", "eval", "output_fingerprint", "constraint"):
                if k in prev.user_attrs:
                    trial.set_user_attr(k, prev.user_attrs[k])
            trial.set_user_attr("duplicate_of", prev.number)
            if _SET_CONSTRAINT and "constraint" in prev.user_attrs and spec.objective.not_below_base:
                trial.set_constraint("below_base", prev.user_attrs["constraint"][0])
            study.tell(trial, prev.values)
            log(f"trial {trial.number}: same recipe as trial {prev.number} ({key[:12]}); not merged again")
            continue
        try:
            project, rname, _ = _trial_project(res, search, data_, key)
        except Exception as e:  # noqa: BLE001 - a bad proposal fails its trial, not the search
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"trial {trial.number}: recipe refused: {str(e).splitlines()[0]}")
            failures += 1
            if failures >= MAX_FAILURES:
                last = str(e).splitlines()[0]
                raise SearchError(f"{search.file}: {failures} trials in a row failed (last: {last})") from None
            continue
        spec_ = project.recipes[rname]
        keys = [["merged", rname], ["eval", "merged", rname]]
        want_base = spec.objective.not_below_base and spec_.base is not None
        if want_base:
            keys.append(["eval", "model", spec_.base.name])
        tags = {"merge_dag/search": search.name, "merge_dag/trial": str(trial.number)}
        log(f"trial {trial.number}: {trial.params} ({rname})")
        result, mats = _materialize(project, res, instance, keys, tags, quiet)
        run_ids.append(result.run_id)
        new += 1
        ev = mats.get(("eval", "merged", rname))
        if ev is None:  # the merge, a blocking check or the evaluation failed
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            failures += 1
            if failures >= MAX_FAILURES:
                raise SearchError(
                    f"{search.file}: {failures} trials in a row failed (last: run {result.run_id}); "
                    "see the Dagster runs tagged merge_dag/search"
                )
            log(f"trial {trial.number}: run {result.run_id[:8]} failed; see the Dagster run")
            continue
        scores = task_scores(_metrics(res, ev), search.tasks, spec.objective.metric, str(search.file))
        values = aggregate(spec.objective, scores)
        feasible, constraint = True, [0.0]
        if want_base:
            if base_scores is None:
                bev = mats[("eval", "model", spec_.base.name)]
                base_scores = task_scores(_metrics(res, bev), search.tasks, spec.objective.metric, str(search.file))
            gap = max(base_scores[t] - scores[t] for t in search.tasks)
            feasible, constraint = gap <= 0, [float(gap)]
        merged = mats[("merged", rname)]
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("constraint", constraint)
        if _SET_CONSTRAINT and want_base:
            trial.set_constraint("below_base", constraint[0])
        trial.set_user_attr("recipe", rname)
        trial.set_user_attr("merged", {k: merged[k] for k in ("artifact_id", "key", "path") if k in merged})
        trial.set_user_attr("output_fingerprint", merged.get("output_fingerprint"))
        trial.set_user_attr("eval", {k: ev[k] for k in ("artifact_id", "key") if k in ev})
        trial.set_user_attr("run_id", result.run_id)
        study.tell(trial, values)
        failures = 0
        shown = ", ".join(f"{t} {v:.3f}" for t, v in scores.items())
        objective = ", ".join(f"{v:.4f}" for v in values)
        log(f"trial {trial.number}: {shown} -> {objective}{'' if feasible else ' (below base)'}")
    results = [_result(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    best = max(results, key=lambda t: rank_key(search, t)) if results else None
    out = SearchResult(search.name, results, best, None, new, 0.0, run_ids=run_ids)
    if best is not None:
        out.best_file, out.removed, rids, out.report = _finish(search, res, instance, results, best, quiet)
        out.run_ids += rids
    out.seconds = time.perf_counter() - t0
    return out


def best_recipe(search: Search, res: MergeDagResource, best: TrialResult) -> dict:
    """The best trial's recipe as a normal recipe (name `<search>_best`, the same merge)."""
    f = search_dir(res, search.name) / "trials" / f"{best.key[:16]}.yaml"
    from ..core.recipe import read_recipe_yaml

    data = read_recipe_yaml(f)
    return {"name": asset_name(f"{search.name}_best"), **{k: v for k, v in data.items() if k != "name"}}


def _finish(search: Search, res: MergeDagResource, instance, results: list[TrialResult], best: TrialResult, quiet):
    """Write the best recipe, evaluate it once on the `report` tasks (never used to choose),
    materialize search/<name> (best recipe, trials table, lineage to every trial) and delete merged
    trial checkpoints other than the best `keep_best`."""
    from .assets.search import search_asset
    from .steps import resolve_path

    recipe = best_recipe(search, res, best)
    if search.spec.report:
        recipe["evals"] = list(search.spec.report)
    text = (
        f"# best of search {search.name} (trial {best.number}, validation objective "
        f"{', '.join(f'{v:.4f}' for v in best.values)}); merge with `merge-dag merge`\n" + dump_recipe(recipe)
    )
    best_file = search_dir(res, search.name) / "best.yaml"
    tmp = best_file.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(best_file)
    report, run_ids = None, []
    if search.spec.report:
        report, rid = _report(search, res, instance, best_file, quiet)
        run_ids.append(rid)
    ranked = sorted([t for t in results if t.duplicate_of is None], key=lambda t: rank_key(search, t), reverse=True)
    keep = {t.key for t in ranked[: search.spec.keep_best]}
    removed = []
    for t in ranked:
        if t.key in keep or not t.merged or not t.merged.get("path"):
            continue
        p = Path(resolve_path(res.root, t.merged["path"]))
        if p.is_dir() and p.is_relative_to(res.store().root):  # only the artifact store's own folders
            shutil.rmtree(p)
            removed.append(str(t.merged["path"]))
    objective = [rank_key(search, t)[1] for t in results]
    asset = search_asset(search, recipe, text, results, best, removed, objective, trials_json(results), report)
    defs = dg.Definitions(
        assets=[asset],
        jobs=[dg.define_asset_job("search_result", selection=dg.AssetSelection.assets(asset))],
        resources={"merge_dag": res},
    )
    result = _execute(
        defs.resolve_job_def("search_result"), instance, {"merge_dag/search": search.name}, quiet, raise_on_error=True
    )
    run_ids.append(result.run_id)
    return best_file, removed, run_ids, report


def _report(search: Search, res: MergeDagResource, instance, best_file: Path, quiet: bool):
    """The best recipe (as written: `<name>_best`) merged and evaluated on the report tasks, with
    the base's scores on them: the test-split numbers, computed once after the search."""
    project = Project(root=res.root_path.absolute(), data=res.data_path)
    spec = recipe_spec(project.root, best_file)
    _add_recipe(project, spec)
    keys = [["merged", spec.name], ["eval", "merged", spec.name]]
    base = spec.base.name if spec.base is not None else None
    for m in list(project.model_evals):
        if m != base:
            del project.model_evals[m]
    if base:
        keys.append(["eval", "model", base])
    tags = {"merge_dag/search": search.name, "merge_dag/trial": "report"}
    result, mats = _materialize(project, res, instance, keys, tags, quiet)
    ev = mats.get(("eval", "merged", spec.name))
    if ev is None:
        raise SearchError(f"{best_file}: the report run {result.run_id} failed; see the Dagster run")
    where, metric = str(search.file), search.spec.objective.metric
    out = {
        "tasks": list(search.spec.report),
        "scores": task_scores(_metrics(res, ev), search.spec.report, metric, where),
        "eval": {k: ev[k] for k in ("artifact_id", "key") if k in ev},
        "output_fingerprint": mats[("merged", spec.name)].get("output_fingerprint"),
        "run_id": result.run_id,
    }
    if base:
        out["base_scores"] = task_scores(
            _metrics(res, mats[("eval", "model", base)]), search.spec.report, metric, where
        )
    return out, result.run_id


def trials_json(results: list[TrialResult]) -> str:
    return json.dumps([t.__dict__ for t in results], indent=2, default=str) + "\n"
