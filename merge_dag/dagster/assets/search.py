"""search/<name>: the outcome of a search (merge_dag.dagster.search): the best recipe as a normal
recipe file, every trial's parameters and validation scores, the objective per trial as a chart,
and lineage edges to the best trial's merged model and to every trial's evaluation."""

import json
from typing import TYPE_CHECKING, Any

import dagster as dg

from ...core.markdown import md_text
from ...core.search import dump_recipe
from ...core.version import code_version
from ..resources import MergeDagResource
from ..steps import Input, run_step

if TYPE_CHECKING:  # pragma: no cover
    from ...core.search import Search

# a trial: merge_dag.dagster.search.TrialResult (not imported: that module imports this one)
TrialResult = Any

GROUP = "searches"


def _table(search: "Search", results: list[TrialResult], best: TrialResult) -> str:
    params = list(search.spec.parameters)
    head = "| trial | " + " | ".join(md_text(p) for p in params) + " | " + " | ".join(md_text(t) for t in search.tasks)
    head += " | objective | note |\n|" + "---|" * (len(params) + len(search.tasks) + 3) + "\n"
    rows = []
    for t in results:
        note = "**best**" if t.number == best.number else ""
        if t.duplicate_of is not None:
            note = f"same recipe as {t.duplicate_of}"
        elif not t.feasible:
            note = "below base"
        cells = [str(t.number)] + [
            f"{t.params.get(p)}" if not isinstance(t.params.get(p), float) else f"{t.params[p]:.4g}" for p in params
        ]
        cells += [f"{t.scores.get(x, float('nan')):.4f}" for x in search.tasks]
        cells += [", ".join(f"{v:.4f}" for v in t.values), note]
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows)


def _report_md(report: dict) -> str:
    """The best recipe on the report (test) tasks, with the base's scores: computed once, after the search."""
    base = report.get("base_scores") or {}
    rows = "\n".join(
        f"| {md_text(t)} | {v:.4f} | {'' if t not in base else f'{base[t]:.4f}'} |" for t, v in report["scores"].items()
    )
    return (
        "Scores of the best recipe on the report tasks (evaluated once, after the search; never used to choose)\n\n"
        "| task | best recipe | base |\n|---|---|---|\n" + rows
    )


def search_asset(
    search: "Search",
    recipe: dict,
    recipe_text: str,
    results: list[TrialResult],
    best: TrialResult,
    removed: list[str],
    objective: list[float],
    trials_json: str,
    report: dict | None = None,
) -> dg.AssetsDefinition:
    """`objective`: each trial's objective as ranked (pareto: the mean over tasks); `trials_json`: the
    trials as written to trials.json; `report`: the best recipe's scores on the report tasks."""
    code = code_version("core/search.py", "dagster/search.py", "dagster/assets/search.py")

    @dg.asset(
        key=["search", search.name],
        group_name=GROUP,
        code_version=code,
        kinds={"optuna"},
        description=f"Search {md_text(search.name)} ({md_text(search.file.name)}) over recipe "
        f"{md_text(search.recipe_file.name)}: the best recipe and every trial.",
    )
    def _search(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        inputs = [Input("best_merged", best.merged["artifact_id"], best.merged["key"])]
        if report:
            inputs.append(Input("report_eval", report["eval"]["artifact_id"], report["eval"]["key"]))
        inputs += [
            Input("trial_eval", t.eval["artifact_id"], t.eval["key"])
            for t in results
            if t.eval and t.duplicate_of is None
        ]
        settings = {
            "search": search.spec.model_dump(mode="json"),
            "trials": [[t.number, t.key, t.values, t.feasible] for t in results],
            "best": best.key,
            "report": report and {k: report[k] for k in ("tasks", "scores", "base_scores") if k in report},
        }

        def build(tmp, art):
            from ...charts import search_chart

            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "best.yaml").write_text(recipe_text)
            (tmp / "trials.json").write_text(trials_json)
            nums = [t.number for t in results]
            running = [max(objective[: i + 1]) for i in range(len(objective))]
            search_chart(nums, objective, running, tmp / "objective.png", title=f"search {search.name}")
            return {
                "best_trial": best.number,
                "best_values": best.values,
                "best_scores": best.scores,
                "best_params": best.params,
                "removed_checkpoints": removed,
                **({"report": report} if report else {}),
            }

        def meta(art, info):
            from ...charts import markdown_image

            return {
                "best_trial": best.number,
                "best_objective": best.values[0] if len(best.values) == 1 else json.dumps(best.values),
                "best_params": dg.MetadataValue.json(best.params),
                "best_recipe": dg.MetadataValue.md("```yaml\n" + dump_recipe(recipe) + "```"),
                "best_merged": best.merged.get("artifact_id", ""),
                "trials": dg.MetadataValue.md(_table(search, results, best)),
                "trial_count": len(results),
                "objective_chart": dg.MetadataValue.md(
                    markdown_image(art.path / "objective.png", "objective per trial")
                ),
                "removed_checkpoints": len(removed),
                **({"report": dg.MetadataValue.md(_report_md(report))} if report else {}),
            }

        return run_step(
            context,
            merge_dag,
            kind="search",
            name=search.name,
            code_version=code,
            settings=settings,
            inputs=inputs,
            build=build,
            metadata=meta,
        )

    return _search
