"""The schedule: `nightly_rebuild` re-observes every source and rebuilds whatever is stale
(MERGE_DAG_SCHEDULE, a cron expression; 03:00 by default)."""

import dagster as dg

from ..core.markdown import md_text
from ..settings import DEFAULT_CRON, SettingsError, settings

SCHEDULE_NAME = "nightly_rebuild"


def build_schedule(job_name: str) -> dg.ScheduleDefinition:
    from dagster._utils.schedules import is_valid_cron_string

    cron = settings().schedule
    if not is_valid_cron_string(cron):  # keep the code location loading: the schedule's ticks fail instead
        error = f"MERGE_DAG_SCHEDULE={cron!r} is not a cron expression (e.g. {DEFAULT_CRON!r})"

        @dg.schedule(
            name=SCHEDULE_NAME,
            job_name=job_name,
            cron_schedule=DEFAULT_CRON,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Every tick fails until fixed: {md_text(error)}.",
        )
        def _refuse(context):
            raise SettingsError(error)

        return _refuse
    return dg.ScheduleDefinition(
        name=SCHEDULE_NAME,
        job_name=job_name,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-observe every source and rebuild whatever is stale ({md_text(cron)}); unchanged artifacts "
        "are cache hits, so a quiet night costs fingerprints only.",
    )
