"""Source assets: model folders, recipe files and eval task sets, observed by content fingerprint.

A model's data version is its checkpoint fingerprint (merge_dag.core.fingerprint: a sha256 hash
tree over tensor names, dtypes, shapes and bytes plus config.json, cached per shard by path, size,
mtime and inode, so re-observing an unchanged model costs a stat per shard). A recipe's is the sha256
of its canonical YAML content (comments and key order do not count); eval tasks', the sha256 of
data/tasks and data/eval. A model folder written by `merge-dag import` also records its GGUF file
(kind gguf, sha256 of the file) as the model source's parent, from the folder's merge_dag.json.
"""


import hashlib
import json

import dagster as dg

from ...core.fingerprint import checkpoint_fingerprint, file_fingerprint
from ...core.gguf_import import lineage_ops
from ...project import ModelSource, Project, RecipeSpec, current_spec
from ..resources import MergeDagResource
from ..steps import record_source

GROUP = "sources"


def recipe_fingerprint(spec: RecipeSpec) -> str:
    canonical = json.dumps(spec.recipe.to_yaml_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def tasks_fingerprint(project: Project) -> str:
    h = hashlib.sha256()
    for folder in (project.root / "data" / "tasks", project.root / "data" / "eval"):
        h.update(file_fingerprint(folder).encode() if folder.exists() else b"-")
    return "sha256:" + h.hexdigest()


def model_source_asset(m: ModelSource) -> dg.AssetsDefinition:
    @dg.observable_source_asset(key=["model", m.name], group_name=GROUP,
                                description=f"Checkpoint folder {m.ref} ({m.path}), versioned by content fingerprint.")
    def _observe(context, merge_dag: MergeDagResource) -> dg.ObserveResult:
        fp = checkpoint_fingerprint(m.path)
        nbytes = sum(f.stat().st_size for f in m.path.glob("*.safetensors"))
        record_source(merge_dag, kind="model", name=m.name, fingerprint=fp, path=m.path, run_id=context.run.run_id,
                      nbytes=nbytes)
        metadata = {"fingerprint": fp, "path": dg.MetadataValue.path(str(m.path)), "bytes": nbytes}
        imported = lineage_ops(m.path, name=m.name, run_id=context.run.run_id, model_fingerprint=fp, model=False)
        if imported:  # a `merge-dag import` folder: its GGUF is recorded as the model source's parent
            merge_dag.lineage().record_batch(imported)
            metadata["imported_from"] = imported[0][1]["key_hash"]
        return dg.ObserveResult(data_version=dg.DataVersion(fp), metadata=metadata)

    return _observe


def recipe_source_asset(project: Project, spec: RecipeSpec) -> dg.AssetsDefinition:
    @dg.observable_source_asset(key=["recipe", spec.name], group_name=GROUP,
                                description=f"Recipe file {spec.file}")
    def _observe(context, merge_dag: MergeDagResource) -> dg.ObserveResult:
        fp = recipe_fingerprint(current_spec(project, spec))  # the file as it is now, globs expanded
        record_source(merge_dag, kind="recipe", name=spec.name, fingerprint=fp, path=spec.file, run_id=context.run.run_id)
        return dg.ObserveResult(data_version=dg.DataVersion(fp),
                                metadata={"fingerprint": fp, "path": dg.MetadataValue.path(str(spec.file)),
                                          "method": spec.recipe.merge_method})

    return _observe


def tasks_source_asset(project: Project) -> dg.AssetsDefinition:
    @dg.observable_source_asset(key=["eval_tasks"], group_name=GROUP,
                                description="lm-eval task definitions (data/tasks) and their data (data/eval).")
    def _observe(context, merge_dag: MergeDagResource) -> dg.ObserveResult:
        fp = tasks_fingerprint(project)
        record_source(merge_dag, kind="tasks", name="eval_tasks", fingerprint=fp, path=project.root / "data" / "tasks",
                      run_id=context.run.run_id)
        return dg.ObserveResult(data_version=dg.DataVersion(fp), metadata={"fingerprint": fp})

    return _observe


def source_assets(project: Project) -> list[dg.AssetsDefinition]:
    out = [model_source_asset(m) for m in project.models.values()]
    out += [recipe_source_asset(project, s) for s in project.recipes.values()]
    if any(s.evals for s in project.recipes.values()):
        out.append(tasks_source_asset(project))
    return out
