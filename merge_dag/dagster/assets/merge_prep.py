"""What a merge step prepares at run time, shared by the one-step merged/<recipe> asset (merges.py)
and the split one (merge_parts.py): the recipe as its file says now, the lineage inputs, the guidance
applied, the plan, the asset's dependencies, and its info and metadata once built.
"""

from dataclasses import dataclass

import dagster as dg

from ...core.engine import MergePlan, MergeResult, plan_merge
from ...core.recipe import Recipe
from ...project import Project, RecipeSpec, current_spec, register_guidance
from ..resources import MergeDagResource
from ..steps import Input, latest, record_model, shown_path, upstream
from .sources import recipe_fingerprint
from .task_vectors import task_vector_inline

GROUP = "merges"


@dataclass
class PreparedMerge:
    """What a merge step needs, read at run time: the recipe as its file says now, the lineage inputs
    (recipe, base, each expert's task vector or checkpoint), the task-vector folders by model ref, the
    settings that enter the cache key, and the recipe to plan with."""

    spec: RecipeSpec
    inputs: list[Input]
    task_vectors: dict[str, str]
    settings: dict
    recipe: Recipe  # what the engine plans: guidance applied as parameter maps
    guidance: dict  # for the model card: which guidance artifacts shaped the merge
    aim_stats: list[str] | None = None  # AIM: the base's activation statistics folders (summed)
    grams: dict[str, str] | None = None  # RegMean: {model ref: Gram statistics folder}
    fishers: dict[str, str] | None = None  # Fisher merging: {expert ref: Fisher statistics folder}


def prepare_merge(
    context: dg.AssetExecutionContext, merge_dag: MergeDagResource, project: Project, spec: RecipeSpec
) -> PreparedMerge:
    now = current_spec(project, spec)  # edits and new glob matches count now, not at the next reload
    rfp = recipe_fingerprint(now)
    inputs = [Input.source("recipe", "recipe", rfp)]
    tvs: dict[str, str] = {}
    if now.base is not None:
        inputs.append(Input.model("base", now.base))
    for e in now.experts:
        if e.is_adapter:  # read as base + its low-rank delta, per tensor, inside the merge
            record_model(merge_dag, e, context.run.run_id)
            inputs.append(Input.model("expert", e))
            continue
        tv = project.known_task_vector(now.base, e) if now.uses_task_vectors else None
        up = latest(context, ["task_vector", tv]) if tv is not None else None
        if up is not None:
            inputs.append(Input.artifact("expert", up))
            tvs[e.ref] = up["path"]
        elif now.uses_task_vectors:
            # a new glob match: either the graph does not show it yet, or this step's fresh import of
            # the definitions does (Dagster re-imports them per run) but its task vector was never built
            context.log.info(f"{e.ref}: task vector not built yet (a new expert); built in this step")
            out = task_vector_inline(context, merge_dag, e.name, now.base, e)
            inputs.append(Input("expert", out.artifact.id, out.key))
            tvs[e.ref] = str(out.artifact.path)
        else:
            inputs.append(Input.model("expert", e))
    prep = PreparedMerge(now, inputs, tvs, {"recipe": now.recipe.to_yaml_dict()}, now.recipe, {})
    if now.guidance is not None:
        _apply_guidance(context, project, prep)
    return prep


