"""merged/<recipe> for recipes with `parts: N` (N > 1): one asset, materialized by N + 2 steps.

    prepare ──> part_1_of_N ──┐
            ├─> part_2_of_N ──┼─> finalize
            └─> ...         ──┘

`prepare` reads the recipe and its inputs at run time (merge_prep.prepare_merge, as the one-step asset
does) and computes the cache key. If the artifact exists, the part steps do nothing and `finalize`
records the cache hit. Otherwise each part step merges a contiguous range of whole output shards
(merge_dag.core.parts) into a staging folder under the artifacts folder, keyed by the cache key
(<artifacts>/_staging/merged/<name>-<key[:16]>/), and `finalize` assembles the checkpoint into the
content-addressed store with the same key, lineage records, metadata and data version as the
one-step asset, then removes the staging folder. A failed run keeps the staging folder, so a retry
(re-execute from failure, or a new run) redoes only the parts that did not finish.

The part steps run under the torch pool, so with the pool limit at 1 they run one after another on
one GPU, and in parallel where the pool (or none, on the CPU) allows. Steps pass only the prepared
merge (paths, keys, the recipe) between them; every worker must see the artifacts folder.

Shards: the one-step asset writes 2 GB shards. A split merge does too, unless the model is smaller
than N x 2 GB: then its shards are made N times smaller than the whole model, so that every part has
shards to write. Shard boundaries never change the content fingerprint (it is over tensors).
"""

import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from ...core.checkpoint import parse_size
from ...core.engine import MergePlan
from ...core.markdown import md_text
from ...core.parts import execute_part, finalize_parts
from ...core.version import merge_code_version
from ...project import Project, RecipeSpec
from ..resources import MergeDagResource, torch_pool, torch_tags
from ..steps import run_step, step_key
from .merge_prep import (
    GROUP,
    PreparedMerge,
    merge_card_extra,
    merge_info,
    merge_plan,
    merged_deps,
    merged_metadata,
    prepare_merge,
)

KIND = "merged"
SHARD_SIZE = "2GB"  # what the one-step asset writes (engine.execute's default)


def split_shard_bytes(plan: MergePlan, parts: int) -> int:
    """2 GB, or the whole output / parts when that is smaller (so every part has a shard to write)."""
    return max(1, min(parse_size(SHARD_SIZE), math.ceil(plan.out_bytes / parts)))


@dataclass
class SplitMerge:
    """What `prepare` hands to the part steps and to `finalize` (through the IO manager)."""

    prep: PreparedMerge
    key: str
    artifact: str  # the artifact folder (exists: cache hit)
    staging: str  # where the parts write
    hit: bool


