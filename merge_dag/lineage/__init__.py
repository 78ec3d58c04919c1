"""Lineage of every merge_dag artifact in one DuckDB file, and `merge-dag audit`. Pure: no Dagster.

from merge_dag.lineage.store import Batch, LineageStore   # store.write(Batch().artifact(...).edge(...))
from merge_dag.lineage.audit import audit        # (not re-exported here: it would shadow the module)
"""

from .audit import format_audit
from .store import EVENTS, SOURCE_KINDS, Batch, LineageLockTimeout, LineageStore

__all__ = ["LineageStore", "Batch", "LineageLockTimeout", "EVENTS", "SOURCE_KINDS", "format_audit"]
