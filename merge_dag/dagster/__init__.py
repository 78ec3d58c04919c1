"""The Dagster layer: a thin skin over the pure core. definitions.py builds the Definitions of a
project (assets/, sensors.py, schedules.py, resources.py); the repository's definitions.py loads
them for `dagster dev`. The `merge-dag` commands that run them are in merge_dag.commands."""