def merged_parts_asset(project: Project, spec: RecipeSpec) -> dg.AssetsDefinition:
    parts = spec.recipe.parts
    code = merge_code_version()
    deps = merged_deps(project, spec)
    pool = torch_pool()

    @dg.op(
        name="prepare",
        ins={"deps": dg.In(dg.Nothing)},
        pool=pool,
        tags=torch_tags(),
        description="Read the recipe and its inputs now, and compute the cache key.",
    )
    def prepare(context: dg.OpExecutionContext, merge_dag: MergeDagResource) -> SplitMerge:
        prep = prepare_merge(context, merge_dag, project, spec)
        unsplittable = [
            n
            for n, v in (
                ("guidance.regmean", getattr(prep, "grams", None)),
                ("guidance.fisher", getattr(prep, "fishers", None)),
                ("guidance.aim", getattr(prep, "aim_stats", None)),
            )
            if v is not None
        ]
        if unsplittable:
            raise dg.Failure(
                f"{spec.file}: parts: {parts}: a merge with {' and '.join(unsplittable)} is not "
                "written tensor by tensor by the engine, so it cannot be split; set parts: 1"
            )
        if prep.recipe.parts != parts:
            context.log.warning(
                f"{spec.file} now says parts: {prep.recipe.parts}; this graph was loaded with "
                f"parts: {parts}, which this run uses (reload the code location to change it)"
            )
        key = step_key(KIND, code, prep.settings, prep.inputs)
        store = merge_dag.store()
        art = store.artifact(KIND, spec.name, key)
        staging = store.root / "_staging" / KIND / art.path.name
        if art.exists:
            context.log.info(f"{KIND}/{spec.name}: cache hit {art.id}; the part steps have nothing to do")
        else:
            context.log.info(f"{KIND}/{spec.name}: {art.id} is not built; {parts} part steps write into {staging}")
        return SplitMerge(prep, key, str(art.path), str(staging), art.exists)

    def part_op(k: int) -> dg.OpDefinition:
        @dg.op(
            name=f"part_{k + 1}_of_{parts}",
            pool=pool,
            tags=torch_tags(),
            description=f"Merge the tensors of part {k + 1} of {parts} (whole shards) into the staging folder.",
        )
        def part(context: dg.OpExecutionContext, merge_dag: MergeDagResource, split: SplitMerge) -> dict[str, Any]:
            if split.hit:
                context.log.info(f"part {k + 1} of {parts}: cache hit, nothing to merge")
                return {"part": k + 1, "cache": "hit"}
            plan = merge_plan(split.prep, merge_dag)
            res = execute_part(plan, split.staging, k, parts, split_shard_bytes(plan, parts))
            if res.skipped:
                context.log.info(f"part {k + 1} of {parts}: already in {split.staging} from an earlier run")
            else:
                context.log.info(
                    f"part {k + 1} of {parts}: merged {res.tensor_count} tensors into "
                    f"{len(res.shards)} shard(s) in {res.seconds:.1f} s"
                )
            return {
                "part": k + 1,
                "cache": "miss",
                "shards": res.shards,
                "tensor_count": res.tensor_count,
                "bytes": res.bytes,
                "seconds": res.seconds,
                "skipped": res.skipped,
            }

        return part

    part_ops = [part_op(k) for k in range(parts)]

    @dg.op(
        name="finalize",
        out=dg.Out(dg.Nothing),
        description="Assemble the parts into the content-addressed merged checkpoint; record lineage.",
    )
    def finalize(
        context: dg.OpExecutionContext, merge_dag: MergeDagResource, split: SplitMerge, parts_done: list
    ) -> dg.Output:
        prep = split.prep

        def build(tmp: Path, art) -> dict:
            plan = merge_plan(prep, merge_dag)
            card_extra = merge_card_extra(prep, {"artifact_id": art.id, "name": spec.name})
            res = finalize_parts(
                plan, split.staging, tmp, parts, card_extra, shard_size=split_shard_bytes(plan, parts), cleanup=False
            )
            return {**merge_info(res), "parts": parts}

        result = run_step(
            context,
            merge_dag,
            kind=KIND,
            name=spec.name,
            code_version=code,
            settings=prep.settings,
            inputs=prep.inputs,
            build=build,
            metadata=lambda art, info: merged_metadata(prep, art, info, merge_dag),
        )
        shutil.rmtree(split.staging, ignore_errors=True)
        with warnings.catch_warnings():  # Output(data_version=) is marked beta; it is what run_step reports
            warnings.simplefilter("ignore", dg.BetaWarning)
            return dg.Output(None, metadata=result.metadata, data_version=result.data_version)

    def compose(**dep_inputs):
        split = prepare(deps=list(dep_inputs.values()))
        return finalize(split, [op(split) for op in part_ops])

    return dg.graph_asset(
        compose,
        key=["merged", spec.name],
        group_name=GROUP,
        code_version=code,
        kinds={"pytorch", "safetensors"},
        ins={f"dep_{i}": dg.AssetIn(key=dg.AssetKey(d), dagster_type=dg.Nothing) for i, d in enumerate(deps)},
        description=f"{md_text(spec.recipe.merge_method)} merge of {len(spec.experts)} model(s), recipe "
        f"{md_text(spec.file.name)}, "
        f"in {parts} part steps.",
    )
