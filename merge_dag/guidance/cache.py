"""The cache keys of the statistics passes, one definition for the Dagster assets and `merge-dag merge`.

A statistic (activations, grams, sensitivity, fishers of one model on one calibration set; the Sens alignment
of a set of experts) is the artifact

    <artifacts>/<kind>/<name>-<key[:16]>/,  key = sha256(kind, code version, settings, inputs)

(merge_dag.artifacts). The settings are the calibration batch settings, the row options that differ
from their defaults and the working dtype when it is not float32 (so a statistic computed before
these options existed keeps its key); the inputs are the model's content fingerprint and the
calibration file's sha256, in that order, under the roles the Dagster steps give them. The Dagster
assets (merge_dag.dagster.assets.guidance) and the shell's guided merge (merge_dag.guidance.offline)
both compute keys here, so a statistic either of them built is a cache hit for the other.
Pure: no Dagster. `src` is a merge_dag.project.StatsSpec, `al` an AlignmentSpec (duck-typed: this
module does not import the project).
"""

from __future__ import annotations

from ..artifacts import artifact_key
from ..core.version import code_version

STATS_CODE = code_version(
    "guidance/activations.py",
    "guidance/calibration.py",
    "guidance/model.py",
    "guidance/lewis.py",
    "guidance/stats_io.py",
)
SENS_CODE = code_version("guidance/sens.py", "guidance/calibration.py", "guidance/model.py")
FISHER_CODE = code_version(
    "guidance/fisher_info.py", "guidance/calibration.py", "guidance/model.py", "guidance/stats_io.py"
)
CODE = {
    "activations": STATS_CODE,
    "grams": STATS_CODE,
    "sensitivity": SENS_CODE,
    "alignment": SENS_CODE,
    "fishers": FISHER_CODE,
}
META_FILE = "_artifact.json"  # what every step writes beside its artifact (merge_dag.dagster.steps)
RESULT = "result.json"  # sensitivity and alignment results


def dtype_settings(dtype: str) -> dict:
    """The working dtype as part of a cache key: nothing for float32 (the dtype every statistic was
    computed in before the option existed)."""
    return {} if dtype == "float32" else {"stats_dtype": dtype}


def stats_settings(kind: str, src, calibration: dict, dtype: str) -> dict:
    """The settings of the `kind` pass of `src` (calibration: the resource's calibration_settings())."""
    if kind == "sensitivity":
        return {**calibration, **src.row_settings, **dtype_settings(dtype)}
    if kind == "fishers":  # the estimator, and the sampling seed where it samples
        from .fisher_info import SEED

        est = src.estimator or "sampled"
        seed = {"seed": SEED} if est == "sampled" else {}
        return {**calibration, "estimator": est, **seed, **src.row_settings, **dtype_settings(dtype)}
    if kind not in ("activations", "grams"):
        raise ValueError(f"no statistics pass of kind {kind!r}")
    return {
        **calibration,
        "gram": kind == "grams",
        "sequential_wanda": src.sequential,
        **src.row_settings,
        **dtype_settings(dtype),
    }


def alignment_settings(al, calibration: dict, dtype: str) -> dict:
    return {**calibration, **al.members[0].row_settings, **dtype_settings(dtype)}


def stats_inputs(src) -> list[tuple[str, str]]:
    """(role, version) of a pass's inputs, in the order of the Dagster step's inputs."""
    from ..core.fingerprint import file_fingerprint

    return [("model", src.model.fingerprint()), ("calibration", file_fingerprint(src.calibration.path))]


def alignment_inputs(al) -> list[tuple[str, str]]:
    from ..core.fingerprint import file_fingerprint

    cals = dict.fromkeys(m.calibration for m in al.members)
    return [("expert", m.model.fingerprint()) for m in al.members] + [
        ("calibration", file_fingerprint(c.path)) for c in cals
    ]


def key_of(kind: str, code: str, settings: dict, inputs: list[tuple[str, str]]) -> str:
    """As merge_dag.dagster.steps.step_key: inputs keyed "<role>:<position>"."""
    return artifact_key(kind, code, settings, {f"{role}:{n}": v for n, (role, v) in enumerate(inputs)})


def stats_key(kind: str, src, calibration: dict, dtype: str) -> str:
    return key_of(kind, CODE[kind], stats_settings(kind, src, calibration, dtype), stats_inputs(src))


def alignment_key(al, calibration: dict, dtype: str) -> str:
    return key_of("alignment", SENS_CODE, alignment_settings(al, calibration, dtype), alignment_inputs(al))


def save_statistic(kind: str, stats, tmp, src, settings: dict, seconds: float) -> dict:
    """Write a per-model statistic (ActivationStats for activations/grams, FisherStats for fishers)
    into `tmp` as its asset stores it (its meta gains the model, calibration, pass time and the
    settings of its key); the step's info: tokens, pass seconds and the pass's own counts."""
    stats.meta.update({"model": src.model.ref, "calibration": src.calibration.ref, "seconds": seconds, **settings})
    stats.save(tmp)
    if kind == "fishers":
        counts = {"rows": stats.meta["rows"], "parameters": len(stats.names)}
    else:
        counts = {"sequences": stats.meta["sequences"], "linears": len(stats.names)}
    return {"tokens": stats.meta["tokens"], **counts, "pass_seconds": seconds}
