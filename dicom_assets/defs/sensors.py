"""File-arrival sensors and the daily schedule (SPEC §4)."""


import time
from datetime import UTC, datetime, timedelta

import dagster as dg

from dicom_assets.defs.partitions import daily_partitions, today_key
from dicom_assets.lake.arrow_memory import release_unused_memory
from dicom_assets.settings import DicomAssetsSettings
from dicom_assets.steps.sensing import decide


@dg.success_hook(name="release_unused_memory")
def _release_after_success(_context: dg.HookContext) -> None:
    release_unused_memory()


@dg.failure_hook(name="release_unused_memory_after_failure")
def _release_after_failure(_context: dg.HookContext) -> None:
    release_unused_memory()


#: Every asset of a partition, end to end.
all_assets_job = dg.define_asset_job(
    "all_assets_job",
    selection=dg.AssetSelection.all(),
    partitions_def=daily_partitions,
    # Runs executed in one process keep each step's freed heap otherwise (arrow_memory).
    hooks={_release_after_success, _release_after_failure},
)

TICK_SECONDS = 30


def _sensor(context: dg.SensorEvaluationContext, settings: DicomAssetsSettings, which: str) -> dg.SensorResult:
    s = settings.to_settings()
    paths = settings.paths()
    root = paths.ingest_root if which == "ingest" else paths.external_root
    d = decide(root, context.cursor, now=time.time(), settle_seconds=s.settle_seconds, follow_top_links=which == "external")
    if not d.new_files:
        return dg.SensorResult(skip_reason=f"no new settled files ({d.unsettled} still being written)", cursor=d.cursor)
    day = today_key()
    context.log.info(f"{len(d.new_files)} new settled {which} files → partition {day}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"{which}-{day}-{d.run_key}", partition_key=day, tags={"dicom_assets/trigger": which})],
        cursor=d.cursor,
    )


@dg.sensor(job=all_assets_job, minimum_interval_seconds=TICK_SECONDS, default_status=dg.DefaultSensorStatus.RUNNING)
def ingest_folder_sensor(context: dg.SensorEvaluationContext, settings: DicomAssetsSettings) -> dg.SensorResult:
    """New settled files under Ingest → one run of today's partition."""
    return _sensor(context, settings, "ingest")


@dg.sensor(job=all_assets_job, minimum_interval_seconds=TICK_SECONDS, default_status=dg.DefaultSensorStatus.RUNNING)
def external_folder_sensor(context: dg.SensorEvaluationContext, settings: DicomAssetsSettings) -> dg.SensorResult:
    """New or changed files under External (read in place) → one run of today's partition."""
    return _sensor(context, settings, "external")


@dg.schedule(job=all_assets_job, cron_schedule="30 0 * * *", execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.RUNNING)
def daily_all_assets_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Yesterday's partition end to end, shortly after midnight UTC: catches stragglers."""
    when = context.scheduled_execution_time or datetime.now(UTC)
    day = (when.astimezone(UTC) - timedelta(days=1)).strftime("%Y/%m/%d")
    return dg.RunRequest(run_key=f"daily-{day}", partition_key=day)
