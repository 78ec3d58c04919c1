"""Automation: a sensor that re-merges when a checkpoint lands or changes, and a nightly schedule.

When is a checkpoint complete? The sensor reads each watched model folder's signature (every
file's name, size and mtime). A change starts a wait: the folder must keep the same signature for
`settle_seconds` (default 30, env MERGE_DAG_SETTLE_SECONDS) across ticks AND open as a valid
checkpoint (every safetensors header parses and every tensor's bytes are inside its file; every
shard the index names exists). A folder still being copied fails one test or the other, so it
triggers nothing. Only then is its content fingerprint computed; if it differs from the last one
the sensor saw, it requests one run of exactly the assets downstream of that model (its task
vectors, the merges that use it, their evals, its own baseline eval, the leaderboard), with the
model's observation in the same run so provenance names the new files.

Globs: a recipe may name experts as `- glob: data/models/math-*`. Each tick the sensor expands the
globs of every recipe again, so a folder that appears after the definitions loaded is watched like
any other (a folder first seen after the sensor's first tick counts as new, complete or not: it
triggers once it has settled). Its run rebuilds the recipes whose globs match it; the merge step
expands the glob again at run time and builds the newcomer's task vector inside the step, under the
same cache key that the expert's own task_vector asset finds once the code location is reloaded
(Reload in the UI, or a restart of `dagster dev`) and the graph shows it.
"""

import json
import os
import time
from pathlib import Path
from typing import Optional

import dagster as dg

from ..core.checkpoint import Checkpoint
from ..core.errors import CheckpointError, MergeDagError
from ..core.fingerprint import checkpoint_fingerprint
from ..project import ModelSource, Project, RecipeSpec, current_spec

SENSOR_NAME = "checkpoint_sensor"
SCHEDULE_NAME = "nightly_rebuild"


def folder_signature(path: Path) -> list:
    if not path.is_dir():
        return []
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


def is_complete_checkpoint(path: Path) -> bool:
    try:
        Checkpoint(path)
        return True
    except CheckpointError:
        return False


def _members(spec: RecipeSpec) -> set[str]:
    return {m.name for m in spec.members}


def _now(project: Project, spec: RecipeSpec) -> RecipeSpec | None:
    """The recipe with its globs expanded against the disk now (None if the file is broken now)."""
    try:
        return current_spec(project, spec)
    except (MergeDagError, OSError):
        return None


def watched_models(project: Project) -> dict[str, ModelSource]:
    """The models the recipes name: those the definitions know, plus new matches of their globs."""
    out = dict(project.models)
    for spec in project.recipes.values():
        if spec.recipe.globs and (now := _now(project, spec)) is not None:
            for m in now.experts:
                out.setdefault(m.name, m)
    return out


def recipes_using(project: Project, model: str) -> list[RecipeSpec]:
    out = []
    for spec in project.recipes.values():
        if model in _members(spec):
            out.append(spec)
        elif spec.recipe.globs and (now := _now(project, spec)) is not None and model in _members(now):
            out.append(spec)
    return out


def affected_keys(project: Project, model: str) -> list[dg.AssetKey]:
    """Every asset downstream of model `model`, with the model's own source key first (a new glob
    match has no asset of its own yet: its recipes' merges, evals and the leaderboard)."""
    keys = [["model", model]] if model in project.models else []
    recipes = recipes_using(project, model)
    for tv, (base, expert) in project.task_vectors.items():
        if model in (base.name, expert.name):
            keys.append(["task_vector", tv])
    for s in recipes:
        keys += [["recipe", s.name], ["merged", s.name]]
        if s.evals:
            keys.append(["eval", "merged", s.name])
    if model in project.model_evals:
        keys.append(["eval", "model", model])
    if any(s.evals for s in recipes) or model in project.model_evals:
        keys.append(["leaderboard"])
    return [dg.AssetKey(k) for k in keys]


def evaluate_models(project: Project, cursor: dict, now: float, settle_seconds: float) -> tuple[list[str], dict]:
    """One tick of the sensor's logic (pure, so tests can drive it): which models to rebuild.

    On the first tick (empty cursor) every folder is remembered as it is and nothing is rebuilt;
    afterwards a folder never seen before is new: it triggers once settled and complete."""
    out: list[str] = []
    state = dict(cursor)
    first_tick = not cursor
    for name, m in sorted(watched_models(project).items()):
        sig = folder_signature(m.path)
        prev = state.get(name)
        if prev is None:
            if first_tick:  # baseline: remember it as it is, rebuild nothing
                fp = checkpoint_fingerprint(m.path) if sig and is_complete_checkpoint(m.path) else None
                state[name] = {"sig": sig, "since": now, "fp": fp}
            else:  # a folder that appeared since: wait for it to settle, then build it
                state[name] = {"sig": sig, "since": now, "fp": None}
            continue
        if sig != prev["sig"]:  # changed since the last tick: (re)start the settle clock
            state[name] = {"sig": sig, "since": now, "fp": prev.get("fp")}
            continue
        if not sig or now - prev["since"] < settle_seconds or not is_complete_checkpoint(m.path):
            continue
        fp = checkpoint_fingerprint(m.path)
        if fp != prev.get("fp"):
            out.append(name)
            state[name] = {**prev, "fp": fp}
    return out, state


def build_sensor(project: Project, job_name: str, settle_seconds: Optional[float] = None) -> dg.SensorDefinition:
    settle = float(os.environ.get("MERGE_DAG_SETTLE_SECONDS", "30")) if settle_seconds is None else settle_seconds

    @dg.sensor(name=SENSOR_NAME, job_name=job_name, minimum_interval_seconds=15,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Rebuilds what depends on a model folder once a new or changed checkpoint has been "
                           f"stable for {settle:g} s and opens as a complete safetensors checkpoint.")
    def _sensor(context: dg.SensorEvaluationContext):
        cursor = json.loads(context.cursor) if context.cursor else {}
        changed, state = evaluate_models(project, cursor, time.time(), settle)
        for name in changed:
            fp = state[name]["fp"]
            yield dg.RunRequest(run_key=f"{name}:{fp}:{state[name]['since']}",
                                asset_selection=affected_keys(project, name),
                                tags={"merge_dag/trigger": f"model/{name}", "merge_dag/fingerprint": fp})
        context.update_cursor(json.dumps(state))
        if not changed:
            yield dg.SkipReason("no new or changed complete checkpoint")

    return _sensor


def build_schedule(job_name: str) -> dg.ScheduleDefinition:
    cron = os.environ.get("MERGE_DAG_SCHEDULE", "0 3 * * *")
    return dg.ScheduleDefinition(
        name=SCHEDULE_NAME, job_name=job_name, cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-observe every source and rebuild whatever is stale ({cron}); unchanged artifacts are "
                    "cache hits, so a quiet night costs fingerprints only.")
