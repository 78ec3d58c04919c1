"""What the checkpoint sensor (sensors.py) decides each tick, as plain functions the tests drive:
which model folders and calibration files changed, and which assets to rebuild for them.

When is a checkpoint complete? The sensor reads each watched model folder's signature (every
file's name, size and mtime). A change starts a wait: the folder must keep the same signature for
`settle_seconds` (default 30, env MERGE_DAG_SETTLE_SECONDS) across ticks AND open as a valid
checkpoint (every safetensors header parses and every tensor's bytes are inside its file; every
shard the index names exists). A folder still being copied fails one test or the other, so it
triggers nothing. Only then is its content fingerprint computed; if it differs from the last one
the sensor saw, it requests one run of exactly the assets downstream of that model (its task
vectors, the merges that use it, their evals, its own baseline eval, the leaderboard), with the
model's observation in the same run so provenance names the new files.

Calibration sets (data-guided recipes) are watched the same way: a file whose size and mtime held
for the settle time and that parses as a calibration set, with a new sha256, triggers one run of
everything downstream of it (its statistics, allocations, coefficients, merges, evals).

Globs: a recipe may name experts as `- glob: data/models/math-*`. Each tick the sensor expands the
globs of every recipe again, so a folder that appears after the definitions loaded is watched like
any other (a folder first seen after the sensor's first tick counts as new, complete or not: it
triggers once it has settled). Its run rebuilds the recipes whose globs match it; the merge step
expands the glob again at run time and builds the newcomer's task vector inside the step, under the
same cache key that the expert's own task_vector asset finds once the code location is reloaded
(Reload in the UI, or a restart of `dagster dev`) and the graph shows it. After that reload, the
sensor requests once, by itself, the newcomer's assets that were never built (its task vector: a
cache hit; its baseline eval; the statistics of a guided recipe) and the leaderboard. A guided
recipe (LEWIS, Sens, RegMean) cannot merge a newcomer before that reload: its statistics are assets
the code location does not show yet, and the merge step says so.
"""

from pathlib import Path

import dagster as dg

from ..core.checkpoint import Checkpoint
from ..core.errors import CheckpointError, MergeDagError
from ..project import ModelSource, Project, RecipeSpec, current_spec


def folder_signature(path: Path) -> list:
    if not path.is_dir():
        return []
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


def is_complete_checkpoint(path) -> bool:
    """A folder (or a project ModelSource) that opens as a whole checkpoint; a LoRA expert's adapter
    folder must hold a parseable adapter_config.json and a complete adapter_model.safetensors whose
    every tensor fits its base (a half-written adapter fails one of these)."""
    try:
        path.open() if hasattr(path, "is_adapter") else Checkpoint(path)
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


def affected_keys(project: Project, model: str, asset_graph) -> list[dg.AssetKey]:
    """Every asset downstream of model `model` (task vectors, statistics, allocations, merges, evals,
    the leaderboard), with the model's own source and the sources of the recipes using it first so
    the run observes them. A new glob match has no asset of its own yet: its recipes' downstream.
    `asset_graph`: the code location's (the sensor passes its repository's)."""
    known = asset_graph.get_all_asset_keys()
    roots = [k for k in [dg.AssetKey(["model", model])] if k in known]
    roots += [k for s in recipes_using(project, model) for k in [dg.AssetKey(["recipe", s.name])] if k in known]
    if not roots:
        return []
    below = dg.AssetSelection.assets(*roots).downstream().resolve(asset_graph) - set(roots)
    return roots + sorted(below, key=lambda k: k.to_user_string())


def missing_after_new(asset_graph, instance: dg.DagsterInstance, model: str) -> list[dg.AssetKey]:
    """The never-materialized assets downstream of a model that appeared after the definitions
    loaded and is in the graph now (after a reload: its task vector, baseline eval, statistics),
    with the leaderboard when an eval is among them."""
    mk = dg.AssetKey(["model", model])
    if mk not in asset_graph.get_all_asset_keys():
        return []
    below = dg.AssetSelection.assets(mk).downstream().resolve(asset_graph) - {mk}
    latest = instance.get_latest_materialization_events(list(below))
    missing = sorted((k for k in below if latest.get(k) is None), key=lambda k: k.to_user_string())
    board = dg.AssetKey(["leaderboard"])
    if (
        missing
        and board in asset_graph.get_all_asset_keys()
        and board not in missing
        and any(k.path[0] == "eval" for k in missing)
    ):
        missing.append(board)
    return missing


