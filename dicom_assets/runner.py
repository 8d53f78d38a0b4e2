"""In-process materialisation of one partition, end to end, for ``dicom-assets run``."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import dagster as dg

from dicom_assets.config import Settings
from dicom_assets.defs.partitions import today_key
from dicom_assets.defs.sensors import all_assets_job
from dicom_assets.lake import delta, delta_read
from dicom_assets.lake.fileops import count_files
from dicom_assets.lake.paths import TABLES, LakePaths
from dicom_assets.lake.schemas import TABLE_SCHEMAS
from dicom_assets.settings import DicomAssetsSettings


class _Progress(logging.Handler):
    """Prints one line per finished step, from Dagster's structured log records."""

    def __init__(self, total: int, stream: Any = sys.stderr) -> None:
        super().__init__(logging.DEBUG)
        self.total, self.done, self.stream, self.t0 = total, 0, stream, time.perf_counter()
        self.started: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        if event is None:
            return
        kind = getattr(event, "event_type_value", "")
        step = getattr(event, "step_key", None) or ""
        if kind == "STEP_START":
            self.started[step] = time.perf_counter()
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE"):
            self.done += 1
            took = time.perf_counter() - self.started.get(step, self.t0)
            mark = "ok" if kind == "STEP_SUCCESS" else "FAILED"
            bar = "#" * self.done + "." * max(0, self.total - self.done)
            print(f"[{bar}] {self.done}/{self.total} {step:<58} {mark} {took:6.1f}s", file=self.stream, flush=True)


def instance() -> dg.DagsterInstance:
    """The DAGSTER_HOME instance when set (runs then show in the UI), else a throwaway one."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return dg.DagsterInstance.ephemeral()
    # A fresh DAGSTER_HOME is created rather than refused: Dagster then uses its defaults.
    os.makedirs(os.path.expanduser(home), exist_ok=True)
    return dg.DagsterInstance.get()


def materialize_partition(
    settings: Settings, *, partition: str | None = None, progress: bool = True, raise_on_error: bool = False
) -> dict[str, Any]:
    """Materialise every asset (and its checks) of ``partition`` in one in-process run.

    Uses the ``all_assets_job`` of the project's Definitions with the settings
    given here; Dagster's console log is replaced by a one-line-per-step
    progress display (the full event log stays in the instance).
    """
    from dicom_assets.definitions import defs
    from dicom_assets.defs.resources import default_resources

    day = partition or today_key()
    resources = default_resources()
    fields: dict[str, Any] = {}
    for name in DicomAssetsSettings.model_fields:
        value = getattr(settings, name)
        fields[name] = ",".join(value) if isinstance(value, tuple) else value
    resources["settings"] = DicomAssetsSettings(**fields)
    assets = list(defs.assets or [])  # type: ignore[arg-type]
    checks = list(defs.asset_checks or [])  # type: ignore[arg-type]
    handler = _Progress(total=len(assets) + len(checks)) if progress else None

    @dg.logger(description="progress lines for dicom-assets run")  # type: ignore[call-overload]  # dagster types only the positional form
    def progress_logger(_init: Any) -> logging.Logger:
        log = logging.getLogger("dicom_assets.progress")
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.handlers = [handler] if handler else []
        return log

    run_defs = dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[all_assets_job],
        resources=resources,
        loggers={"progress": progress_logger},
    )
    job = run_defs.resolve_job_def("all_assets_job")
    run_instance = instance()
    # ``seconds`` is the run itself, as the UI shows it (from the first event
    # to the last); opening the instance and loading the code come before.
    start = time.perf_counter()
    result = job.execute_in_process(
        partition_key=day,
        instance=run_instance,
        raise_on_error=raise_on_error,
        tags={"dicom_assets/trigger": "cli"},
        run_config={"loggers": {"progress": {}}},
    )
    return summarize(settings, day, success=result.success, seconds=time.perf_counter() - start)


def summarize(settings: Settings, day: str, *, success: bool = True, seconds: float = 0.0) -> dict[str, Any]:
    """Row counts of every table and file counts of the lake's folders (no PHI)."""
    paths = LakePaths.of(settings.lake)
    tables = {f"{layer}.{folder}": delta.count(paths.table_uri(name)) for name, (layer, folder) in TABLES.items()}
    part = {}
    for name in ("dicomimagingmetastore", "dicom_failures"):
        uri = paths.table_uri(name)
        part[name] = (
            delta_read.read_day(uri, TABLE_SCHEMAS[name], day, columns=["ingestDate"]).num_rows
            if delta.exists(uri)
            else 0
        )

    return {
        "success": success,
        "partition": day,
        "seconds": round(seconds, 2),
        "lake": str(paths.root),
        "tables": tables,
        "partition_rows": part,
        "files": {
            "ingest_remaining": count_files(paths.ingest_root),
            "process": count_files(paths.process_root),
            "failed": count_files(paths.failed_root, skip_suffix=".error.json"),
        },
    }


def summary_text(summary: dict[str, Any]) -> str:
    lines = [
        f"dicom-assets run: partition {summary['partition']} "
        f"{'succeeded' if summary['success'] else 'FAILED'} in {summary['seconds']}s",
        f"lake: {summary['lake']}",
        "",
        f"{'table':<40} {'rows':>10}",
        f"{'-' * 40} {'-' * 10}",
    ]
    for name, n in summary["tables"].items():
        lines.append(f"{name:<40} {n:>10}")
    pr = summary["partition_rows"]
    f = summary["files"]
    lines += [
        "",
        f"partition {summary['partition']}: {pr['dicomimagingmetastore']} metastore rows, "
        f"{pr['dicom_failures']} failed files",
        f"files: {f['process']} in Process, {f['failed']} in Failed, {f['ingest_remaining']} left in Ingest",
    ]
    return "\n".join(lines)
