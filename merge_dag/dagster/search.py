"""Run a search (merge_dag.core.search) on the cached asset graph: Optuna proposes, Dagster builds.

Each new trial is one in-process Dagster run of a project holding only the trial's recipe
(`<data>/searches/<name>/trials/<key>.yaml`, recipe name `<name>_<key[:12]>`): its sources are
observed, its task vectors and statistics are the ordinary cached assets (cache hits after the first
trial), then `merged/<name>_<key>` and `eval/merged/<name>_<key>` (and, for `not_below_base`, the
base's own `eval/model/<base>`, cached). Every step goes through steps.run_step, so every trial is in
lineage and in the Dagster UI (runs tagged `merge_dag/search` and `merge_dag/trial`).

After each new trial its record (`trials/<key[:16]>.json`) is written and its partition of
`search_trial/<name>` (dynamic partitions keyed by the recipe hash) is added and materialized: the
UI shows every trial with its recipe, merged model, scores and the cache hits of its runs. With
`budget.halving`, a trial's first run evaluates the first `rows` prompts per task; Optuna's
SuccessiveHalvingPruner decides whether a second run evaluates it in full (else it is PRUNED).

The Optuna study lives in `<data>/searches/<name>/study.db` (SQLite): a search that stops (budget,
Ctrl-C, a crash) resumes from it; trials still marked running are marked failed and proposed again
by the sampler if it wants them. A trial whose resolved recipe has the key of a completed trial is
told that trial's score and merges nothing.

At the end, `search/<name>` is materialized: an artifact holding `best.yaml` (a normal recipe),
`trials.json` and the charts, with edges to the best trial's merged model and to every trial's
evaluation and record; the
best recipe is also copied to `<data>/searches/<name>/best.yaml`. Merged trial checkpoints other
than the best `keep_best` are deleted (their lineage rows stay; a later identical trial rebuilds).
"""

from __future__ import annotations

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
from .search_state import (
    REMOVED_FILE,
    REPORT_FILE,
    STUDY_FILE,
    TrialResult,
    choose_best,
    load_results,
    partition_key,
    partitions_name,
    rank_key,
    read_json_file,
    record_path,
    search_dir,
    write_json_file,
)

__all__ = ["SearchResult", "TrialResult", "rank_key", "run_search", "search_dir"]

MAX_FAILURES = 3  # trials in a row whose run fails: the search stops (one failure does not)
_SET_CONSTRAINT = hasattr(__import__("optuna").trial.Trial, "set_constraint")


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


