"""The sensors: `checkpoint_sensor` rebuilds what depends on a model folder or calibration file once
a new or changed one has settled (the decision is watch.py's), and the run status sensors write
every run's end into the lineage `runs` table."""

import json
import time
from typing import Optional

import dagster as dg

from ..core.markdown import md_text
from ..project import Project
from ..settings import SettingsError, settings
from .watch import affected_keys, evaluate_calibrations, evaluate_models, fixed_recipes_note, missing_after_new

SENSOR_NAME = "checkpoint_sensor"


def build_sensor(project: Project, job_name: str, settle_seconds: Optional[float] = None) -> dg.SensorDefinition:
    s = settings()
    settle, bad_setting = (
        (s.settle_seconds, s.invalid.get("settle_seconds")) if settle_seconds is None else (settle_seconds, None)
    )
    broken = "".join(
        f" Recipe file {md_text(b.file.name)} did not load: {md_text(b.error)}." for b in project.broken.values()
    )

    @dg.sensor(
        name=SENSOR_NAME,
        job_name=job_name,
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Every tick fails until fixed: {md_text(bad_setting)}."
            if bad_setting
            else f"Rebuilds what depends on a model folder once a new or changed checkpoint has been "
            f"stable for {settle:g} s and opens as a complete safetensors checkpoint."
        )
        + broken,
    )
    def _sensor(context: dg.SensorEvaluationContext):
        if bad_setting:  # a failed tick in the UI, naming the variable; the code location still loads
            raise SettingsError(bad_setting)
        cursor = json.loads(context.cursor) if context.cursor else {}
        changed, state = evaluate_models(project, cursor, time.time(), settle)
        graph = context.repository_def.asset_graph
        requested = False
        cal_changed, state = evaluate_calibrations(project, state, time.time(), settle)
        for name in cal_changed:
            fp = state[f"calibration:{name}"]["fp"]
            root = dg.AssetKey(["calibration", name])
            below = dg.AssetSelection.assets(root).downstream().resolve(graph) - {root}
            yield dg.RunRequest(
                run_key=f"calibration:{name}:{fp}",
                asset_selection=[root] + sorted(below, key=lambda k: k.to_user_string()),
                tags={"merge_dag/trigger": f"calibration/{name}", "merge_dag/fingerprint": fp},
            )
            requested = True
        for name in changed:
            fp = state[name]["fp"]
            yield dg.RunRequest(
                run_key=f"{name}:{fp}:{state[name]['since']}",
                asset_selection=affected_keys(project, name, graph),
                tags={"merge_dag/trigger": f"model/{name}", "merge_dag/fingerprint": fp},
            )
            requested = True
        # a new model's own assets appear after a code-location reload: build those never built, once
        for name, st in state.items():
            if (
                not name.startswith("calibration:")
                and st.get("new")
                and st.get("fp")
                and name not in changed
                and st.get("filled") != st["fp"]
            ):
                missing = missing_after_new(graph, context.instance, name)
                if missing:  # once per fingerprint: a run in flight must not be re-requested as it progresses
                    yield dg.RunRequest(
                        run_key=f"{name}:{st['fp']}:missing",
                        asset_selection=missing,
                        tags={"merge_dag/trigger": f"model/{name}", "merge_dag/fingerprint": st["fp"]},
                    )
                    state[name] = {**st, "filled": st["fp"]}
                    requested = True
        context.update_cursor(json.dumps(state))
        if not requested:
            yield dg.SkipReason(
                "no new or changed complete checkpoint or calibration set" + fixed_recipes_note(project)
            )

    return _sensor


LINEAGE_SENSORS = {
    "lineage_run_succeeded": ("SUCCESS", "success"),
    "lineage_run_failed": ("FAILURE", "failure"),
    "lineage_run_canceled": ("CANCELED", "canceled"),
}


def build_lineage_sensors() -> list:
    """Run status sensors that write every run's end (success, failure, canceled) into the lineage
    `runs` table, for runs the daemon launches (the sensor's, the schedule's, the UI's), after
    ingesting any lineage Celery workers spooled (lineage/spool.py); steps only ever record
    `running`. `merge-dag demo` records its own in-process runs."""
    from datetime import datetime, timezone

    from .resources import MergeDagResource

    def make(name: str, dagster_status: str, status: str):
        @dg.run_status_sensor(
            run_status=getattr(dg.DagsterRunStatus, dagster_status),
            name=name,
            default_status=dg.DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=15,
            description=f"Records each run that ends in {dagster_status} as {status!r} in the lineage runs table.",
        )
        def _record(context: dg.RunStatusSensorContext, merge_dag: MergeDagResource):
            from ..lineage.spool import ingest
            from ..lineage.store import LineageStore

            run = context.dagster_run
            # what Celery workers spooled, if the run's coordinator did not ingest it (idempotent)
            ingest(LineageStore(merge_dag.database()), merge_dag.spool_dir())
            merge_dag.lineage().record_run(
                run_id=run.run_id,
                status=status,
                job=run.job_name,
                finished_at=datetime.now(timezone.utc).replace(tzinfo=None),
            )

        return _record

    return [make(name, d, s) for name, (d, s) in LINEAGE_SENSORS.items()]
