"""merged/<recipe>: the merged checkpoint of one recipe, and an asset check that it is sound.

Recipes whose method works on task vectors read each expert as base + its cached task vector;
the others read the model folders. The merge itself is merge_dag.core.engine, unchanged.
"""


import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import torch

from ...core.checkpoint import Checkpoint
from ... import __version__
from ...core.engine import MergePlan, MergeResult, execute, plan_merge, write_card
from ...core.fingerprint import checkpoint_fingerprint
from ...core.version import merge_code_version
from ...core.recipe import Recipe
from ...project import Project, RecipeSpec, current_spec, register_guidance
from ...core.markdown import md_text
from ..resources import MergeDagResource, torch_pool
from ..steps import Input, latest, record_model, resolve_path, run_step, shown_path, upstream
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
    recipe: Recipe                       # what the engine plans: guidance applied as parameter maps
    guidance: dict                       # for the model card: which guidance artifacts shaped the merge
    aim_stats: list[str] | None = None   # AIM: the base's activation statistics folders (summed)
    grams: dict[str, str] | None = None  # RegMean: {model ref: Gram statistics folder}


def prepare_merge(context: dg.AssetExecutionContext, merge_dag: MergeDagResource, project: Project,
                  spec: RecipeSpec) -> PreparedMerge:
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


def merge_card_extra(prep: PreparedMerge, card_extra: dict) -> dict:
    """What the model card of merged/<recipe> adds to the engine's (also used by merge_parts.py)."""
    if prep.guidance:
        card_extra = {**card_extra, "guidance": {"recipe": prep.settings["recipe"].get("guidance"),
                                                 "artifacts": prep.guidance}}
    return card_extra


def merge_plan(prep: PreparedMerge, merge_dag: MergeDagResource) -> MergePlan:
    return plan_merge(prep.recipe, device=merge_dag.device, task_vectors=prep.task_vectors)


def merge_info(res: MergeResult) -> dict:
    """The artifact info (_artifact.json) of a merge, from the engine's result."""
    return {"tensor_count": res.tensor_count, "bytes": res.bytes, "method": res.method, "seconds": res.seconds,
            "input_fingerprints": res.fingerprints, "output_fingerprint": res.output_fingerprint}


def merged_metadata(prep: PreparedMerge, art, info: dict, res: MergeDagResource) -> dict:
    """The materialization metadata of merged/<recipe> (both the one-step and the split asset): first
    its provenance as `merge-dag audit` prints it (every input, method, parameters, guidance, code
    version, eval scores with Δ vs base; paths relative to the project root)."""
    from ...lineage.audit import provenance_markdown

    return {
        "provenance": dg.MetadataValue.md(provenance_markdown(res.lineage().provenance(art.id), res.root_path)),
        "method": prep.spec.recipe.merge_method,
        "experts": dg.MetadataValue.json([e.ref for e in prep.spec.experts]),
        "parameters": dg.MetadataValue.json(prep.settings["recipe"]),
        "tensor_count": info.get("tensor_count"),
        "bytes": info.get("bytes"),
        "output_fingerprint": info.get("output_fingerprint", ""),
        "model_card": dg.MetadataValue.path(shown_path(res, art.path / "README.md")),
    }


def build_merge(prep: PreparedMerge, merge_dag: MergeDagResource, out: Path, card_extra: dict) -> dict:
    """Write the merged checkpoint of `prep` into `out` (a fresh folder); returns the artifact's info."""
    card_extra = merge_card_extra(prep, card_extra)
    if prep.grams is not None:
        return _regmean(prep, merge_dag, out, card_extra)
    plan = merge_plan(prep, merge_dag)
    target = out if prep.aim_stats is None else out.parent / f"{out.name}.premerge"
    res = execute(plan, target, progress=False, card_extra=card_extra)
    info = merge_info(res)
    if prep.aim_stats is not None:
        from ...guidance.activations import ActivationStats, sum_stats
        from ...guidance.aim import aim_checkpoint

        omega = prep.spec.guidance.aim.omega
        try:
            stats = sum_stats([ActivationStats.load(p) for p in prep.aim_stats])
            aim_checkpoint(prep.spec.base.path, target, stats, out, omega=omega, device=merge_dag.device)
            card = {**res.card, "aim": {"omega": omega,
                                        "statistics": [v for k, v in prep.guidance.items() if k.startswith("aim_")]}}
            write_card(out, card)
        finally:
            shutil.rmtree(target, ignore_errors=True)
        info["output_fingerprint"] = checkpoint_fingerprint(Checkpoint(out))
    return info


