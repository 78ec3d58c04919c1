"""merged/<recipe>: the merged checkpoint of one recipe, and an asset check that it is sound.

Recipes whose method works on task vectors read each expert as base + its cached task vector;
the others read the model folders (merge_prep.py, shared with the split asset of merge_parts.py).
The merge itself is merge_dag.core.engine, unchanged.
"""

import shutil
from pathlib import Path

import dagster as dg
import torch

from ...artifacts import read_json
from ...core.checkpoint import Checkpoint
from ...core.engine import execute, write_card
from ...core.fingerprint import checkpoint_fingerprint
from ...core.markdown import md_text
from ...core.version import merge_code_version
from ...project import Project, RecipeSpec
from ..resources import MergeDagResource, torch_pool, torch_tags
from ..steps import resolve_path, run_step
from .merge_parts import merged_parts_asset
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


def build_merge(prep: PreparedMerge, merge_dag: MergeDagResource, out: Path, card_extra: dict) -> dict:
    """Write the merged checkpoint of `prep` into `out` (a fresh folder); returns the artifact's info."""
    card_extra = merge_card_extra(prep, card_extra)
    if prep.grams is not None:
        return _regmean(prep, merge_dag, out, card_extra)
    if prep.fishers is not None:
        return _fisher(prep, merge_dag, out, card_extra)
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
            card = {
                **res.card,
                "aim": {"omega": omega, "statistics": [v for k, v in prep.guidance.items() if k.startswith("aim_")]},
            }
            write_card(out, card)
        finally:
            shutil.rmtree(target, ignore_errors=True)
        info["output_fingerprint"] = checkpoint_fingerprint(Checkpoint(out))
    return info


def _regmean(prep: PreparedMerge, merge_dag: MergeDagResource, out: Path, card_extra: dict) -> dict:
    from ...guidance.activations import ActivationStats
    from ...guidance.regmean import regmean_checkpoint

    g = prep.spec.guidance.regmean
    models = prep.spec.members
    regmean_checkpoint(
        [m.open() for m in models],
        [ActivationStats.load(prep.grams[m.ref]) for m in models],
        out,
        a=g.a,
        ridge=g.ridge,
        device=merge_dag.device,
    )
    return _solved_merge_result(prep, out, "regmean", card_extra, base_role=False)


def _fisher(prep: PreparedMerge, merge_dag: MergeDagResource, out: Path, card_extra: dict) -> dict:
    from ...guidance.fisher import FisherStats, fisher_checkpoint, recipe_out_dtype, recipe_weights

    spec = prep.spec
    g = spec.guidance.fisher
    fisher_checkpoint(
        [e.open() for e in spec.experts],
        [FisherStats.load(prep.fishers[e.ref]) for e in spec.experts],
        out,
        weights=recipe_weights(spec.recipe, [e.ref for e in spec.experts]),
        base=spec.base.open() if spec.base is not None else None,
        epsilon=g.epsilon,
        device=merge_dag.device,
        out_dtype=recipe_out_dtype(spec.recipe),
        normalize=g.normalize,
    )
    return _solved_merge_result(prep, out, "fisher", card_extra, base_role=True)


def _solved_merge_result(prep: PreparedMerge, out: Path, method: str, card_extra: dict, base_role: bool) -> dict:
    """The model card and step result of a merge written outside the engine (RegMean, Fisher): the
    recipe's models as inputs (`base_role`: the base, where the recipe has one, in role `base`; RegMean
    solves every model alike)."""
    from ...core.card import build_card

    spec = prep.spec
    models = spec.members
    fps = {m.ref: m.fingerprint() for m in models}
    ck = Checkpoint(out)
    dtype = str(next(iter(ck.tensors.values())).dtype).removeprefix("torch.")
    inputs = [
        {
            "role": "base" if base_role and m is spec.base else "model",
            "model": m.ref,
            "path": str(m.path),
            "fingerprint": fps[m.ref],
        }
        for m in models
    ]
    card = build_card(
        method,
        prep.settings["recipe"],
        str(spec.file),
        inputs,
        dtype,
        spec.recipe.seed,
        models[0].ref,
        len(ck.tensors),
        card_extra,
    )
    write_card(out, card)
    return {
        "tensor_count": len(ck.tensors),
        "bytes": sum(i.nbytes for i in ck.tensors.values()),
        "method": method,
        "input_fingerprints": fps,
        "output_fingerprint": checkpoint_fingerprint(ck),
    }


