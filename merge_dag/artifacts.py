"""Content-addressed artifacts: the key of an artifact is a hash of its kind, its step's code version,
its settings and its inputs' versions (fingerprints of sources, keys of upstream artifacts).

An artifact lives at <artifacts>/<kind>/<name>-<key[:16]>/ and is complete when that folder exists:
builders write into a temporary folder beside it and rename it into place at the end, so a folder
that exists is always whole. Asking again with the same key finds it and recomputes nothing.
Pure: no Dagster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional


def artifact_key(kind: str, code_version: str, settings: dict[str, Any], inputs: dict[str, str]) -> str:
    payload = json.dumps(
        {"kind": kind, "code": code_version, "settings": settings, "inputs": inputs},
        sort_keys=True,
        default=str,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def artifact_id(kind: str, key: str) -> str:
    return f"{kind}-{key[:16]}"


@dataclass
class Artifact:
    kind: str
    name: str
    key: str
    path: Path

    @property
    def id(self) -> str:
        return artifact_id(self.kind, self.key)

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.exists else 0


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    def artifact(self, kind: str, name: str, key: str) -> Artifact:
        return Artifact(kind, name, key, self.root / kind / f"{name}-{key[:16]}")

    def build(self, art: Artifact, builder: Callable[[Path], Any]) -> Any:
        """Run builder(tmp_folder) and rename the folder into place. Returns the builder's result."""
        art.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = art.path.parent / f".{art.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            result = builder(tmp)
            if not tmp.exists():
                raise RuntimeError(f"builder for {art.id} wrote nothing to {tmp}")
            if art.path.exists():  # built concurrently by another process with the same key: same content
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, art.path)
            return result
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
