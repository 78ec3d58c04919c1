"""Assemble the Definitions of a merge_dag project: every asset kind, checks, resource and jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import dagster as dg

from ..project import Project, load_project
from ..settings import settings
from .assets.checks import extra_checks
from .assets.evals import eval_assets
from .assets.guidance import guidance_assets
from .assets.leaderboard import leaderboard_asset
from .assets.merges import merge_assets
from .assets.search import GROUP as SEARCH_GROUP
from .assets.search import search_assets
from .assets.sources import source_assets
from .assets.task_vectors import task_vector_assets
from .executors import executor_def
from .resources import MergeDagResource, resource_from_env
from .schedules import build_schedule
from .sensors import build_lineage_sensors, build_sensor

ALL_JOB = "merge_all"


def build_definitions(
    root: Optional[str | Path] = None, project: Optional[Project] = None, resource: Optional[MergeDagResource] = None
) -> dg.Definitions:
    """Every asset, check, job, sensor and schedule of the project. A recipe file that does not load
    (project.broken) is only its own failing `recipe/<name>` source; a bad environment setting fails
    the steps, sensor ticks or schedule ticks that use it; neither stops the code location loading."""
    project = project or load_project(root)
    merges, checks = merge_assets(project)
    checks = checks + extra_checks(project)
    assets = (
        source_assets(project) + guidance_assets(project) + task_vector_assets(project) + merges + eval_assets(project)
    )
    if any(s.evals for s in project.recipes.values()):
        assets.append(leaderboard_asset(project))
    # searches (<data>/searches/*.yaml): their trials run from `merge-dag search`; the UI shows each
    # search's result and one partition per trial. Not part of merge_all (a search is not rebuilt
    # with the other artifacts).
    searches = search_assets(project.data, project.root)
    assets += searches
    resource = resource or resource_from_env(project.root, project.data)
    executor = executor_def(resource)  # multiprocess by default; in_process; celery (executors.py)
    # sources are in the job so every run observes them first: provenance names the current files
    selection = dg.AssetSelection.all(include_sources=True)
    if searches:
        selection = selection - dg.AssetSelection.groups(SEARCH_GROUP)
    merge_all = dg.define_asset_job(
        ALL_JOB,
        selection=selection,
        description="Observe every source, then build every artifact (cache hits "
        "for anything whose inputs did not change).",
        executor_def=executor,
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[merge_all],
        sensors=[build_sensor(project, ALL_JOB), *build_lineage_sensors()],
        schedules=[build_schedule(ALL_JOB)],
        resources={"merge_dag": resource},
        executor=executor,
    )


def merge_all_job(root: Optional[str] = None) -> dg.JobDefinition:
    """The merge_all job of the project at `root` (default $MERGE_DAG_ROOT, else the working
    directory): what the multiprocess executor re-imports in each step."""
    return build_definitions(settings().project_root(root)).resolve_job_def(ALL_JOB)


def reconstructable_merge_all(root: str | Path) -> dg.ReconstructableJob:
    """merge_all of the project at `root`, for dg.execute_job with an out-of-process executor.
    (The root is part of the job's pointer: Dagster caches reconstructed jobs per pointer, so two
    projects in one process must not share `dg.reconstructable(merge_all_job)`.)"""
    return dg.build_reconstructable_job(
        "merge_dag.dagster.definitions", "merge_all_job", reconstructable_kwargs={"root": str(Path(root).absolute())}
    )