def _execute(job, instance, tags: dict, quiet: bool, raise_on_error: bool = False, partition_key=None):
    """Run `job` in process; `quiet`: one line per asset (the demo's progress logger) instead of
    Dagster's console log."""
    run_config = None
    if quiet:
        from ..commands.demo import progress_logger_def

        job = job.with_logger_defs({"progress": progress_logger_def()})
        run_config = {"loggers": {"progress": {}}}
    return job.execute_in_process(
        instance=instance, raise_on_error=raise_on_error, tags=tags, run_config=run_config, partition_key=partition_key
    )


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
    """Finished trials (completed or pruned) by recipe key, duplicates left out."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return {
        t.user_attrs["key"]: t
        for t in study.get_trials(deepcopy=False, states=states)
        if "key" in t.user_attrs and t.user_attrs.get("duplicate_of") is None
    }


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
    halving = spec.budget.halving
    if halving is not None and res.eval_limit and halving.rows >= res.eval_limit:
        log(
            f"search {search.name}: budget.halving.rows {halving.rows} is not below the eval limit "
            f"{res.eval_limit}: every trial gets the full evaluation"
        )
        halving = None
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
    # successive halving: Optuna's own pruner, one rung (the small subset, then the full evaluation)
    pruner = (
        optuna.pruners.SuccessiveHalvingPruner(
            min_resource=halving.rows, reduction_factor=halving.eta, min_early_stopping_rate=0, bootstrap_count=0
        )
        if halving is not None
        else optuna.pruners.NopPruner()
    )
    study = optuna.load_study(
        study_name=search.name,
        storage=storage,
        sampler=_sampler(search, seed, spec.objective.not_below_base),
        pruner=pruner,
    )
    dists = _distributions(search)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = lambda: len(study.get_trials(deepcopy=False, states=finished))  # noqa: E731
    new, run_ids, failures = 0, [], 0
    base_scores: Optional[dict[str, float]] = None
    metric, where = spec.objective.metric, str(search.file)
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
            for k in ("scores", "feasible", "recipe", "merged", "eval", "output_fingerprint", "constraint", "rung"):
                if k in prev.user_attrs:
                    trial.set_user_attr(k, prev.user_attrs[k])
            for k in ("record", "run_id"):
                if k in prev.user_attrs:
                    trial.set_user_attr(k, prev.user_attrs[k])
            trial.set_user_attr("duplicate_of", prev.number)
            log(f"trial {trial.number}: same recipe as trial {prev.number} ({key[:12]}); not merged again")
            if prev.state == optuna.trial.TrialState.PRUNED:
                for step, v in prev.intermediate_values.items():
                    trial.report(v, step)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            if _SET_CONSTRAINT and "constraint" in prev.user_attrs and spec.objective.not_below_base:
                trial.set_constraint("below_base", prev.user_attrs["constraint"][0])
            study.tell(trial, prev.values)
            continue
        try:
            project, rname, rfile = _trial_project(res, search, data_, key)
        except Exception as e:  # noqa: BLE001 - a bad proposal fails its trial, not the search
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"trial {trial.number}: recipe refused: {str(e).splitlines()[0]}")
            failures += 1
            if failures >= MAX_FAILURES:
                last = str(e).splitlines()[0]
                raise SearchError(f"{search.file}: {failures} trials in a row failed (last: {last})") from None
            continue
        spec_ = project.recipes[rname]
        want_base = spec.objective.not_below_base and spec_.base is not None
        tags = {"merge_dag/search": search.name, "merge_dag/trial": str(trial.number)}
        log(f"trial {trial.number}: {trial.params} ({rname})")
        trial.set_user_attr("recipe", rname)
        trial_runs: list[str] = []
        evals: list[dict] = []

        promoted = None
        if halving is not None:
            # a new resource (Dagster runs with a resource's own config; model_copy would not reach it)
            small = type(res)(**{**{k: getattr(res, k) for k in type(res).model_fields}, "eval_limit": halving.rows})
            keys = [["merged", rname], ["eval", "merged", rname]]
            result, mats = _materialize(
                project, small, instance, keys, {**tags, "merge_dag/rows": str(halving.rows)}, quiet
            )
            run_ids.append(result.run_id)
            trial_runs.append(result.run_id)
            new += 1
            if ("eval", "merged", rname) not in mats:
                failures = _failed(study, trial, failures, result, search, log)
                continue
            scores0, ev0, merged = _evaluated(res, search, trial, mats, rname, halving.rows, evals)
            value0 = evals[-1]["value"]
            trial.set_user_attr("rung", {"rows": halving.rows, "scores": scores0, "value": value0, "eval": ev0})
            trial.set_user_attr("run_id", result.run_id)
            trial.report(value0, halving.rows)
            promoted = not trial.should_prune()
            shown = ", ".join(f"{t} {v:.3f}" for t, v in scores0.items())
            log(
                f"trial {trial.number}: first {halving.rows} rows: {shown} -> {value0:.4f}; "
                + ("full evaluation" if promoted else "pruned")
            )
            if not promoted:
                trial.set_user_attr("scores", scores0)
                trial.set_user_attr("feasible", True)
                _record_trial(search, res, instance, trial, data_, rfile, evals, promoted, trial_runs, True, quiet)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                failures = 0
                continue
        keys = [["merged", rname], ["eval", "merged", rname]]
        if want_base:
            keys.append(["eval", "model", spec_.base.name])
        result, mats = _materialize(project, res, instance, keys, tags, quiet)
        run_ids.append(result.run_id)
        trial_runs.append(result.run_id)
        if halving is None:
            new += 1
        if ("eval", "merged", rname) not in mats:  # the merge, a blocking check or the evaluation failed
            failures = _failed(study, trial, failures, result, search, log)
            continue
        scores, ev, merged = _evaluated(res, search, trial, mats, rname, res.eval_limit or None, evals)
        values = aggregate(spec.objective, scores)
        feasible, constraint = True, [0.0]
        if want_base:
            if base_scores is None:
                bev = mats[("eval", "model", spec_.base.name)]
                base_scores = task_scores(_metrics(res, bev), search.tasks, metric, where)
            gap = max(base_scores[t] - scores[t] for t in search.tasks)
            feasible, constraint = gap <= 0, [float(gap)]
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("constraint", constraint)
        if _SET_CONSTRAINT and want_base:
            trial.set_constraint("below_base", constraint[0])
        trial.set_user_attr("eval", ev)
        trial.set_user_attr("run_id", result.run_id)
        trial.set_user_attr("values", values)
        _record_trial(search, res, instance, trial, data_, rfile, evals, promoted, trial_runs, False, quiet)
        study.tell(trial, values)
        failures = 0
        shown = ", ".join(f"{t} {v:.3f}" for t, v in scores.items())
        objective = ", ".join(f"{v:.4f}" for v in values)
        log(f"trial {trial.number}: {shown} -> {objective}{'' if feasible else ' (below base)'}")
    results = load_results(study)
    best = choose_best(search, results)
    out = SearchResult(search.name, results, best, None, new, 0.0, run_ids=run_ids)
    if best is not None:
        out.best_file, out.removed, rids, out.report = _finish(search, res, instance, results, best, quiet)
        out.run_ids += rids
        out.trials = load_results(study)
        out.best = choose_best(search, out.trials)
    out.seconds = time.perf_counter() - t0
    return out


def _failed(study, trial, failures: int, result, search: Search, log) -> int:
    """A trial whose run failed: a failed Optuna trial; MAX_FAILURES in a row stop the search."""
    import optuna

    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    failures += 1
    if failures >= MAX_FAILURES:
        raise SearchError(
            f"{search.file}: {failures} trials in a row failed (last: run {result.run_id}); "
            "see the Dagster runs tagged merge_dag/search"
        )
    log(f"trial {trial.number}: run {result.run_id[:8]} failed; see the Dagster run")
    return failures


def _evaluated(res, search: Search, trial, mats, rname: str, rows, evals: list) -> tuple[dict, dict, dict]:
    """A trial run's scores (appended to `evals` with the rows per task), evaluation and merged model."""
    ev, merged = mats[("eval", "merged", rname)], mats[("merged", rname)]
    scores = task_scores(_metrics(res, ev), search.tasks, search.spec.objective.metric, str(search.file))
    value = aggregate(search.spec.objective, scores)
    mean = value[0] if len(value) == 1 else sum(value) / len(value)
    evals.append({"rows": rows, "artifact_id": ev["artifact_id"], "key": ev["key"], "scores": scores, "value": mean})
    trial.set_user_attr("merged", {k: merged[k] for k in ("artifact_id", "key", "path") if k in merged})
    trial.set_user_attr("output_fingerprint", merged.get("output_fingerprint"))
    return scores, {k: ev[k] for k in ("artifact_id", "key") if k in ev}, merged


