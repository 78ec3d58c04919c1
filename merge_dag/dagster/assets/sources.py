"""Source assets: model folders, recipe files, calibration sets and eval task sets, observed by
content fingerprint.

A model's data version is its checkpoint fingerprint (merge_dag.core.fingerprint: a sha256 hash
tree over tensor names, dtypes, shapes and bytes plus config.json, cached per shard by path, size,
mtime and inode, so re-observing an unchanged model costs a stat per shard). A recipe's is the sha256
of its canonical YAML content (comments and key order do not count); eval tasks', the sha256 of
data/tasks and data/eval; a calibration set's, the sha256 of its jsonl file. A model folder written
by `merge-dag import` also records its GGUF file (kind gguf, sha256 of the file) as the model
source's parent, from the folder's merge_dag.json.
"""

import hashlib
import json

import dagster as dg

from ...core.fingerprint import file_fingerprint
from ...core.gguf_import import lineage_ops
from ...core.markdown import md_text
from ...lineage.batch import Batch
from ...project import BrokenRecipe, CalibrationSource, ModelSource, Project, RecipeSpec, current_spec, load_project
from ..resources import MergeDagResource
from ..steps import record_model, record_source

GROUP = "sources"


def recipe_fingerprint(spec: RecipeSpec) -> str:
    canonical = json.dumps(spec.recipe.to_yaml_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def tasks_fingerprint(project: Project) -> str:
    h = hashlib.sha256()
    for folder in (project.tasks_dir, project.eval_dir):
        h.update(file_fingerprint(folder).encode() if folder.exists() else b"-")
    return "sha256:" + h.hexdigest()


def model_source_asset(m: ModelSource) -> dg.AssetsDefinition:
    @dg.observable_source_asset(
        key=["model", m.name],
        group_name=GROUP,
        description=(
            f"LoRA adapter {md_text(m.path)} on base {md_text(m.base)}"
            if m.is_adapter
            else f"Checkpoint folder {md_text(m.ref)} ({md_text(m.path)})"
        )
        + ", versioned by content fingerprint.",
    )
    def _observe(context, merge_dag: MergeDagResource) -> dg.ObserveResult:
        fp = record_model(merge_dag, m, context.run.run_id)
        nbytes = m.weight_bytes()
        metadata = {"fingerprint": fp, "path": dg.MetadataValue.path(str(m.path)), "bytes": nbytes}
        if m.is_adapter:
            metadata.update({"base": dg.MetadataValue.path(str(m.base)), "kind": "LoRA adapter"})
        else:
            imported = lineage_ops(m.path, name=m.name, run_id=context.run.run_id, model_fingerprint=fp, model=False)
            if imported:  # a `merge-dag import` folder: its GGUF is recorded as the model source's parent
                merge_dag.lineage().write(Batch.from_records(imported))
                metadata["imported_from"] = imported[0][1]["key_hash"]
        return dg.ObserveResult(data_version=dg.DataVersion(fp), metadata=metadata)

    return _observe


def recipe_source_asset(project: Project, spec: RecipeSpec) -> dg.AssetsDefinition:
    @dg.observable_source_asset(
        key=["recipe", spec.name], group_name=GROUP, description=f"Recipe file {md_text(spec.file)}"
    )
    def _observe(context, merge_dag: MergeDagResource) -> dg.ObserveResult:
        fp = recipe_fingerprint(current_spec(project, spec))  # the file as it is now, globs expanded
        record_source(
            merge_dag, kind="recipe", name=spec.name, fingerprint=fp, path=spec.file, run_id=context.run.run_id
        )
        return dg.ObserveResult(
            data_version=dg.DataVersion(fp),
            metadata={
                "fingerprint": fp,
                "path": dg.MetadataValue.path(str(spec.file)),
                "method": spec.recipe.merge_method,
            },
        )

    return _observe


def broken_recipe_asset(project: Project, b: BrokenRecipe) -> dg.AssetsDefinition:
    """recipe/<name> of a file that did not load: its observation fails with the file and the cause
    (as the file is at run time), so the problem shows in the UI and in the run while every other
    recipe's assets work as usual."""

    @dg.observable_source_asset(
        key=["recipe", b.name],
        group_name=GROUP,
        description=f"NOT LOADED: recipe file {md_text(b.file)}: {md_text(b.error)} "
        "(fix it, then reload the code location; the other recipes are "
        "unaffected)",
    )
    def _observe(context) -> dg.ObserveResult:
        now = next((x for x in load_project(project.root, project.data).broken.values() if x.file == b.file), None)
        if now is not None:
            message = now.error
        elif b.file.exists():
            message = (
                f"{b.file}: loads now; reload the code location (Reload in the UI, or restart "
                "`merge-dag dev`) to get its assets"
            )
        else:
            message = f"{b.file}: removed; reload the code location to drop recipe/{b.name}"
        raise dg.Failure(description=message, metadata={"file": dg.MetadataValue.path(str(b.file)), "error": message})

    return _observe


def tasks_source_asset(project: Project) -> dg.AssetsDefinition:
    @dg.observable_source_asset(
        key=["eval_tasks"],
        group_name=GROUP,
        description="lm-eval task definitions (data/tasks) and their data (data/eval).",
    )
    def _observe(context, merge_dag: MergeDagResource) -> dg.ObserveResult:
        fp = tasks_fingerprint(project)
        record_source(
            merge_dag,
            kind="tasks",
            name="eval_tasks",
            fingerprint=fp,
            path=project.tasks_dir,
            run_id=context.run.run_id,
        )
        return dg.ObserveResult(data_version=dg.DataVersion(fp), metadata={"fingerprint": fp})

    return _observe


def calibration_source_asset(cal: CalibrationSource) -> dg.AssetsDefinition:
    @dg.observable_source_asset(
        key=["calibration", cal.name],
        group_name=GROUP,
        description=f"Calibration set {md_text(cal.ref)} ({md_text(cal.path)}), versioned by sha256.",
    )
    def _observe(context, merge_dag: MergeDagResource) -> dg.ObserveResult:
        fp = file_fingerprint(cal.path)
        record_source(
            merge_dag,
            kind="calibration",
            name=cal.name,
            fingerprint=fp,
            path=cal.path,
            run_id=context.run.run_id,
            nbytes=cal.path.stat().st_size,
        )
        return dg.ObserveResult(
            data_version=dg.DataVersion(fp), metadata={"fingerprint": fp, "path": dg.MetadataValue.path(str(cal.path))}
        )

    return _observe


def source_assets(project: Project) -> list[dg.AssetsDefinition]:
    out = [model_source_asset(m) for m in project.models.values()]
    out += [recipe_source_asset(project, s) for s in project.recipes.values()]
    out += [broken_recipe_asset(project, b) for b in project.broken.values()]
    out += [calibration_source_asset(c) for c in project.calibrations.values()]
    if any(s.evals for s in project.recipes.values()):
        out.append(tasks_source_asset(project))
    return out
