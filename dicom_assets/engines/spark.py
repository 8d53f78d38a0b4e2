"""The scale-out engine: the same pure extractor on Spark executors (SPEC §7).

The day's :class:`ExtractTask` list becomes a small DataFrame sliced into
``ceil(n / batch_size)`` partitions (at least one per core). Each executor runs
:func:`extract_partition` through ``mapInArrow``: it calls the very function
the local engine calls, ``dicom_assets.dicom.extract.extract_batch_arrow``,
writes the metastore rows as one Parquet part file straight into the Delta
table folder, and yields only small records (one per part file, one per failed
file). The driver collects those and commits every part in ONE Delta
transaction with delta-rs (:func:`dicom_assets.lake.delta_commit.commit_replace`),
replacing the ``ingestDate = day`` rows. Spark never writes Delta itself, so no
Delta jars are needed; executors must see the lake folder (local or shared FS).

pyspark is imported inside functions only, so this module imports without it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from dicom_assets.config import Settings
from dicom_assets.dicom.budget import ReadLimits
from dicom_assets.dicom.records import ExtractTask
from dicom_assets.engines.base import ExtractionOutcome
from dicom_assets.lake import delta, delta_commit, parts
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

ENGINE = "spark"
#: Folder (path or URI) for Spark event logs; unset = no event log.
EVENT_LOG_ENV = "DICOM_ASSETS_SPARK_EVENT_LOG_DIR"
#: Extra ``key=value`` Spark settings separated by ``;`` (e.g. executor memory on a cluster).
EXTRA_CONF_ENV = "DICOM_ASSETS_SPARK_CONF"

ExtractFn = Callable[..., tuple[pa.Table, pa.Table]]

#: One row per task, as the executors receive them.
TASK_SCHEMA = pa.schema(
    [
        pa.field("taskIndex", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("file_path", pa.string()),
        pa.field("original_path", pa.string()),
        pa.field("source_system", pa.string()),
        pa.field("ingest_date", pa.string()),
        pa.field("source_modified_at", pa.float64()),
        pa.field("member", pa.string()),
    ]
)

#: What executors send back: ``kind = "part"`` rows describe a written Parquet
#: file, ``kind = "failure"`` rows carry the FAILURES_SCHEMA columns (the
#: timestamp as epoch microseconds, so no time-zone conversion can touch it).
RESULT_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),
        pa.field("taskIndex", pa.int64()),
        pa.field("partPath", pa.string()),
        pa.field("partSize", pa.int64()),
        pa.field("partModificationTime", pa.int64()),
        pa.field("partNumRecords", pa.int64()),
        pa.field("partStats", pa.string()),
    ]
    + [f if f.name != "detectedAt" else pa.field("detectedAtMicros", pa.int64()) for f in FAILURES_SCHEMA]
)


def default_spark_conf(settings: Settings) -> dict[str, str]:
    """Spark settings for the engine on a small machine; also usable in a ``PySparkResource``.

    Event logging is on when ``settings.spark_event_log_dir`` (if the settings
    have that field) or env ``DICOM_ASSETS_SPARK_EVENT_LOG_DIR`` names a folder;
    env ``DICOM_ASSETS_SPARK_CONF`` adds ``key=value;...`` settings last.
    """
    pkg_root = str(Path(__file__).resolve().parents[2])
    conf = {
        "spark.master": settings.spark_master,
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.python.worker.reuse": "true",
        # Executors import dicom_assets; a source checkout is found without installing it.
        "spark.executorEnv.PYTHONPATH": pkg_root,
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
    }
    log_dir = str(getattr(settings, "spark_event_log_dir", "") or os.environ.get(EVENT_LOG_ENV, ""))
    if log_dir:
        if "://" not in log_dir or log_dir.startswith("file://"):
            Path(log_dir.removeprefix("file://")).mkdir(parents=True, exist_ok=True)  # Spark won't create it
        conf["spark.eventLog.enabled"] = "true"
        conf["spark.eventLog.dir"] = log_dir
    for item in os.environ.get(EXTRA_CONF_ENV, "").split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            conf[key.strip()] = value.strip()
    return conf


def get_spark_session(
    settings: Settings, *, app_name: str = "dicom_assets", conf: Mapping[str, str] | None = None
) -> SparkSession:
    """A SparkSession on ``settings.spark_master`` with :func:`default_spark_conf` plus ``conf``.

    Python workers run this interpreter (``PYSPARK_PYTHON`` is set to
    ``sys.executable`` first), so executors see the same packages. As with any
    ``getOrCreate``, an already running session is returned as is.
    """
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    merged = {**default_spark_conf(settings), **dict(conf or {})}
    builder = SparkSession.builder.master(merged.pop("spark.master")).appName(app_name)
    for key, value in merged.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def run_extraction(
    tasks: Sequence[ExtractTask],
    settings: Settings,
    *,
    metastore_uri: str,
    day: str,
    now: datetime | None = None,
    spark: SparkSession | None = None,
) -> ExtractionOutcome:
    """Extract every task on Spark and replace the ``day`` rows of the metastore in one commit.

    Same contract as :func:`dicom_assets.engines.local.run_extraction`: the
    metastore rows (METASTORE_SCHEMA, every DICOM tag of each file) land in
    ``metastore_uri``; files that cannot be read come back as FAILURES_SCHEMA
    rows, never as a failed job. ``spark`` defaults to :func:`get_spark_session`.
    """
    return _run(tasks, settings, metastore_uri=metastore_uri, day=day, now=now, spark=spark)


def _run(
    tasks: Sequence[ExtractTask],
    settings: Settings,
    *,
    metastore_uri: str,
    day: str,
    now: datetime | None,
    spark: SparkSession | None,
    extract: ExtractFn | None = None,
) -> ExtractionOutcome:
    start = time.perf_counter()
    now = now or datetime.now(UTC)
    folder = delta_commit.table_dir(metastore_uri)
    details: dict[str, float] = {}
    records = RESULT_SCHEMA.empty_table()
    if tasks:
        if spark is None:
            spark = get_spark_session(settings)
        details["session_seconds"] = time.perf_counter() - start
        t0 = time.perf_counter()
        records = _distribute(spark, tasks, settings, folder, now, extract)
        details["extract_seconds"] = time.perf_counter() - t0
    parts = records.filter(pc.equal(records.column("kind"), "part"))
    adds = [
        delta_commit.add_action_from_record(
            {"path": r["partPath"], "size": r["partSize"], "modification_time": r["partModificationTime"], "stats": r["partStats"]}
        )
        for r in parts.to_pylist()
    ]
    t0 = time.perf_counter()
    try:
        delta_commit.commit_replace(metastore_uri, METASTORE_SCHEMA, adds, day)
    except BaseException:
        for add in adds:  # never leave unreferenced copies of the day behind
            (folder / add.path).unlink(missing_ok=True)
        raise
    details["commit_seconds"] = time.perf_counter() - t0
    details["part_files"] = float(len(adds))
    return ExtractionOutcome(
        rows_written=sum(int(r["partNumRecords"]) for r in parts.to_pylist()),
        failures=failures_from_records(records),
        engine=ENGINE,
        seconds=time.perf_counter() - start,
        details=details,
    )


def partition_count(n_tasks: int, batch_size: int, parallelism: int) -> int:
    """``ceil(n / batch_size)`` slices, but at least one per core while there are tasks."""
    if n_tasks <= 0:
        return 0
    return max(math.ceil(n_tasks / max(1, batch_size)), min(n_tasks, max(1, parallelism)))


def _distribute(
    spark: SparkSession,
    tasks: Sequence[ExtractTask],
    settings: Settings,
    folder: Path,
    now: datetime,
    extract: ExtractFn | None,
) -> pa.Table:
    from pyspark.sql.pandas.types import from_arrow_schema

    sc = spark.sparkContext
    n_parts = partition_count(len(tasks), settings.batch_size, sc.defaultParallelism)
    rows = [
        (i, t.path, t.file_path, t.original_path, t.source_system, t.ingest_date, float(t.source_modified_at), t.member)
        for i, t in enumerate(tasks)
    ]
    # parallelize slices contiguously: partition i holds tasks[i*k:(i+1)*k], no shuffle.
    df = spark.createDataFrame(sc.parallelize(rows, n_parts), from_arrow_schema(TASK_SCHEMA), verifySchema=False)
    fn = functools.partial(
        extract_partition,
        table_dir=str(folder),
        bulk_data_threshold=settings.bulk_data_threshold,
        limits=ReadLimits.from_settings(settings),
        batch_size=settings.batch_size,
        now=now,
        extract=extract,
    )
    sc.setJobDescription(f"dicom_assets: extract {len(tasks)} files in {n_parts} partitions")
    try:
        result = df.mapInArrow(fn, from_arrow_schema(RESULT_SCHEMA)).toArrow()
    finally:
        sc.setJobDescription(None)  # type: ignore[arg-type]
    return delta.conform(result, RESULT_SCHEMA)


def extract_partition(
    batches_in: Iterable[pa.RecordBatch],
    *,
    table_dir: str,
    bulk_data_threshold: int,
    batch_size: int,
    now: datetime,
    extract: ExtractFn | None = None,
    limits: ReadLimits | None = None,
) -> Iterator[pa.RecordBatch]:
    """Executor side of ``mapInArrow``: TASK_SCHEMA batches in, RESULT_SCHEMA batches out.

    Files are read ``batch_size`` at a time with ``extract_batch_arrow`` (which
    turns each unreadable file into a failure row). Anything else that goes
    wrong in a batch (an unexpected exception in the reader, a full disk while
    writing the part) turns every file of that batch into an ``EngineError``
    failure row, so a bad file can never fail the Spark job.
    """
    if extract is None:
        from dicom_assets.dicom.extract import extract_batch_arrow

        extract = functools.partial(extract_batch_arrow, limits=limits) if limits is not None else extract_batch_arrow
    indexed = [_task_from_row(row) for b in batches_in for row in b.to_pylist()]
    size = max(1, batch_size)
    for start in range(0, len(indexed), size):
        chunk = indexed[start : start + size]
        chunk_tasks = [t for _i, t in chunk]
        # Failure rows name the path read (the task's path, or its ZIP after a crash).
        index_of = {**{t.file_path: i for i, t in chunk}, **{t.path: i for i, t in chunk}}
        try:
            rows, fails = extract(chunk_tasks, bulk_data_threshold=bulk_data_threshold, now=now)
            rows = delta.conform(rows, METASTORE_SCHEMA)
            fails = delta.conform(fails, FAILURES_SCHEMA)
            part = parts.write_part_file(table_dir, rows) if rows.num_rows else None
        except Exception as exc:  # noqa: BLE001 - the guard is the point
            yield _engine_failures(chunk, exc, now)
            continue
        if part is not None:
            yield _part_record(part, rows.num_rows)
        if fails.num_rows:
            yield _failure_records(fails, [index_of.get(p, -1) for p in fails.column("filePath").to_pylist()])


def failures_from_records(records: pa.Table) -> pa.Table:
    """The FAILURES_SCHEMA table from the executors' failure records, in task order."""
    fails = records.filter(pc.equal(records.column("kind"), "failure"))
    fails = fails.sort_by([("taskIndex", "ascending")])
    cols = []
    for f in FAILURES_SCHEMA:
        if f.name == "detectedAt":
            cols.append(fails.column("detectedAtMicros").cast(pa.int64()).cast(f.type))
        else:
            cols.append(fails.column(f.name).cast(f.type))
    return pa.Table.from_arrays(cols, schema=FAILURES_SCHEMA)