def settle_step(
    state: dict, key: str, sig: list, now: float, settle_seconds: float, first_tick: bool, complete, fingerprint
) -> bool:
    """One watched item's tick (a model folder or a calibration file), updating `state[key]`.

    Never seen: on the first tick remember it as it is, later mark it new. A changed signature
    (re)starts the settle clock. Once the signature held for `settle_seconds` and `complete()`, its
    `fingerprint()` is taken; True if that differs from the last one seen (build it now)."""
    prev = state.get(key)
    if prev is None:
        if first_tick:  # baseline: remember it as it is, rebuild nothing
            state[key] = {"sig": sig, "since": now, "fp": fingerprint() if sig and complete() else None}
        else:  # appeared since: wait for it to settle, then build it
            state[key] = {"sig": sig, "since": now, "fp": None, "new": True}
        return False
    if sig != prev["sig"]:  # changed since the last tick: (re)start the settle clock (keeps "new")
        state[key] = {**prev, "sig": sig, "since": now}
        return False
    if not sig or now - prev["since"] < settle_seconds or not complete():
        return False
    fp = fingerprint()
    if fp == prev.get("fp"):
        return False
    state[key] = {**prev, "fp": fp}
    return True


def evaluate_models(project: Project, cursor: dict, now: float, settle_seconds: float) -> tuple[list[str], dict]:
    """One tick of the sensor's logic (pure, so tests can drive it): which models to rebuild.

    On the first tick (empty cursor) every folder is remembered as it is and nothing is rebuilt;
    afterwards a folder never seen before is new: it triggers once settled and complete."""
    state = dict(cursor)
    first_tick = not cursor
    return [
        name
        for name, m in sorted(watched_models(project).items())
        if settle_step(
            state,
            name,
            folder_signature(m.path),
            now,
            settle_seconds,
            first_tick,
            lambda m=m: is_complete_checkpoint(m),
            lambda m=m: m.fingerprint(),
        )
    ], state


def is_calibration_set(path: Path) -> bool:
    from ..guidance.calibration import load_rows
    from ..guidance.errors import CalibrationError

    try:
        load_rows(path)
        return True
    except CalibrationError:
        return False  # half-written or malformed: wait (the statistics step would name the bad line)


def evaluate_calibrations(project: Project, cursor: dict, now: float, settle_seconds: float) -> tuple[list[str], dict]:
    """The same for calibration files (cursor keys "calibration:<name>", signature size + mtime,
    complete = parses as a calibration set, fingerprint = sha256 of the file)."""
    from ..core.fingerprint import file_fingerprint

    state = dict(cursor)
    first_tick = not any(k.startswith("calibration:") for k in cursor)
    changed = []
    for name, cal in sorted(project.calibrations.items()):
        st = cal.path.stat() if cal.path.is_file() else None
        sig = [st.st_size, st.st_mtime_ns] if st else []
        if settle_step(
            state,
            f"calibration:{name}",
            sig,
            now,
            settle_seconds,
            first_tick,
            lambda c=cal: is_calibration_set(c.path),
            lambda c=cal: file_fingerprint(c.path),
        ):
            changed.append(name)
    return changed, state


def fixed_recipes_note(project: Project) -> str:
    """A note on the recipe files that did not load but do now (a glob's first match arrived, a typo
    was fixed): their assets appear at the next reload of the code location."""
    if not project.broken:
        return ""
    from ..project import load_project

    still = {b.file for b in load_project(project.root, project.data).broken.values()}
    fixed = [b.file.name for b in project.broken.values() if b.file.exists() and b.file not in still]
    return f"; recipe file(s) {', '.join(fixed)} load now: reload the code location to build them" if fixed else ""
