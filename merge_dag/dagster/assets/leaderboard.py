"""leaderboard: every evaluated model x task in one table (base, experts, merges)."""

import json

import dagster as dg

from ...artifacts import read_json
from ...core.version import code_version
from ...project import Project
from ..resources import MergeDagResource
from ..steps import META_FILE, Input, latest, run_step
from .evals import eval_keys

GROUP = "evals"


def leaderboard_rows(results: list[dict]) -> tuple[list[str], list[dict]]:
    """results: [{"model": label, "metrics": [[task, metric, value, stderr, n], ...]}] -> columns, rows."""
    columns: list[str] = []
    rows = []
    for r in results:
        row = {"model": r["model"]}
        for task, metric, value, _stderr, _n in r["metrics"]:
            col = f"{task}/{metric}"
            if col not in columns:
                columns.append(col)
            row[col] = value
        rows.append(row)
    return columns, rows


def format_leaderboard(columns: list[str], rows: list[dict], text=str) -> str:
    """A Markdown table; `text` renders model and column names (md_text for the UI, which renders it)."""
    head = "| model | " + " | ".join(text(c) for c in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    body = [
        "| " + text(r["model"]) + " | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in columns) + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


def base_label(project: Project) -> str | None:
    """The leaderboard's base row: model/<name> of the first recipe's base that has its own eval."""
    for spec in project.recipes.values():
        if spec.base is not None and spec.base.name in project.model_evals:
            return f"model/{spec.base.name}"
    return None


def draw_chart(table, base: str | None, path) -> None:
    """leaderboard.png: merges as bars per task and on average, base and experts as reference lines."""
    from ...charts import leaderboard_chart
    from ...evaluation.report import row_order

    base, refs, merges = row_order(table, base)

    def values(m: str) -> list[float]:
        return [table.value(m, t) if t in table.scores[m] else float("nan") for t in table.tasks] + [table.average(m)]

    short = [t.removeprefix("zoo_") for t in table.tasks]
    leaderboard_chart(
        short,
        {m.split("/", 1)[-1]: values(m) for m in merges},
        {m.split("/", 1)[-1] + (" (base)" if m == base else ""): values(m) for m in refs},
        path,
        ylabel=table.metric,
        title="score per task and on average (bars: merges; lines: base, experts)",
    )


def leaderboard_metadata(art, info: dict, base: str | None) -> dict:
    """The story first (sorted table with ± SE and Δ vs base, the chart), numbers the Plots tab can
    chart, then every raw metric."""
    from ...charts import markdown_image
    from ...evaluation.report import ScoreTable, leaderboard_markdown, leaderboard_rows, row_order

    results = read_json(f"{art.path}/results.json") or []
    table = ScoreTable.from_results(results)
    md: dict = {}
    if table.tasks:
        cols, rows_ = leaderboard_rows(table, base)
        md["leaderboard"] = dg.MetadataValue.table(
            [dg.TableRecord(r) for r in rows_], schema=dg.TableSchema([dg.TableColumn(c, "string") for c in cols])
        )
        md["leaderboard_markdown"] = dg.MetadataValue.md(leaderboard_markdown(table, base))
        png = art.path / "leaderboard.png"
        if png.exists():
            md["chart"] = dg.MetadataValue.md(markdown_image(png, "leaderboard chart"))
        base, refs, merges = row_order(table, base)
        if base:
            md["base_average"] = round(table.average(base), 4)
        if merges:
            md["best_merge"] = merges[0].split("/", 1)[-1]
            md["best_merge_average"] = round(table.average(merges[0]), 4)
            if base:
                md["best_merge_delta_vs_base"] = round(table.diff(merges[0], base)[0], 4)
                md["merges_below_base"] = sum(table.diff(m, base)[0] < 0 for m in merges)
    columns, rows = info.get("columns", []), info.get("rows", [])
    schema = dg.TableSchema(columns=[dg.TableColumn("model", "string")] + [dg.TableColumn(c, "float") for c in columns])
    records = [
        dg.TableRecord({"model": r["model"], **{c: None if r.get(c) is None else round(r[c], 4) for c in columns}})
        for r in rows
    ]
    md["all_metrics"] = dg.MetadataValue.table(records, schema=schema)
    md["models"] = len(rows)
    return md


def leaderboard_asset(project: Project) -> dg.AssetsDefinition:
    keys = eval_keys(project)
    base = base_label(project)
    code = code_version("dagster/assets/leaderboard.py")

    @dg.asset(
        key=["leaderboard"],
        deps=keys,
        group_name=GROUP,
        code_version=code,
        kinds={"duckdb"},
        description="Every evaluated model x task: base, experts and merges side by side.",
    )
    def _leaderboard(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        # an eval this step's fresh import knows but nobody built yet (a new glob match's baseline,
        # requested by the sensor in a later run) is left out rather than failing the leaderboard
        ups = [u for u in (latest(context, k) for k in keys) if u is not None]
        if not ups:
            raise dg.Failure("no evaluation has been materialized yet; materialize the eval assets first")
        inputs = [Input.artifact("eval", u) for u in ups]

        def build(tmp, art):
            results = [r for r in (read_json(f"{u['path']}/{META_FILE}") for u in ups) if r]
            columns, rows = leaderboard_rows(results)
            tmp.mkdir(parents=True, exist_ok=True)
            # every metric with its stderr and document count, for tables with standard errors
            (tmp / "results.json").write_text(json.dumps(results, indent=2))
            (tmp / "leaderboard.md").write_text(format_leaderboard(columns, rows) + "\n")
            (tmp / "leaderboard.json").write_text(json.dumps({"columns": columns, "rows": rows}, indent=2))
            from ...evaluation.report import ScoreTable

            table = ScoreTable.from_results(results)
            if table.tasks:
                draw_chart(table, base, tmp / "leaderboard.png")
            return {"columns": columns, "rows": rows}

        return run_step(
            context,
            merge_dag,
            kind="leaderboard",
            name="leaderboard",
            code_version=code,
            settings={},
            inputs=inputs,
            build=build,
            metadata=lambda art, info: leaderboard_metadata(art, info, base),
        )

    return _leaderboard