def _task_from_row(row: dict[str, Any]) -> tuple[int, ExtractTask]:
    return int(row["taskIndex"]), ExtractTask(
        path=row["path"],
        file_path=row["file_path"],
        original_path=row["original_path"],
        source_system=row["source_system"],
        ingest_date=row["ingest_date"],
        source_modified_at=float(row["source_modified_at"]),
        member=row["member"],
    )


def _part_record(part: dict[str, Any], num_records: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [
            {
                "kind": "part",
                "partPath": part["path"],
                "partSize": part["size"],
                "partModificationTime": part["modification_time"],
                "partNumRecords": int(num_records),
                "partStats": part["stats"],
            }
        ],
        schema=RESULT_SCHEMA,
    )


def _failure_records(fails: pa.Table, task_indexes: list[int]) -> pa.RecordBatch:
    out = fails.drop_columns(["detectedAt"])
    out = out.append_column("detectedAtMicros", fails.column("detectedAt").cast(pa.int64()))
    out = out.append_column("kind", pa.array(["failure"] * fails.num_rows, pa.string()))
    out = out.append_column("taskIndex", pa.array(task_indexes, pa.int64()))
    return delta.conform(out, RESULT_SCHEMA).combine_chunks().to_batches()[0]


def _engine_failures(chunk: list[tuple[int, ExtractTask]], exc: BaseException, now: datetime) -> pa.RecordBatch:
    # Type and a bounded first line only: messages end up in tables and the UI.
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    message = f"{type(exc).__name__} while extracting a batch of {len(chunk)} files" + (f": {first}" if first else "")
    micros = int(now.timestamp() * 1_000_000)
    rows = []
    for i, t in chunk:
        where = t.path if os.path.exists(t.path) else t.file_path
        try:
            size: int | None = os.path.getsize(where)
        except OSError:
            size = None
        rows.append(
            {
                "kind": "failure",
                "taskIndex": i,
                "filePath": where,
                "originalPath": t.original_path,
                "sourceSystem": t.source_system,
                "ingestDate": t.ingest_date,
                "stage": "extract",
                "errorClass": "EngineError",
                "message": message,
                "fileSize": size,
                "contentSha256": None,
                "detectedAtMicros": micros,
            }
        )
    return pa.RecordBatch.from_pylist(rows, schema=RESULT_SCHEMA)


__all__ = [
    "ENGINE",
    "EVENT_LOG_ENV",
    "EXTRA_CONF_ENV",
    "RESULT_SCHEMA",
    "TASK_SCHEMA",
    "default_spark_conf",
    "extract_partition",
    "failures_from_records",
    "get_spark_session",
    "partition_count",
    "run_extraction",
]
