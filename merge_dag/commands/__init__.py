"""The `merge-dag` subcommands that drive a project through Dagster: `demo` (materialize everything
in process, print the results), `compare` (guided vs plain merges), `dev` (the UI, daemon, sensor and
schedule), and home.py (the project's DAGSTER_HOME). merge_dag.cli imports a subcommand's module only
when it runs; Dagster itself is imported inside the functions that need it."""