def _regmean(prep: PreparedMerge, merge_dag: MergeDagResource, out: Path, card_extra: dict) -> dict:
    from ...core.card import build_card
    from ...guidance.activations import ActivationStats
    from ...guidance.regmean import regmean_checkpoint

    g = prep.spec.guidance.regmean
    models = prep.spec.members
    fps = {m.ref: m.fingerprint() for m in models}
    regmean_checkpoint([m.open() for m in models],
                       [ActivationStats.load(prep.grams[m.ref]) for m in models], out, a=g.a, ridge=g.ridge,
                       device=merge_dag.device)
    ck = Checkpoint(out)
    dtype = str(next(iter(ck.tensors.values())).dtype).removeprefix("torch.")
    inputs = [{"role": "model", "model": m.ref, "path": str(m.path), "fingerprint": fps[m.ref]} for m in models]
    card = build_card("regmean", prep.settings["recipe"], str(prep.spec.file), inputs, dtype, prep.spec.recipe.seed,
                      models[0].ref, len(ck.tensors), card_extra)
    write_card(out, card)
    return {"tensor_count": len(ck.tensors), "bytes": sum(i.nbytes for i in ck.tensors.values()), "method": "regmean",
            "input_fingerprints": fps, "output_fingerprint": checkpoint_fingerprint(Checkpoint(out))}


def merged_deps(project: Project, spec: RecipeSpec) -> list[list[str]]:
    """The assets merged/<recipe> depends on (the one-step and the split asset alike)."""
    if spec.uses_task_vectors:
        deps = [["model", spec.base.name]] + [["model", e.name] if e.is_adapter else
                                               ["task_vector", project.tv_name(spec.base, e)] for e in spec.experts]
    else:
        deps = [["model", m.name] for m in spec.members]
    deps.append(["recipe", spec.name])
    need = register_guidance(project, spec)
    if need["importance"]:
        deps.append(["allocation", spec.name])
    if need["sensitivity"]:
        deps.append(["coefficients", spec.name])
    deps += [["activations", s.name] for s in need["aim"]] + [["grams", s.name] for s in need["grams"]]
    return deps


def merged_asset(project: Project, spec: RecipeSpec) -> dg.AssetsDefinition:
    code = merge_code_version()
    deps = merged_deps(project, spec)

    @dg.asset(key=["merged", spec.name], deps=deps, group_name=GROUP, code_version=code, pool=torch_pool(),
              kinds={"pytorch", "safetensors"},
              description=f"{md_text(spec.recipe.merge_method)} merge of {len(spec.experts)} model(s), recipe "
                          f"{md_text(spec.file.name)}.")
    def _merged(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        prep = prepare_merge(context, merge_dag, project, spec)

        def build(tmp, art):
            return build_merge(prep, merge_dag, tmp, {"artifact_id": art.id, "name": spec.name})

        def meta(art, info):
            return merged_metadata(prep, art, info, merge_dag)

        return run_step(context, merge_dag, kind="merged", name=spec.name, code_version=code, settings=prep.settings,
                        inputs=prep.inputs, build=build, metadata=meta)

    return _merged


def merged_check(spec: RecipeSpec) -> dg.AssetChecksDefinition:
    reference = spec.base or spec.experts[0]

    @dg.asset_check(asset=dg.AssetKey(["merged", spec.name]), name="loads_and_matches_base", blocking=True,
                    description="The merged folder loads (safetensors + config), has the base's tensor names and "
                                "shapes, and holds no NaN/Inf.")
    def _check(context: dg.AssetCheckExecutionContext, merge_dag: MergeDagResource) -> dg.AssetCheckResult:
        ev = context.instance.get_latest_materialization_event(dg.AssetKey(["merged", spec.name]))
        path = resolve_path(merge_dag.root, ev.asset_materialization.metadata["path"].value)
        problems = []
        try:
            out = Checkpoint(path, name=f"merged/{spec.name}")
            ref = reference.open()
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            return dg.AssetCheckResult(passed=False, metadata={"error": str(e)})
        if set(out.tensors) != set(ref.tensors):
            missing = sorted(set(ref.tensors) - set(out.tensors))[:5]
            extra = sorted(set(out.tensors) - set(ref.tensors))[:5]
            if not (spec.recipe.slices):  # a passthrough stack legitimately changes the layer count
                problems.append(f"tensor names differ from base: missing {missing}, extra {extra}")
        for name, info in out.tensors.items():
            if name in ref.tensors and ref.tensors[name].shape != info.shape:
                problems.append(f"{name}: shape {list(info.shape)} != base {list(ref.tensors[name].shape)}")
            t = out.get(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                problems.append(f"{name}: contains NaN/Inf")
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            problems.append(f"config.json does not load: {e}")
        return dg.AssetCheckResult(passed=not problems,
                                   metadata={"tensors": len(out.tensors), "problems": "\n".join(problems) or "none"})

    return _check


def merge_assets(project: Project) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    from .merge_parts import merged_parts_asset

    specs = list(project.recipes.values())
    return ([merged_parts_asset(project, s) if s.recipe.parts > 1 else merged_asset(project, s) for s in specs],
            [merged_check(s) for s in specs])