def _steps(res: MergeDagResource, run_ids: list[str], event: str) -> list[str]:
    """The steps of these runs with this lineage event (cache_hit or materialized), in order."""
    store = res.lineage()
    out: list[str] = []
    for rid in run_ids:
        out += [e["step"] for e in store.events(run_id=rid) if e["event"] == event and e["step"] not in out]
    return out


def _record_trial(search, res, instance, trial, data_: dict, rfile: Path, evals, promoted, run_ids, pruned, quiet):
    """Write the trial's record and materialize its partition of `search_trial/<name>` (the
    partition added first): recipe, merged model, validation scores, cache hits of its runs. The
    record's artifact goes to the trial's `record` user attribute (before it is told)."""
    from .assets.search import trial_asset, trial_record

    a = trial.user_attrs
    t = TrialResult(
        number=trial.number,
        key=a["key"],
        params=dict(trial.params),
        scores=a.get("scores", {}),
        values=a.get("values") or [evals[-1]["value"]],
        feasible=a.get("feasible", True),
        recipe=a["recipe"],
        merged=a.get("merged"),
        eval=a.get("eval"),
        output_fingerprint=a.get("output_fingerprint"),
        pruned=pruned,
    )
    part = partition_key(t.key)
    rec = trial_record(
        search,
        t,
        rfile.read_text(),
        evals,
        promoted,
        run_ids,
        _steps(res, run_ids, "cache_hit"),
        _steps(res, run_ids, "materialized"),
    )
    write_json_file(record_path(res, search.name, part), rec)
    pname = partitions_name(search.name)
    if not instance.has_dynamic_partition(pname, part):
        instance.add_dynamic_partitions(pname, [part])
    asset = trial_asset(search.name)
    defs = dg.Definitions(
        assets=[asset],
        jobs=[dg.define_asset_job("search_trial_record", selection=dg.AssetSelection.assets(asset))],
        resources={"merge_dag": res},
    )
    tags = {"merge_dag/search": search.name, "merge_dag/trial": str(trial.number)}
    result = _execute(
        defs.resolve_job_def("search_trial_record"), instance, tags, quiet, raise_on_error=True, partition_key=part
    )
    for ev in result.get_asset_materialization_events():
        m = ev.event_specific_data.materialization.metadata
        trial.set_user_attr("record", {"artifact_id": m["artifact_id"].value, "key": m["key"].value})


