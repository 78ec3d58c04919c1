"""Dagster entry point (`dagster dev -w workspace.yaml`): the project rooted at this folder."""

from pathlib import Path

from merge_dag.dagster.definitions import build_definitions

defs = build_definitions(Path(__file__).resolve().parent)
