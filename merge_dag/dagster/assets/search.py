"""The assets of a search (merge_dag.dagster.search), built from what the search keeps on disk
(merge_dag.dagster.search_state), so `merge-dag dev`'s definitions show them too:

- `search_trial/<name>`: one partition per trial (a dynamic partitions definition keyed by the
  trial's recipe hash), holding the trial's record: parameters, recipe, merged model, validation
  scores (the small subset's and the full ones under successive halving), and the steps its run
  found cached (task vectors, statistics, baselines) or built. Lineage edges from the trial's
  merged model and evaluations.
- `search/<name>`: the outcome: the best recipe as a normal recipe file, the table of trials, the
  objective per trial as a chart (and the Pareto front across tasks for a multi-objective search),
  the best recipe's test-split (report) scores, and lineage edges from the best trial's merged model,
  the report's evaluation, every trial's evaluation and every trial's record.

A search's trials run from `merge-dag search <name>`; materializing these assets from the UI
records again what the stored study and trial records hold (no trial is run)."""

import json
from typing import TYPE_CHECKING, Optional

import dagster as dg

from ...core.errors import SearchError
from ...core.markdown import md_text
from ...core.search import dump_recipe, pareto_front
from ...core.version import code_version
from ..resources import MergeDagResource
from ..search_state import (
    REMOVED_FILE,
    REPORT_FILE,
    TrialResult,
    choose_best,
    load_results,
    open_study,
    partitions_name,
    rank_key,
    read_json_file,
    record_path,
    search_dir,
)
from ..steps import Input, run_step

if TYPE_CHECKING:  # pragma: no cover
    from ...core.search import Search

GROUP = "searches"
CODE = ("core/search.py", "dagster/search.py", "dagster/search_state.py", "dagster/assets/search.py")


def trial_partitions(name: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=partitions_name(name))


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(search: "Search", results: list[TrialResult], best: TrialResult) -> str:
    params = list(search.spec.parameters)
    head = "| trial | partition | " + " | ".join(md_text(p) for p in params) + " | "
    head += " | ".join(md_text(t) for t in search.tasks)
    head += " | objective | note |\n|" + "---|" * (len(params) + len(search.tasks) + 4) + "\n"
    rows = []
    for t in results:
        note = "**best**" if t.number == best.number else ""
        if t.duplicate_of is not None:
            note = f"same recipe as {t.duplicate_of}"
        elif t.pruned:
            note = f"pruned (first {t.rung['rows']} rows)" if t.rung else "pruned"
        elif not t.feasible:
            note = "below base"
        cells = [str(t.number), f"`{t.partition}`"] + [_num(t.params.get(p)) for p in params]
        cells += [f"{t.scores.get(x, float('nan')):.4f}" for x in search.tasks]
        cells += [", ".join(f"{v:.4f}" for v in t.values), note]
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows)


def _report_md(report: dict) -> str:
    """The best recipe on the report tasks, with the base's scores: computed once, after the search."""
    base = report.get("base_scores") or {}
    rows = "\n".join(
        f"| {md_text(t)} | {v:.4f} | {'' if t not in base else f'{base[t]:.4f}'} |" for t, v in report["scores"].items()
    )
    return (
        "Scores of the best recipe on the report tasks (evaluated once, after the search; never used to choose)\n\n"
        "| task | best recipe | base |\n|---|---|---|\n" + rows
    )


def best_recipe_text(search: "Search", res: MergeDagResource, best: TrialResult) -> tuple[dict, str]:
    """The best trial's recipe as a normal recipe (name `<search>_best`, the same merge; evals: the
    report tasks when given) and its file text."""
    from ...core.recipe import read_recipe_yaml
    from ...project import asset_name

    data = read_recipe_yaml(search_dir(res, search.name) / "trials" / f"{best.partition}.yaml")
    recipe = {"name": asset_name(f"{search.name}_best"), **{k: v for k, v in data.items() if k != "name"}}
    if search.spec.report:
        recipe["evals"] = list(search.spec.report)
    text = (
        f"# best of search {search.name} (trial {best.number}, validation objective "
        f"{', '.join(f'{v:.4f}' for v in best.values)}); merge with `merge-dag merge`\n" + dump_recipe(recipe)
    )
    return recipe, text


def _scores_md(record: dict) -> str:
    rows = []
    for e in record.get("evals", []):
        rows.append(
            f"| {e['rows'] or 'all'} | "
            + ", ".join(f"{md_text(t)} {v:.4f}" for t, v in e["scores"].items())
            + f" | {e['value']:.4f} |"
        )
    return "| rows per task | validation scores | objective |\n|---|---|---|\n" + "\n".join(rows)


