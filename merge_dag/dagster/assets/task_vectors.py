"""task_vector/<expert>: expert - base as a float32 safetensors checkpoint, shared by every recipe
that merges that expert onto that base."""

import dagster as dg

from ...core.markdown import md_text
from ...core.task_vector import compute_task_vector
from ...core.version import code_version
from ...project import ModelSource, Project
from ..resources import MergeDagResource, torch_pool, torch_tags
from ..steps import Input, Outcome, cached_step, record_model, run_step

GROUP = "task_vectors"
CODE = code_version("core/task_vector.py", "core/checkpoint.py")


def _step_args(merge_dag: MergeDagResource, name: str, base: ModelSource, expert: ModelSource) -> dict:
    inputs = [Input.model("base", base), Input.model("expert", expert)]

    def build(tmp, art):  # a LoRA expert's delta is computed per tensor from its factors
        r = compute_task_vector(base.open(), expert.open(), tmp, device=merge_dag.device)
        return {
            "tensor_count": r.tensor_count,
            "bytes": r.bytes,
            "l2_norm": r.l2_norm,
            "per_layer_norm": r.per_layer_norm,
            "seconds": r.seconds,
            **({"left_out": r.left_out} if r.left_out else {}),
        }

    return dict(
        kind="task_vector", name=name, code_version=CODE, settings={"dtype": "float32"}, inputs=inputs, build=build
    )


def task_vector_inline(
    context: dg.AssetExecutionContext, merge_dag: MergeDagResource, name: str, base: ModelSource, expert: ModelSource
) -> Outcome:
    """The task vector of an expert the definitions do not know yet (a new glob match), built inside
    the step that needs it under the same cache key its own asset will find after a reload."""
    record_model(merge_dag, expert, context.run.run_id)  # the newcomer has no observation of its own yet
    return cached_step(context, merge_dag, **_step_args(merge_dag, name, base, expert))


def task_vector_asset(name: str, base: ModelSource, expert: ModelSource) -> dg.AssetsDefinition:
    @dg.asset(
        key=["task_vector", name],
        deps=[["model", base.name], ["model", expert.name]],
        group_name=GROUP,
        code_version=CODE,
        pool=torch_pool(),
        op_tags=torch_tags(),
        kinds={"pytorch", "safetensors"},
        description=f"Task vector of {md_text(expert.ref)} over {md_text(base.ref)} (float32).",
    )
    def _tv(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        def meta(art, info):
            rows = "\n".join(f"| {md_text(k)} | {v:.5f} |" for k, v in info.get("per_layer_norm", {}).items())
            return {
                "tensor_count": info.get("tensor_count"),
                "l2_norm": info.get("l2_norm"),
                "per_layer_norm": dg.MetadataValue.md("| tensor group | L2 norm |\n|---|---|\n" + rows),
            }

        return run_step(context, merge_dag, metadata=meta, **_step_args(merge_dag, name, base, expert))

    return _tv


def task_vector_assets(project: Project) -> list[dg.AssetsDefinition]:
    return [task_vector_asset(name, base, expert) for name, (base, expert) in project.task_vectors.items()]
