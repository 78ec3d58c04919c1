"""leaderboard: every evaluated model x task in one table (base, experts, merges)."""


import json

import dagster as dg

from ...artifacts import read_json
from ...core.version import code_version
from ...project import Project
from ...core.markdown import md_text
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
    body = ["| " + text(r["model"]) + " | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in columns) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def leaderboard_asset(project: Project) -> dg.AssetsDefinition:
    keys = eval_keys(project)
    code = code_version("dagster/assets/leaderboard.py")

    @dg.asset(key=["leaderboard"], deps=keys, group_name=GROUP, code_version=code, kinds={"duckdb"},
              description="Every evaluated model x task: base, experts and merges side by side.")
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
            return {"columns": columns, "rows": rows}

        def meta(art, info):
            columns, rows = info.get("columns", []), info.get("rows", [])
            schema = dg.TableSchema(columns=[dg.TableColumn("model", "string")] +
                                    [dg.TableColumn(c, "float") for c in columns])
            records = [dg.TableRecord({"model": r["model"], **{c: r.get(c) for c in columns}}) for r in rows]
            return {"leaderboard": dg.MetadataValue.table(records, schema=schema),
                    "markdown": dg.MetadataValue.md(format_leaderboard(columns, rows, md_text)),
                    "models": len(rows)}

        return run_step(context, merge_dag, kind="leaderboard", name="leaderboard", code_version=code, settings={},
                        inputs=inputs, build=build, metadata=meta)

    return _leaderboard