def trial_asset(name: str) -> dg.AssetsDefinition:
    """`search_trial/<name>`: a partition per trial (its record, written by the search)."""
    code = code_version(*CODE)

    @dg.asset(
        key=["search_trial", name],
        partitions_def=trial_partitions(name),
        group_name=GROUP,
        code_version=code,
        kinds={"optuna"},
        description=f"The trials of search {md_text(name)}: one partition per trial (its recipe hash), "
        "with its recipe, merged model, validation scores and the steps its run found cached.",
    )
    def _trial(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        part = context.partition_key
        f = record_path(merge_dag, name, part)
        rec = read_json_file(f)
        if not isinstance(rec, dict):
            raise SearchError(f"{f}: no record of trial {part} of search {name} (run `merge-dag search {name}`)")
        inputs = [Input("merged", rec["merged"]["artifact_id"], rec["merged"]["key"])]
        inputs += [Input(f"eval_{e['rows'] or 'all'}", e["artifact_id"], e["key"]) for e in rec["evals"]]
        settings = {k: v for k, v in rec.items() if k not in ("run_ids", "cache_hits", "built")}

        def build(tmp, art):
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "trial.json").write_text(json.dumps(rec, indent=2) + "\n")
            return {"trial": rec["number"], "values": rec.get("values"), "pruned": rec.get("pruned", False)}

        def meta(art, info):
            return {
                "trial": rec["number"],
                "params": dg.MetadataValue.json(rec["params"]),
                "recipe": dg.MetadataValue.md("```yaml\n" + rec["recipe_text"] + "```"),
                "merged_asset": "merged/" + rec["recipe"],
                "merged_artifact": rec["merged"]["artifact_id"],
                "output_fingerprint": rec.get("output_fingerprint") or "",
                "validation_scores": dg.MetadataValue.json(rec["scores"]),
                "objective": dg.MetadataValue.json(rec["values"]),
                "evaluations": dg.MetadataValue.md(_scores_md(rec)),
                "promoted": rec.get("promoted"),
                "pruned": rec.get("pruned", False),
                "cache_hits": dg.MetadataValue.json(rec.get("cache_hits", [])),
                "built": dg.MetadataValue.json(rec.get("built", [])),
                "trial_runs": dg.MetadataValue.json(rec.get("run_ids", [])),
            }

        return run_step(
            context,
            merge_dag,
            kind="search_trial",
            name=f"{name}_{part}",
            code_version=code,
            settings=settings,
            inputs=inputs,
            build=build,
            metadata=meta,
        )

    return _trial


