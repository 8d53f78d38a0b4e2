"""Bronze steps: organise the drop folder (asset 1) and extract the metastore (asset 2)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, groupby
from pathlib import Path
from typing import Any

import pyarrow as pa

from dicom_assets.config import Settings
from dicom_assets.dicom.records import ExtractTask
from dicom_assets.dicom.task_table import TaskTable
from dicom_assets.engines import local
from dicom_assets.engines.base import ExtractionOutcome
from dicom_assets.lake import cluster, delta, delta_commit, delta_read, external, failures, fileops, organise
from dicom_assets.lake.fileops import crash_point
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA

Engine = Callable[..., ExtractionOutcome]


@dataclass(frozen=True)
class BronzeResult:
    """What the metastore step did for one partition (counts only: no PHI)."""

    rows: int
    failed: int
    external_rows: int
    seconds: float
    engine: str
    per_namespace: dict[str, int] = field(default_factory=dict)


def day_to_utc_date(day: str) -> str:
    """``yyyy/mm/dd`` partition key → ``yyyy-mm-dd``."""
    return day.replace("/", "-")


def engine_for(settings: Settings) -> Engine:
    """The extraction engine the settings name (``local`` or ``spark``)."""
    if settings.engine == "spark":
        from dicom_assets.engines import spark

        return spark.run_extraction
    if settings.engine != "local":
        raise ValueError(f"unknown engine {settings.engine!r}: use 'local' or 'spark'")
    return local.run_extraction


def organise_ingest(paths: LakePaths, settings: Settings, day: str, *, now: float | None = None) -> organise.OrganiseResult:
    """Asset 1 (SPEC §3.1): move settled Ingest files that arrived by the end of ``day`` into Process.

    The partition is the UTC arrival day, so a backfill of an old day never
    sweeps in files that arrived later: the settle check is made as of the end
    of ``day`` (files modified after it are left for their own day's run).
    """
    paths.ensure()
    now = time.time() if now is None else now
    return organise.organise(paths, settings, day, now=min(now, end_of_day(day)))


def end_of_day(day: str) -> float:
    """POSIX seconds of the end of the UTC day ``yyyy/mm/dd``."""
    start = datetime.strptime(day, "%Y/%m/%d").replace(tzinfo=UTC)
    return start.timestamp() + 86400.0


def process_tasks(paths: LakePaths, settings: Settings, day: str) -> Iterator[ExtractTask]:
    """One task per DICOM file of the day's Process folders (``.dcm.zip`` read in memory), as they are listed."""
    # A folder's files come together, so a ZIP beside its plain file is found within the folder.
    for _folder, group in groupby(organise.iter_process_files(paths, day), key=lambda lf: os.path.dirname(lf.process_path)):
        landed = list(group)
        present = {lf.process_path for lf in landed}
        for lf in landed:
            p = lf.process_path
            if p.endswith(".zip") and p[:-4] in present:
                # Killed between writing <file>.zip and unlinking <file>: the plain
                # file's task reads it and compresses it over this ZIP again, so the
                # file gives one row, not two.
                continue
            if p.endswith(".zip"):
                yield _task(lf, path=p, file_path=p, day=day, member=Path(p[:-4]).name)
            else:
                target = p + ".zip" if settings.compression_enabled else p
                yield _task(lf, path=p, file_path=target, day=day)


def _task(lf: Any, *, path: str, file_path: str, day: str, member: str | None = None) -> ExtractTask:
    return ExtractTask(
        path=path,
        file_path=file_path,
        original_path=str(lf.original_path),
        source_system=lf.source_system,
        ingest_date=day,
        source_modified_at=float(lf.mtime),
        member=member,
    )


def external_tasks(paths: LakePaths, day: str) -> list[tuple[ExtractTask, external.ExternalEntry]]:
    """Files read in place from External (never moved or compressed), with their entries."""
    out = []
    for ef in external.external_files_for_day(paths, day):
        if ef.failure is not None:
            continue  # refused at discovery (e.g. a symlink leaving its root): already recorded
        task = ExtractTask(
            path=ef.path,
            file_path=ef.path,
            original_path=ef.original_path,
            source_system=ef.ns,
            ingest_date=day,
            source_modified_at=ef.mtime,
        )
        out.append((task, ef))
    return out


def extract_metastore(
    paths: LakePaths,
    settings: Settings,
    day: str,
    *,
    engine: Engine | None = None,
    now: datetime | None = None,
    **engine_kwargs: Any,
) -> BronzeResult:
    """Asset 2 (SPEC §3.2): replace the day's metastore rows and failure rows.

    Process files that cannot be read are moved to Failed with an
    ``.error.json``; External files are only recorded. ``dicom_failures`` for
    the day is rebuilt from the Failed folder plus External failures, so it is
    the same after any re-run.
    """
    start = time.perf_counter()
    now = now or datetime.now(UTC)
    engine = engine or engine_for(settings)
    # New or changed External files become this day's before they are read, so a
    # crash mid-way leaves them attributed here and a re-run of the day reads them.
    scan = external.discover_external(paths, settings, day, now.timestamp())
    external.mark_external_read(paths, scan.files)
    ext = {t.path: (t, ef) for t, ef in external_tasks(paths, day)}
    tasks = TaskTable.from_tasks(chain(process_tasks(paths, settings, day), (t for t, _ef in ext.values())))
    crash_point("bronze:before_extract")
    outcome = engine(tasks, settings, metastore_uri=paths.table_uri("dicomimagingmetastore"), day=day, now=now, **engine_kwargs)
    # Files are read, compressed and committed; the unreadable ones still sit in Process.
    crash_point("bronze:after_extract")
    failed = outcome.failures.to_pylist()
    by_path = tasks_by_path(tasks, {f["filePath"] for f in failed})
    for f in failed:
        task = by_path.get(f["filePath"])
        if task is None:
            raise RuntimeError(f"engine reported a failure for a file it was not given: {f['filePath']}")
        stage, error_class, message = f["stage"] or "extract", f["errorClass"] or "DicomReadError", f["message"] or ""
        if task.path in ext:
            ef = ext[task.path][1]
            failures.record_failure(  # External files are recorded only, never moved
                paths, Path(task.path), ns=ef.ns, day=day, rel_target=Path(fileops.display_path(str(Path(ef.name) / ef.rel))),
                original_path=task.original_path, stage=stage, error_class=error_class, message=message,
                size=f["fileSize"], sha256=f["contentSha256"],
            )
            continue
        src = Path(task.path) if Path(task.path).exists() else Path(task.file_path)
        organise.move_to_failed(
            paths, src, ns=task.source_system, day=day, original_path=task.original_path,
            stage=stage, error_class=error_class, message=message,
        )
        crash_point("bronze:moved_to_failed")
    write_failures(paths, day)
    compact_day(paths, day)
    per_ns = tasks.count_by("source_system")
    return BronzeResult(
        rows=outcome.rows_written,
        failed=outcome.failures.num_rows,
        external_rows=len(ext),
        seconds=time.perf_counter() - start,
        engine=outcome.engine,
        per_namespace=per_ns,
    )


def tasks_by_path(tasks: Iterable[ExtractTask], wanted: set[str]) -> dict[str, ExtractTask]:
    """The tasks that ``wanted`` paths name, by those paths (none looked at when nothing is wanted).

    A failure names the file it read (``task.path``) or the one it would have
    become (``task.file_path``), made valid UTF-8 (``display_path``): any of
    the four forms finds the task.
    """
    out: dict[str, ExtractTask] = {}
    if not wanted:
        return out
    for t in tasks:
        for p in (t.file_path, t.path):
            for form in (p, fileops.display_path(p)):
                if form in wanted:
                    out[form] = t
    return out


#: A day extracted into more part files than this has them rewritten as files of
#: :data:`METASTORE_FILE_ROWS` rows.
COMPACT_PARTS = 64
METASTORE_FILE_ROWS = 8_192
METASTORE_ROW_GROUP_ROWS = 2_048


def compact_day(paths: LakePaths, day: str) -> cluster.ClusterResult:
    """Rewrite the day's extraction parts (one per batch of 64 files) as a few large files.

    Every open of the metastore replays one ``add`` action per live file: a
    100,000-file day left 1,588 parts, and each later run read 1.45 MB of log
    to open the table; after this, 0.06 MB. Rows do not change (the commit
    says ``dataChange: false``); a day of few parts is left as it is. A
    re-run of the day that replaces it meanwhile wins, and this commits
    nothing (:func:`dicom_assets.lake.cluster.concatenate`).
    """
    uri = paths.table_uri("dicomimagingmetastore")
    files = delta_commit.day_files(uri, day)
    if len(files) <= COMPACT_PARTS:
        return cluster.ClusterResult(0, 0, 0)
    return cluster.concatenate(
        uri, METASTORE_SCHEMA, files, file_rows=METASTORE_FILE_ROWS, row_group_rows=METASTORE_ROW_GROUP_ROWS
    )


def write_failures(paths: LakePaths, day: str) -> int:
    """Rebuild the day's ``dicom_failures`` rows from the Failed folder's ``.error.json`` records.

    Every failure (organise, extract, External in place) leaves a record there
    first, so the table is derived state and any re-run rebuilds it exactly.
    """
    rows = [ff.as_row() for ff in failures.list_failed(paths, day)]
    table = pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA) if rows else FAILURES_SCHEMA.empty_table()
    delta.replace_where(paths.table_uri("dicom_failures"), table, FAILURES_SCHEMA, f"ingestDate = {delta_read.sql_literal(day)}")
    return table.num_rows
