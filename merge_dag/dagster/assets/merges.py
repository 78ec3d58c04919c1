"""merged/<recipe>: the merged checkpoint of one recipe, and an asset check that it is sound.

Recipes whose method works on task vectors read each expert as base + its cached task vector;
the others read the model folders. The merge itself is merge_dag.core.engine, unchanged.
"""


import dagster as dg
import torch

from ...core.checkpoint import Checkpoint
from ...core.engine import execute, plan_merge
from ...core.fingerprint import checkpoint_fingerprint
from ...core.version import code_version
from ...project import Project, RecipeSpec, current_spec
from ..resources import MergeDagResource, torch_pool
from ..steps import Input, run_step, source_id, upstream
from .sources import recipe_fingerprint
from .task_vectors import task_vector_inline

GROUP = "merges"


def merged_asset(project: Project, spec: RecipeSpec) -> dg.AssetsDefinition:
    code = code_version("core")
    if spec.uses_task_vectors:
        deps = [["model", spec.base.name]] + [["task_vector", project.tv_name(spec.base, e)] for e in spec.experts]
    else:
        deps = [["model", m.name] for m in spec.members]
    deps.append(["recipe", spec.name])

    @dg.asset(key=["merged", spec.name], deps=deps, group_name=GROUP, code_version=code, pool=torch_pool(),
              kinds={"pytorch", "safetensors"},
              description=f"{spec.recipe.merge_method} merge of {len(spec.experts)} model(s), recipe {spec.file.name}.")
    def _merged(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        now = current_spec(project, spec)  # edits and new glob matches count now, not at the next reload
        rfp = recipe_fingerprint(now)
        inputs = [Input("recipe", source_id("recipe", rfp), rfp)]
        tvs = {}
        if now.base is not None:
            fb = checkpoint_fingerprint(now.base.path)
            inputs.append(Input("base", source_id("model", fb), fb))
        for e in now.experts:
            tv = project.known_task_vector(now.base, e) if now.uses_task_vectors else None
            if tv is not None:
                up = upstream(context, ["task_vector", tv])
                inputs.append(Input("expert", up["artifact_id"], up["key"]))
                tvs[e.ref] = up["path"]
            elif now.uses_task_vectors:  # an expert the graph does not show yet (e.g. a new glob match)
                context.log.info(f"{e.ref}: not in the loaded graph yet; its task vector is built in this step")
                out = task_vector_inline(context, merge_dag, e.name, now.base, e)
                inputs.append(Input("expert", out.artifact.id, out.key))
                tvs[e.ref] = str(out.artifact.path)
            else:
                fe = checkpoint_fingerprint(e.path)
                inputs.append(Input("expert", source_id("model", fe), fe))
        settings = {"recipe": now.recipe.to_yaml_dict()}

        def build(tmp, art):
            plan = plan_merge(now.recipe, device=merge_dag.device, task_vectors=tvs)
            res = execute(plan, tmp, progress=False, card_extra={"artifact_id": art.id, "name": spec.name})
            return {"tensor_count": res.tensor_count, "bytes": res.bytes, "method": res.method,
                    "seconds": res.seconds, "input_fingerprints": res.fingerprints,
                    "output_fingerprint": res.output_fingerprint}

        def meta(art, info):
            return {
                "method": now.recipe.merge_method,
                "experts": dg.MetadataValue.json([e.ref for e in now.experts]),
                "parameters": dg.MetadataValue.json(settings["recipe"]),
                "tensor_count": info.get("tensor_count"),
                "bytes": info.get("bytes"),
                "output_fingerprint": info.get("output_fingerprint", ""),
                "model_card": dg.MetadataValue.path(str(art.path / "README.md")),
            }

        return run_step(context, merge_dag, kind="merged", name=spec.name, code_version=code, settings=settings,
                        inputs=inputs, build=build, metadata=meta)

    return _merged


def merged_check(spec: RecipeSpec) -> dg.AssetChecksDefinition:
    reference = spec.base or spec.experts[0]

    @dg.asset_check(asset=dg.AssetKey(["merged", spec.name]), name="loads_and_matches_base", blocking=True,
                    description="The merged folder loads (safetensors + config), has the base's tensor names and "
                                "shapes, and holds no NaN/Inf.")
    def _check(context: dg.AssetCheckExecutionContext, merge_dag: MergeDagResource) -> dg.AssetCheckResult:
        ev = context.instance.get_latest_materialization_event(dg.AssetKey(["merged", spec.name]))
        path = ev.asset_materialization.metadata["path"].value
        problems = []
        try:
            out = Checkpoint(path, name=f"merged/{spec.name}")
            ref = Checkpoint(reference.path, name=reference.ref)
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
    specs = list(project.recipes.values())
    return [merged_asset(project, s) for s in specs], [merged_check(s) for s in specs]
