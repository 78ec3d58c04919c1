"""The code version recorded with every artifact: a hash of merge_dag's own source files."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=None)
def code_version(*subpackages: str) -> str:
    """sha256 (12 hex) over the .py files of merge_dag (or of the named subpackages), sorted by path."""
    roots = [PACKAGE / s for s in subpackages] if subpackages else [PACKAGE]
    h = hashlib.sha256()
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            h.update(str(f.relative_to(PACKAGE)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def merge_code_version() -> str:
    """The one code version of a merged checkpoint: the code that computes its tensors and writes its
    card (the pure core and the guidance that turns into parameter maps, AIM and RegMean). The model
    card, ``merge_dag.json``, the cache key, the lineage (``audit``) and the Dagster UI all show this."""
    return code_version("core", "guidance")