def _apply_guidance(context: dg.AssetExecutionContext, project: Project, prep: PreparedMerge) -> None:
    """Read the allocation / coefficients / statistics this merge depends on into `prep`."""
    from ...guidance.apply import guided_recipe
    from ...guidance.sens import tensor_weights
    from .guidance import read_result

    now, g = prep.spec, prep.spec.guidance
    need = register_guidance(project, now)

    def take(role: str, key: list[str]) -> dict:
        up = upstream(context, key)
        prep.inputs.append(Input.artifact(role, up))
        prep.guidance[role if role not in prep.guidance else f"{role}:{key[-1]}"] = up["artifact_id"]
        return up

    densities = weights = None
    base = now.base.open() if now.base else None
    if g.sparsity is not None:
        densities = read_result(take("allocation", ["allocation", now.name])["path"])["densities"]
    if g.coefficients is not None:
        sigma = read_result(take("coefficients", ["coefficients", now.name])["path"])["sigma"]
        weights = tensor_weights({r: {int(k): v for k, v in c.items()} for r, c in sigma.items()}, base.tensor_names)
    layers = base.config().get("num_hidden_layers") if base else None
    prep.recipe = guided_recipe(now.recipe, densities, weights, layers)  # guidance applied: a plain recipe
    if g.aim is not None:
        prep.aim_stats = [take("aim_activations", ["activations", s.name])["path"] for s in need["aim"]]
    if g.regmean is not None:
        prep.grams = {s.model.ref: take("grams", ["grams", s.name])["path"] for s in need["grams"]}
    if g.fisher is not None:
        prep.fishers = {s.model.ref: take("fishers", ["fishers", s.name])["path"] for s in need["fishers"]}


def merge_card_extra(prep: PreparedMerge, card_extra: dict) -> dict:
    """What the model card of merged/<recipe> adds to the engine's (the one-step and the split asset alike)."""
    if prep.guidance:
        card_extra = {
            **card_extra,
            "guidance": {"recipe": prep.settings["recipe"].get("guidance"), "artifacts": prep.guidance},
        }
    return card_extra


def merge_plan(prep: PreparedMerge, merge_dag: MergeDagResource) -> MergePlan:
    return plan_merge(prep.recipe, device=merge_dag.device, task_vectors=prep.task_vectors)


def merge_info(res: MergeResult) -> dict:
    """The artifact info (_artifact.json) of a merge, from the engine's result."""
    return {
        "tensor_count": res.tensor_count,
        "bytes": res.bytes,
        "method": res.method,
        "seconds": res.seconds,
        "input_fingerprints": res.fingerprints,
        "output_fingerprint": res.output_fingerprint,
    }


def merged_metadata(prep: PreparedMerge, art, info: dict, res: MergeDagResource) -> dict:
    """The materialization metadata of merged/<recipe> (both the one-step and the split asset): first
    its provenance as `merge-dag audit` prints it (every input, method, parameters, guidance, code
    version, eval scores with Δ vs base; paths relative to the project root)."""
    from ...lineage.audit import provenance_markdown

    if res.lineage_spool:  # a Celery worker: its records reach the database when the run ends
        text = f"Recorded in the lineage database when the run ends: `merge-dag audit {prep.spec.name}`."
    else:
        text = provenance_markdown(res.lineage().provenance(art.id), res.root_path)
    return {
        "provenance": dg.MetadataValue.md(text),
        "method": prep.spec.recipe.merge_method,
        "experts": dg.MetadataValue.json([e.ref for e in prep.spec.experts]),
        "parameters": dg.MetadataValue.json(prep.settings["recipe"]),
        "tensor_count": info.get("tensor_count"),
        "bytes": info.get("bytes"),
        "output_fingerprint": info.get("output_fingerprint", ""),
        "model_card": dg.MetadataValue.path(shown_path(res, art.path / "README.md")),
    }


def merged_deps(project: Project, spec: RecipeSpec) -> list[list[str]]:
    """The assets merged/<recipe> depends on (the one-step and the split asset alike)."""
    if spec.uses_task_vectors:
        deps = [["model", spec.base.name]] + [
            ["model", e.name] if e.is_adapter else ["task_vector", project.tv_name(spec.base, e)] for e in spec.experts
        ]
    else:
        deps = [["model", m.name] for m in spec.members]
    deps.append(["recipe", spec.name])
    need = register_guidance(project, spec)
    if need["importance"]:
        deps.append(["allocation", spec.name])
    if need["sensitivity"]:
        deps.append(["coefficients", spec.name])
    deps += [["activations", s.name] for s in need["aim"]] + [["grams", s.name] for s in need["grams"]]
    deps += [["fishers", s.name] for s in need["fishers"]]
    return deps
