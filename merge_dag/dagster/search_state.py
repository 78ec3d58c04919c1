"""What a search keeps on disk, read back: the Optuna study (`<data>/searches/<name>/study.db`), one
record per trial (`trials/<partition>.json`, the trial's `search_trial/<name>` partition), the
report of the best recipe (`report.json`) and the merged checkpoints garbage-collected so far
(`removed.json`). Both `merge-dag search` (merge_dag.dagster.search) and the `search/<name>` and
`search_trial/<name>` assets (merge_dag.dagster.assets.search, also in `merge-dag dev`'s
definitions) read it from here."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.search import Search
from .resources import MergeDagResource

STUDY_FILE = "study.db"
REPORT_FILE = "report.json"
REMOVED_FILE = "removed.json"


@dataclass
class TrialResult:
    number: int
    key: str
    params: dict[str, Any]
    scores: dict[str, float]  # validation scores: the full evaluation's (pruned: the small subset's)
    values: list[float]  # the objective (pruned: the small subset's)
    feasible: bool
    recipe: str  # the trial's recipe name (merged/<recipe>)
    merged: Optional[dict] = None  # artifact_id, key, path of the merged checkpoint
    eval: Optional[dict] = None  # artifact_id, key of its (full) evaluation
    output_fingerprint: Optional[str] = None
    duplicate_of: Optional[int] = None
    run_id: Optional[str] = None
    pruned: bool = False  # successive halving: evaluated on the small subset only
    rung: Optional[dict] = None  # successive halving: rows, scores, value, eval of the small subset
    record: Optional[dict] = None  # artifact_id, key of its search_trial/<name> partition

    @property
    def partition(self) -> str:
        return partition_key(self.key)


def search_dir(res: MergeDagResource, name: str) -> Path:
    return res.data_path / "searches" / name


def partition_key(key: str) -> str:
    """A trial's partition of `search_trial/<name>`: the first 16 hex digits of its recipe hash."""
    return key[:16]


def partitions_name(name: str) -> str:
    """The dynamic partitions definition of a search's trials (Dagster wants [A-Za-z0-9_])."""
    return "search_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def record_path(res: MergeDagResource, name: str, partition: str) -> Path:
    return search_dir(res, name) / "trials" / f"{partition}.json"


def read_json_file(p: Path, default: Any = None) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return default


def write_json_file(p: Path, data: Any) -> None:
    """Written whole or not at all (a temporary file renamed over it)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(p)


def open_study(res: MergeDagResource, name: str, sampler=None, pruner=None):
    """The stored study, or None when the search has not started."""
    import optuna

    f = search_dir(res, name) / STUDY_FILE
    if not f.exists():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{f}", sampler=sampler, pruner=pruner)
    except KeyError:  # the file exists, this study is not in it
        return None


def trial_result(t) -> TrialResult:
    import optuna

    a = t.user_attrs
    pruned = t.state == optuna.trial.TrialState.PRUNED
    values = list(t.values or []) if not pruned else [a["rung"]["value"]] if "rung" in a else []
    return TrialResult(
        number=t.number,
        key=a["key"],
        params=dict(t.params),
        scores=a.get("scores", {}),
        values=values,
        feasible=a.get("feasible", True),
        recipe=a.get("recipe", ""),
        merged=a.get("merged"),
        eval=a.get("eval"),
        output_fingerprint=a.get("output_fingerprint"),
        duplicate_of=a.get("duplicate_of"),
        run_id=a.get("run_id"),
        pruned=pruned,
        rung=a.get("rung"),
        record=a.get("record"),
    )


def load_results(study) -> list[TrialResult]:
    """The finished trials (completed, and pruned by successive halving), in trial order."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [trial_result(t) for t in study.get_trials(deepcopy=False, states=states) if "key" in t.user_attrs]


def rank_key(search: Search, t: TrialResult) -> tuple:
    """Higher is better: fully evaluated first, then feasible, then the objective (pareto: the mean
    over tasks), then the earlier trial."""
    v = t.values[0] if len(t.values) == 1 else (sum(t.values) / len(t.values) if t.values else -math.inf)
    return (not t.pruned, t.feasible, v, -t.number)


def choose_best(search: Search, results: list[TrialResult]) -> Optional[TrialResult]:
    """The best fully evaluated trial (by `rank_key`), None when none was."""
    full = [t for t in results if not t.pruned]
    return max(full, key=lambda t: rank_key(search, t)) if full else None
