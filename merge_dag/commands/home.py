"""DAGSTER_HOME for a merge_dag project: <data>/dagster_home (data: `core.paths.data_dir`) unless set, so runs persist.

merge_dag owns two keys of its dagster.yaml: `telemetry.enabled` and `nux.enabled` (the "Join the
Dagster community" modal), both false. A dagster.yaml written by an earlier merge_dag (or edited by
hand) keeps everything else as it is: a missing owned key is appended as text (comments survive);
an owned key with another value is set and the file rewritten (its other keys and values kept).
"""

import os
from pathlib import Path

import yaml

HEADER = "# Written by merge_dag. Runs, schedules and sensor state persist here (SQLite).\n"
OWNED = {"telemetry": {"enabled": False}, "nux": {"enabled": False}}
BLOCKS = {
    "telemetry": "telemetry:\n  enabled: false\n",
    "nux": '# no "Join the Dagster community" modal over the first page\nnux:\n  enabled: false\n',
}
DEFAULTS = """\
concurrency:
  pools:
    # steps in the same pool (merge_dag puts torch steps on a CUDA device in pool "gpu") run one at a time
    default_limit: 1
"""
DAGSTER_YAML = HEADER + BLOCKS["telemetry"] + BLOCKS["nux"] + DEFAULTS


def update_dagster_yaml(cfg: Path) -> bool:
    """Write or update `cfg` so the keys merge_dag owns have its values; True if the file changed."""
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
        return True
    text = cfg.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        from ..core.errors import MergeDagError

        raise MergeDagError(f"{cfg}: not a YAML mapping; fix or remove it (merge_dag rewrites it when absent)")
    wrong = {
        k: v
        for k, v in OWNED.items()
        if k in data and not (isinstance(data[k], dict) and all(data[k].get(a) == b for a, b in v.items()))
    }
    missing = [k for k in OWNED if k not in data]
    if not wrong and not missing:
        return False
    if wrong:
        for k, v in wrong.items():
            data[k] = {**(data[k] if isinstance(data[k], dict) else {}), **v}
        body = yaml.safe_dump({k: v for k, v in data.items() if k not in missing}, sort_keys=False)
        text = (HEADER if text.startswith(HEADER) else "") + body
    text = text + ("" if text.endswith("\n") or not text else "\n") + "".join(BLOCKS[k] for k in missing)
    cfg.write_text(text)
    return True


def ensure_dagster_home(root: Path) -> Path:
    from ..core.paths import data_dir

    home = Path(os.environ.get("DAGSTER_HOME") or data_dir(root) / "dagster_home").absolute()
    home.mkdir(parents=True, exist_ok=True)
    update_dagster_yaml(home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home
