"""eval/merged/<recipe> and eval/model/<model>: lm-eval results of a merge and of its baselines."""

import dagster as dg

from ...core.markdown import md_text
from ...core.version import code_version
from ...project import ModelSource, Project, RecipeSpec
from ..resources import MergeDagResource, torch_pool, torch_tags
from ..steps import Input, run_step, upstream
from .sources import tasks_fingerprint

GROUP = "evals"


def _settings(res: MergeDagResource, tasks: list[str]) -> dict:
    import lm_eval

    out = {
        "tasks": list(tasks),
        "limit": res.checked("eval_limit") or None,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
    }
    if res.eval_dtype != "auto":  # part of the cache key only when set (keys of earlier results unchanged)
        out["dtype"] = res.eval_dtype
    return out


def _evaluate(project: Project, res: MergeDagResource, path, tasks: list[str], model_label: str) -> dict:
    """lm-eval on a folder, or on a project model (a LoRA expert: base + delta built in memory)."""
    from ...evaluation import evaluate

    tokenizer = None
    if isinstance(path, ModelSource):
        if path.is_adapter:
            from ...guidance.model import load_model

            path, tokenizer = load_model(path.open(), device=res.device), str(path.model_folder)
        else:
            path = path.path
    records = evaluate(
        path if tokenizer is not None else str(path),
        tasks,
        tokenizer=tokenizer,
        device=res.device,
        limit=res.eval_limit or None,
        batch_size=res.eval_batch_size,
        tasks_dir=project.tasks_dir,
        dtype=res.checked("eval_dtype"),
    )
    return {"model": model_label, "metrics": [[r.task, r.metric, r.value, r.stderr, r.n] for r in records]}


def _metrics_md(info: dict) -> dg.MetadataValue:
    rows = "\n".join(
        f"| {md_text(t)} | {md_text(m)} | {v:.4f} | {'' if s is None else f'{s:.4f}'} | {n} |"
        for t, m, v, s, n in info.get("metrics", [])
    )
    return dg.MetadataValue.md("| task | metric | value | stderr | n |\n|---|---|---|---|---|\n" + rows)


def merged_eval_asset(project: Project, spec: RecipeSpec) -> dg.AssetsDefinition:
    code = code_version("evaluation")

    @dg.asset(
        key=["eval", "merged", spec.name],
        deps=[["merged", spec.name], ["eval_tasks"]],
        group_name=GROUP,
        code_version=code,
        pool=torch_pool(),
        op_tags=torch_tags(),
        kinds={"lm_eval"},
        description=f"lm-eval {md_text(', '.join(spec.evals))} on merged/{md_text(spec.name)}.",
    )
    def _eval(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        up = upstream(context, ["merged", spec.name])
        tfp = tasks_fingerprint(project)
        inputs = [Input.artifact("model", up), Input.source("tasks", "tasks", tfp)]
        return run_step(
            context,
            merge_dag,
            kind="eval",
            name=f"merged_{spec.name}",
            code_version=code,
            settings=_settings(merge_dag, spec.evals),
            inputs=inputs,
            build=lambda tmp, art: _evaluate(project, merge_dag, up["path"], spec.evals, f"merged/{spec.name}"),
            metadata=lambda art, info: {"results": _metrics_md(info)},
        )

    return _eval


def model_eval_asset(project: Project, m: ModelSource, tasks: list[str]) -> dg.AssetsDefinition:
    code = code_version("evaluation")

    @dg.asset(
        key=["eval", "model", m.name],
        deps=[["model", m.name], ["eval_tasks"]],
        group_name=GROUP,
        code_version=code,
        pool=torch_pool(),
        op_tags=torch_tags(),
        kinds={"lm_eval"},
        description=f"lm-eval baseline {md_text(', '.join(tasks))} on {md_text(m.ref)}.",
    )
    def _eval(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        tfp = tasks_fingerprint(project)
        inputs = [Input.model("model", m), Input.source("tasks", "tasks", tfp)]
        return run_step(
            context,
            merge_dag,
            kind="eval",
            name=f"model_{m.name}",
            code_version=code,
            settings=_settings(merge_dag, tasks),
            inputs=inputs,
            build=lambda tmp, art: _evaluate(project, merge_dag, m, tasks, f"model/{m.name}"),
            metadata=lambda art, info: {"results": _metrics_md(info)},
        )

    return _eval


def eval_assets(project: Project) -> list[dg.AssetsDefinition]:
    out = [merged_eval_asset(project, s) for s in project.recipes.values() if s.evals]
    out += [model_eval_asset(project, project.models[n], tasks) for n, tasks in project.model_evals.items()]
    return out


def eval_keys(project: Project) -> list[list[str]]:
    keys = [["eval", "merged", s.name] for s in project.recipes.values() if s.evals]
    keys += [["eval", "model", n] for n in project.model_evals]
    return keys