def merged_asset(project: Project, spec: RecipeSpec) -> dg.AssetsDefinition:
    code = merge_code_version()
    deps = merged_deps(project, spec)

    @dg.asset(
        key=["merged", spec.name],
        deps=deps,
        group_name=GROUP,
        code_version=code,
        pool=torch_pool(),
        op_tags=torch_tags(),
        kinds={"pytorch", "safetensors"},
        description=f"{md_text(spec.recipe.merge_method)} merge of {len(spec.experts)} model(s), recipe "
        f"{md_text(spec.file.name)}.",
    )
    def _merged(context: dg.AssetExecutionContext, merge_dag: MergeDagResource) -> dg.MaterializeResult:
        prep = prepare_merge(context, merge_dag, project, spec)

        def build(tmp, art):
            return build_merge(prep, merge_dag, tmp, {"artifact_id": art.id, "name": spec.name})

        def meta(art, info):
            return merged_metadata(prep, art, info, merge_dag)

        return run_step(
            context,
            merge_dag,
            kind="merged",
            name=spec.name,
            code_version=code,
            settings=prep.settings,
            inputs=prep.inputs,
            build=build,
            metadata=meta,
        )

    return _merged


def layout_problems(out: Checkpoint, ref: Checkpoint, sliced: bool = False) -> list[str]:
    """How a merged checkpoint's tensor names and shapes differ from its base's, less what its card
    (merge_dag.json) says was meant: tensors left out (`skipped_tensors`, missing_tensors: skip) and
    vocabulary tensors mapped onto another vocabulary size (`vocabulary.tensors`: rows may differ).
    A passthrough stack (`sliced`) legitimately changes the tensor names."""
    card = read_json(out.folder / "merge_dag.json") or {}
    skipped = set(card.get("skipped_tensors") or [])
    by_token = set((card.get("vocabulary") or {}).get("tensors") or [])
    problems = []
    missing = sorted(set(ref.tensors) - set(out.tensors) - skipped)[:5]
    extra = sorted(set(out.tensors) - set(ref.tensors))[:5]
    if (missing or extra) and not sliced:
        problems.append(f"tensor names differ from base: missing {missing}, extra {extra}")
    for name, info in out.tensors.items():
        want = ref.tensors[name].shape if name in ref.tensors else info.shape
        if want != info.shape and not (name in by_token and want[1:] == info.shape[1:]):
            problems.append(f"{name}: shape {list(info.shape)} != base {list(want)}")
    return problems


def merged_check(spec: RecipeSpec) -> dg.AssetChecksDefinition:
    reference = spec.base or spec.experts[0]

    @dg.asset_check(
        asset=dg.AssetKey(["merged", spec.name]),
        name="loads_and_matches_base",
        blocking=True,
        description="The merged folder loads (safetensors + config), has the base's tensor names and "
        "shapes, and holds no NaN/Inf.",
    )
    def _check(context: dg.AssetCheckExecutionContext, merge_dag: MergeDagResource) -> dg.AssetCheckResult:
        ev = context.instance.get_latest_materialization_event(dg.AssetKey(["merged", spec.name]))
        path = resolve_path(merge_dag.root, ev.asset_materialization.metadata["path"].value)
        try:
            out = Checkpoint(path, name=f"merged/{spec.name}")
            ref = reference.open()
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            return dg.AssetCheckResult(passed=False, metadata={"error": str(e)})
        problems = layout_problems(out, ref, bool(spec.recipe.slices))
        for name in out.tensors:
            t = out.get(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                problems.append(f"{name}: contains NaN/Inf")
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            problems.append(f"config.json does not load: {e}")
        return dg.AssetCheckResult(
            passed=not problems, metadata={"tensors": len(out.tensors), "problems": "\n".join(problems) or "none"}
        )

    return _check


def merge_assets(project: Project) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    specs = list(project.recipes.values())
    return (
        [merged_parts_asset(project, s) if s.recipe.parts > 1 else merged_asset(project, s) for s in specs],
        [merged_check(s) for s in specs],
    )
