"""merge_dag: a declarative, incremental, auditable build system for model merges."""

__version__ = "0.1.0"