def _finish(search: Search, res: MergeDagResource, instance, results: list[TrialResult], best: TrialResult, quiet):
    """Write the best recipe, evaluate it once on the `report` tasks (never used to choose), delete
    the merged trial checkpoints outside the best `keep_best`, and materialize search/<name> (best
    recipe, trials table, charts, lineage to every trial)."""
    from .assets.search import best_recipe_text, search_asset, trial_asset

    folder = search_dir(res, search.name)
    _, text = best_recipe_text(search, res, best)
    best_file = folder / "best.yaml"
    tmp = best_file.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(best_file)
    report, run_ids = None, []
    if search.spec.report:
        report, rid = _report(search, res, instance, best_file, quiet)
        run_ids.append(rid)
        write_json_file(folder / REPORT_FILE, {"best": best.key, **report})
    removed = _collect(search, res, results)
    asset = search_asset(search)
    defs = dg.Definitions(
        assets=[asset, trial_asset(search.name)],
        jobs=[dg.define_asset_job("search_result", selection=dg.AssetSelection.assets(asset))],
        resources={"merge_dag": res},
    )
    result = _execute(
        defs.resolve_job_def("search_result"), instance, {"merge_dag/search": search.name}, quiet, raise_on_error=True
    )
    run_ids.append(result.run_id)
    return best_file, removed, run_ids, report


def _collect(search: Search, res: MergeDagResource, results: list[TrialResult]) -> list[str]:
    """Delete the merged checkpoints of trials outside the best `keep_best` (fully evaluated trials
    rank above pruned ones). Only a trial's own folder, `<artifacts>/merged/<search>_<key12>-...`,
    which no recipe but this search's trial builds, is ever deleted. Returns what was deleted now;
    `removed.json` keeps every path deleted so far."""
    from .steps import resolve_path

    ranked = sorted([t for t in results if t.duplicate_of is None], key=lambda t: rank_key(search, t), reverse=True)
    keep = {t.key for t in ranked[: search.spec.keep_best]}
    store_root = res.store().root / "merged"
    removed = []
    for t in ranked:
        if t.key in keep or not t.merged or not t.merged.get("path"):
            continue
        p = Path(resolve_path(res.root, t.merged["path"]))
        own = p.parent == store_root and p.name.startswith(f"{asset_name(f'{search.name}_{t.key[:12]}')}-")
        if own and p.is_dir():
            shutil.rmtree(p)
            removed.append(str(t.merged["path"]))
    f = search_dir(res, search.name) / REMOVED_FILE
    before = read_json_file(f, []) or []
    write_json_file(f, before + [r for r in removed if r not in before])
    return removed


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
