"""The Dagster layer: a thin skin over the pure core. definitions.py (repo root) imports `defs` from
merge_dag.dagster.definitions."""