def search_asset(search: "Search") -> dg.AssetsDefinition:
    """`search/<name>`: the outcome, from the stored study, trial records and report."""
    code = code_version(*CODE)
    name = search.name

    @dg.asset(
        key=["search", name],
        deps=[dg.AssetKey(["search_trial", name])],
        group_name=GROUP,
        code_version=code,
        kinds={"optuna"},
        description=f"Search {md_text(name)} ({md_text(search.file.name)}) over recipe "
        f"{md_text(search.recipe_file.name)}: the best recipe and every trial.",
    )
    def _search(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        return search_result(context, merge_dag, search, code)

    return _search


def search_result(
    context: dg.AssetExecutionContext, res: MergeDagResource, search: "Search", code: str
) -> dg.MaterializeResult:
    study = open_study(res, search.name)
    results = load_results(study) if study is not None else []
    best = choose_best(search, results)
    if best is None:
        raise SearchError(f"{search.file}: search {search.name} has no fully evaluated trial yet (merge-dag search)")
    recipe, text = best_recipe_text(search, res, best)
    folder = search_dir(res, search.name)
    report = read_json_file(folder / REPORT_FILE)
    if not isinstance(report, dict) or report.get("best") != best.key:
        report = None  # the report of another best: not this one's
    removed = read_json_file(folder / REMOVED_FILE, []) or []
    pareto = search.spec.objective.aggregate == "pareto"
    uniq = [t for t in results if t.duplicate_of is None]
    inputs = [Input("best_merged", best.merged["artifact_id"], best.merged["key"])]
    if report:
        inputs.append(Input("report_eval", report["eval"]["artifact_id"], report["eval"]["key"]))
    for t in uniq:
        if t.eval:
            inputs.append(Input("trial_eval", t.eval["artifact_id"], t.eval["key"]))
        elif t.rung and t.rung.get("eval"):
            inputs.append(Input("trial_eval", t.rung["eval"]["artifact_id"], t.rung["eval"]["key"]))
        if t.record:
            inputs.append(Input("trial", t.record["artifact_id"], t.record["key"]))
    settings = {
        "search": search.spec.model_dump(mode="json"),
        "trials": [[t.number, t.key, t.values, t.feasible, t.pruned] for t in results],
        "best": best.key,
        "report": report and {k: report[k] for k in ("tasks", "scores", "base_scores") if k in report},
        "removed": removed,
    }
    objective = [rank_key(search, t)[2] for t in results]
    front = pareto_front([t.values for t in results]) if pareto else []
    halving = search.spec.budget.halving

    def build(tmp, art):
        from ...charts import pareto_chart, search_chart

        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "best.yaml").write_text(text)
        (tmp / "trials.json").write_text(json.dumps([t.__dict__ for t in results], indent=2, default=str) + "\n")
        nums = [t.number for t in results]
        running, top = [], float("-inf")
        for t, v in zip(results, objective):
            top = top if t.pruned else max(top, v)
            running.append(top)
        search_chart(
            nums,
            objective,
            running,
            tmp / "objective.png",
            title=f"search {search.name}" + (" (mean over tasks)" if pareto else ""),
            pruned=[t.pruned for t in results],
            rows=halving.rows if halving else None,
        )
        if pareto:
            pareto_chart(
                search.tasks,
                [t.values for t in results],
                front,
                [str(n) for n in nums],
                tmp / "pareto.png",
                title=f"search {search.name}: validation scores per task",
            )
        return {
            "best_trial": best.number,
            "best_values": best.values,
            "best_scores": best.scores,
            "best_params": best.params,
            "pareto_front": [results[i].number for i in front],
            "removed_checkpoints": removed,
            **({"report": report} if report else {}),
        }

    def meta(art, info):
        from ...charts import markdown_image

        md = {
            "best_trial": best.number,
            "best_partition": best.partition,
            "best_objective": best.values[0] if len(best.values) == 1 else json.dumps(best.values),
            "best_params": dg.MetadataValue.json(best.params),
            "best_recipe": dg.MetadataValue.md("```yaml\n" + dump_recipe(recipe) + "```"),
            "best_merged": best.merged.get("artifact_id", ""),
            "trials": dg.MetadataValue.md(_table(search, results, best)),
            "trial_count": len(results),
            "pruned_trials": sum(t.pruned for t in results),
            "objective_chart": dg.MetadataValue.md(markdown_image(art.path / "objective.png", "objective per trial")),
            "removed_checkpoints": len(removed),
        }
        if pareto:
            md["pareto_chart"] = dg.MetadataValue.md(markdown_image(art.path / "pareto.png", "Pareto front"))
            md["pareto_front"] = dg.MetadataValue.json([results[i].number for i in front])
        if report:
            md["report"] = dg.MetadataValue.md(_report_md(report))
        return md

    return run_step(
        context,
        res,
        kind="search",
        name=search.name,
        code_version=code,
        settings=settings,
        inputs=inputs,
        build=build,
        metadata=meta,
    )


def broken_search_asset(name: str, error: str) -> dg.AssetsDefinition:
    """A search file that does not load: its `search/<name>` fails with the file's error line."""

    @dg.asset(key=["search", name], group_name=GROUP, kinds={"optuna"}, description=md_text(error.splitlines()[0]))
    def _broken() -> None:
        raise SearchError(error)

    return _broken


def search_assets(data, root) -> list[dg.AssetsDefinition]:
    """`search/<name>` and `search_trial/<name>` of every <data>/searches/*.yaml (for the
    definitions); a file that does not load is a failing `search/<name>` only."""
    from pathlib import Path

    from ...core.errors import MergeDagError
    from ...core.search import load_search, searches_dir

    out: list[dg.AssetsDefinition] = []
    seen: set[str] = set()
    files = sorted(p for ext in ("*.yaml", "*.yml") for p in searches_dir(Path(data)).glob(ext))
    for f in files:
        try:
            s = load_search(f, data, root)
            if s.name in seen:
                raise SearchError(f"{f}: name: another search file is named {s.name!r}")
        except MergeDagError as e:
            if f.stem not in seen:
                seen.add(f.stem)
                out.append(broken_search_asset(f.stem, str(e)))
            continue
        seen.add(s.name)
        out += [trial_asset(s.name), search_asset(s)]
    return out


def trial_record(
    search: "Search",
    t: TrialResult,
    recipe_text: str,
    evals: list[dict],
    promoted: Optional[bool],
    run_ids: list[str],
    cache_hits: list[str],
    built: list[str],
) -> dict:
    """A trial's record (what its partition of `search_trial/<name>` shows)."""
    return {
        "search": search.name,
        "number": t.number,
        "key": t.key,
        "params": t.params,
        "recipe": t.recipe,
        "recipe_text": recipe_text,
        "merged": t.merged,
        "output_fingerprint": t.output_fingerprint,
        "evals": evals,
        "scores": t.scores,
        "values": t.values,
        "feasible": t.feasible,
        "promoted": promoted,
        "pruned": t.pruned,
        "run_ids": run_ids,
        "cache_hits": cache_hits,
        "built": built,
    }
