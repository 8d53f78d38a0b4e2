"""The Spark engine (SPEC §7): same input, same metastore as the embedded engine.

Expected values come from the embedded engine run on the same files, from
MANIFEST.tsv (which files are valid, their SOP Instance UIDs), from plain
pydicom, and from Spark's own event log and standalone master. One Spark
session is shared per module (start-up is the slow part); the standalone
cluster test starts and stops its own master and workers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from dicom_assets.config import Settings
from dicom_assets.dicom.records import ExtractTask
from dicom_assets.engines import spark as spark_engine
from dicom_assets.lake import delta, delta_read
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA
from dicom_assets_tests.conftest import CORPUS, read_manifest

DAY = "2026/01/01"
OTHER_DAY = "2025/12/31"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
MARKER = "EXPLODE"


def _spark_missing() -> str | None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "Spark tests need Java (no `java` on PATH and no JAVA_HOME)"
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "Spark tests need pyspark (pip install -e '.[spark]')"
    return None


needs_spark = pytest.mark.skipif(_spark_missing() is not None, reason=_spark_missing() or "")
pytestmark = [pytest.mark.spark, pytest.mark.xdist_group("spark")]


def _corpus() -> Path:
    if not (CORPUS / "MANIFEST.tsv").exists():
        pytest.skip(f"shared DICOM corpus not found at {CORPUS}")
    return CORPUS


def _loose_files(corpus: Path) -> list[Path]:
    """Loose corpus files named ``*.dcm`` or without extension (no ZIPs, no .gz)."""
    rows = read_manifest(corpus)
    out = []
    for r in rows:
        rel = r["path"]
        if "!" in rel:
            continue
        name = rel.rsplit("/", 1)[-1]
        if name.lower().endswith(".dcm") or "." not in name:
            out.append(corpus / rel)
    return sorted(out)


def _manifest_by_path(corpus: Path) -> dict[str, dict[str, str]]:
    return {str(corpus / r["path"]): r for r in read_manifest(corpus)}


def _tasks(files: Sequence[Path], day: str = DAY) -> list[ExtractTask]:
    return [
        ExtractTask(
            path=str(f),
            file_path=str(f),  # no compression: the corpus is read in place
            original_path=str(f),
            source_system="default",
            ingest_date=day,
            source_modified_at=1767225600.0,
        )
        for f in files
    ]


def _subset(corpus: Path, size: int = 150) -> list[Path]:
    """Every invalid loose file plus valid ones spread over all folders, ``size`` in all."""
    manifest = _manifest_by_path(corpus)
    files = _loose_files(corpus)
    invalid = [f for f in files if manifest[str(f)]["valid_dicom"] == "no"]
    valid = [f for f in files if manifest[str(f)]["valid_dicom"] == "yes"]
    step = max(1, len(valid) // (size - len(invalid)))
    return sorted(invalid + valid[::step][: size - len(invalid)])


def _sorted(table: pa.Table, drop: Sequence[str] = ()) -> pa.Table:
    table = table.drop_columns([c for c in drop if c in table.column_names])
    return table.sort_by([("filePath", "ascending")]).combine_chunks()


def _assert_same(a: pa.Table, b: pa.Table, what: str) -> None:
    assert a.schema == b.schema, f"{what}: schemas differ"
    assert a.num_rows == b.num_rows, f"{what}: {a.num_rows} vs {b.num_rows} rows"
    for name in a.column_names:
        if not a.column(name).equals(b.column(name)):
            left, right = a.column(name).to_pylist(), b.column(name).to_pylist()
            i = next(i for i, (x, y) in enumerate(zip(left, right, strict=True)) if x != y)
            raise AssertionError(f"{what}: column {name!r} differs first at row {i} ({a.column('filePath')[i]})")


class Sessions:
    """One SparkSession at a time per process; switching master stops the previous one."""

    def __init__(self) -> None:
        self.current: Any = None
        self.key: tuple[str, tuple[tuple[str, str], ...]] | None = None

    def get(self, master: str, conf: dict[str, str]) -> Any:
        key = (master, tuple(sorted(conf.items())))
        if self.current is not None and self.key == key:
            return self.current
        self.stop()
        self.current = spark_engine.get_spark_session(Settings(spark_master=master), conf=conf)
        self.key = key
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
        self.current, self.key = None, None


@pytest.fixture(scope="module")
def sessions() -> Iterator[Sessions]:
    s = Sessions()
    try:
        yield s
    finally:
        s.stop()


LOCAL_CONF = {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2"}


@pytest.fixture
def local_spark(sessions: Sessions) -> Any:
    reason = _spark_missing()
    if reason:
        pytest.skip(reason)
    return sessions.get("local[2]", LOCAL_CONF)


def _run_both(tasks: list[ExtractTask], tmp_path: Path, spark: Any, batch_size: int) -> tuple[Any, Any, Path, Path]:
    from dicom_assets.engines import local

    settings = Settings(batch_size=batch_size, workers=2, spark_master="local[2]")
    local_uri, spark_uri = tmp_path / "local" / "metastore", tmp_path / "spark" / "metastore"
    lo = local.run_extraction(tasks, settings, metastore_uri=str(local_uri), day=DAY, now=NOW)
    sp = spark_engine.run_extraction(tasks, settings, metastore_uri=str(spark_uri), day=DAY, now=NOW, spark=spark)
    return lo, sp, local_uri, spark_uri


# ----------------------------------------------------------------------------- acceptance 1


@needs_spark
def test_spark_metastore_equals_local_on_a_corpus_subset(tmp_path: Path, local_spark: Any) -> None:
    corpus = _corpus()
    files = _subset(corpus)
    manifest = _manifest_by_path(corpus)
    invalid = {str(f) for f in files if manifest[str(f)]["valid_dicom"] == "no"}
    assert len(files) == 150 and len(invalid) >= 10
    tasks = _tasks(files)
    lo, sp, local_uri, spark_uri = _run_both(tasks, tmp_path, local_spark, batch_size=16)

    assert sp.engine == "spark" and lo.engine == "local"
    spark_rows = _sorted(delta_read.read(spark_uri, METASTORE_SCHEMA), ["createdDatetime"])
    local_rows = _sorted(delta_read.read(local_uri, METASTORE_SCHEMA), ["createdDatetime"])
    _assert_same(spark_rows, local_rows, "metastore")
    _assert_same(_sorted(sp.failures), _sorted(lo.failures), "failures")
    assert sp.failures.schema == FAILURES_SCHEMA

    # Independently of both engines: MANIFEST says which files are DICOM and their SOP Instance UIDs.
    assert sp.rows_written == spark_rows.num_rows == len(files) - len(invalid)
    assert set(sp.failures.column("filePath").to_pylist()) == invalid
    for path, uid in zip(spark_rows.column("filePath").to_pylist(), spark_rows.column("sopInstanceUid").to_pylist(), strict=True):
        assert uid == manifest[path]["sop_instance_uid"], path
    assert set(spark_rows.column("ingestDate").to_pylist()) == {DAY}


@needs_spark
def test_spark_replaces_only_its_day_and_is_idempotent(tmp_path: Path, local_spark: Any) -> None:
    corpus = _corpus()
    files = [f for f in _subset(corpus, 60) if "generated-invalid" not in str(f)]
    uri = tmp_path / "metastore"
    settings = Settings(batch_size=8, spark_master="local[2]")
    other = spark_engine.run_extraction(_tasks(files[:5], OTHER_DAY), settings, metastore_uri=str(uri), day=OTHER_DAY, now=NOW, spark=local_spark)
    first = spark_engine.run_extraction(_tasks(files), settings, metastore_uri=str(uri), day=DAY, now=NOW, spark=local_spark)
    again = spark_engine.run_extraction(_tasks(files), settings, metastore_uri=str(uri), day=DAY, now=NOW, spark=local_spark)
    table = delta_read.read(uri, METASTORE_SCHEMA)
    per_day = {d: table.column("ingestDate").to_pylist().count(d) for d in (DAY, OTHER_DAY)}
    assert per_day == {DAY: first.rows_written, OTHER_DAY: other.rows_written}
    assert again.rows_written == first.rows_written
    day_paths = [p for p, d in zip(table.column("filePath").to_pylist(), table.column("ingestDate").to_pylist(), strict=True) if d == DAY]
    assert len(day_paths) == len(set(day_paths))  # no duplicates after the re-run
    # Spark itself reads the committed part files: they are plain Parquet.
    from deltalake import DeltaTable

    assert local_spark.read.parquet(*DeltaTable(str(uri)).file_uris()).count() == table.num_rows


@needs_spark
def test_spark_metastore_equals_local_on_the_whole_corpus(tmp_path: Path, local_spark: Any) -> None:
    corpus = _corpus()
    files = _loose_files(corpus)
    assert len(files) > 900
    lo, sp, local_uri, spark_uri = _run_both(_tasks(files), tmp_path, local_spark, batch_size=64)
    spark_rows = _sorted(delta_read.read(spark_uri, METASTORE_SCHEMA), ["createdDatetime"])
    _assert_same(spark_rows, _sorted(delta_read.read(local_uri, METASTORE_SCHEMA), ["createdDatetime"]), "metastore")
    _assert_same(_sorted(sp.failures), _sorted(lo.failures), "failures")
    manifest = _manifest_by_path(corpus)
    assert sp.rows_written == sum(1 for f in files if manifest[str(f)]["valid_dicom"] == "yes")
    assert sp.rows_written + sp.failures.num_rows == len(files)


# ----------------------------------------------------------------------------- acceptance 3


@needs_spark
def test_files_that_make_pydicom_raise_are_failure_rows_not_a_failed_job(tmp_path: Path, local_spark: Any) -> None:
    import pydicom

    corpus = _corpus()
    bad = [corpus / "generated-invalid" / n for n in ("truncated_in_header.dcm", "text_renamed.dcm", "empty.dcm")]
    for f in bad[:2]:  # an independent reader fails on them
        with pytest.raises(Exception):  # noqa: B017 - whatever pydicom raises
            pydicom.dcmread(f)
    good = [f for f in _loose_files(corpus) if "dcm_qa_nih" in str(f)][:3]
    out = spark_engine.run_extraction(
        _tasks(bad + good), Settings(batch_size=2), metastore_uri=str(tmp_path / "m"), day=DAY, now=NOW, spark=local_spark
    )
    assert out.rows_written == 3
    fails = {r["filePath"]: r for r in out.failures.to_pylist()}
    assert set(fails) == {str(f) for f in bad}
    for r in fails.values():
        assert r["stage"] == "extract" and r["errorClass"] and r["errorClass"] != "EngineError"
        assert r["ingestDate"] == DAY and r["detectedAt"] == NOW
    assert fails[str(bad[2])]["fileSize"] == 0


def exploding_extract(tasks: Sequence[ExtractTask], *, bulk_data_threshold: int, now: datetime) -> tuple[pa.Table, pa.Table]:
    """The real extractor, except that a batch holding the marker file blows up as a whole."""
    from dicom_assets.dicom.extract import extract_batch_arrow

    if any(MARKER in t.path for t in tasks):
        raise RuntimeError("simulated crash of the reader")
    return extract_batch_arrow(tasks, bulk_data_threshold=bulk_data_threshold, now=now)


@needs_spark
def test_an_exception_in_a_batch_becomes_engine_error_rows_for_that_batch(tmp_path: Path, local_spark: Any) -> None:
    corpus = _corpus()
    good = [f for f in _loose_files(corpus) if "dcm_qa_nih" in str(f)][:12]
    marker = tmp_path / f"{MARKER}.dcm"
    shutil.copyfile(good[5], marker)
    files = good[:5] + [marker] + good[5:11]  # batches of 4: the second holds the marker
    out = spark_engine._run(
        _tasks(files), Settings(batch_size=4), metastore_uri=str(tmp_path / "m"), day=DAY, now=NOW,
        spark=local_spark, extract=exploding_extract,
    )
    assert out.rows_written == 8
    assert out.failures.column("filePath").to_pylist() == [str(f) for f in files[4:8]]  # task order
    assert set(out.failures.column("errorClass").to_pylist()) == {"EngineError"}
    assert all("RuntimeError" in m for m in out.failures.column("message").to_pylist())
    assert delta.count(tmp_path / "m") == 8


# ----------------------------------------------------------------------------- no Spark needed


def test_zero_tasks_need_no_spark_and_empty_the_day(tmp_path: Path) -> None:
    uri = tmp_path / "m"
    out = spark_engine.run_extraction([], Settings(), metastore_uri=str(uri), day=DAY, now=NOW, spark=None)
    assert (out.rows_written, out.failures.num_rows, out.engine) == (0, 0, "spark")
    assert out.failures.schema == FAILURES_SCHEMA
    assert delta.exists(uri) and delta.count(uri) == 0
    # With rows of the day already there, an empty day removes them and keeps other days.
    rows = pa.Table.from_pylist([{"filePath": "a", "ingestDate": DAY}, {"filePath": "b", "ingestDate": OTHER_DAY}], schema=METASTORE_SCHEMA)
    delta.append(uri, rows, METASTORE_SCHEMA)
    spark_engine.run_extraction([], Settings(), metastore_uri=str(uri), day=DAY, now=NOW, spark=None)
    assert delta_read.read(uri, METASTORE_SCHEMA).column("filePath").to_pylist() == ["b"]


def test_the_executor_function_writes_parts_and_guards_batches_without_spark(tmp_path: Path) -> None:
    corpus = _corpus()
    good = [f for f in _loose_files(corpus) if "dcm_qa_nih" in str(f)][:3]
    marker = tmp_path / f"{MARKER}.dcm"
    shutil.copyfile(good[0], marker)
    tasks = _tasks(good + [marker])
    batch = pa.RecordBatch.from_pylist(
        [{"taskIndex": i, **{k: v for k, v in t.as_dict().items()}} for i, t in enumerate(tasks)], schema=spark_engine.TASK_SCHEMA
    )
    table_dir = tmp_path / "t"
    out = pa.Table.from_batches(
        list(spark_engine.extract_partition([batch], table_dir=str(table_dir), bulk_data_threshold=1024, batch_size=3, now=NOW, extract=exploding_extract)),
        schema=spark_engine.RESULT_SCHEMA,
    )
    kinds = out.column("kind").to_pylist()
    assert kinds == ["part", "failure"]
    part = out.to_pylist()[0]
    written = pa.parquet.read_table(table_dir / part["partPath"])
    assert written.num_rows == part["partNumRecords"] == 3
    assert json.loads(part["partStats"])["minValues"]["ingestDate"] == DAY
    fails = spark_engine.failures_from_records(out)
    assert fails.to_pylist()[0]["errorClass"] == "EngineError" and fails.to_pylist()[0]["detectedAt"] == NOW


def test_partitions_are_batches_but_at_least_one_per_core() -> None:
    assert spark_engine.partition_count(0, 64, 2) == 0
    assert spark_engine.partition_count(1, 64, 8) == 1
    assert spark_engine.partition_count(150, 64, 2) == 3
    assert spark_engine.partition_count(100, 64, 8) == 8
    assert spark_engine.partition_count(1000, 64, 2) == 16


def test_spark_conf_takes_event_log_and_extra_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(spark_engine.EVENT_LOG_ENV, raising=False)
    monkeypatch.delenv(spark_engine.EXTRA_CONF_ENV, raising=False)
    plain = spark_engine.default_spark_conf(Settings(spark_master="local[3]"))
    assert plain["spark.master"] == "local[3]" and "spark.eventLog.enabled" not in plain
    assert plain["spark.ui.showConsoleProgress"] == "false"
    assert plain["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    monkeypatch.setenv(spark_engine.EVENT_LOG_ENV, str(tmp_path / "events"))
    monkeypatch.setenv(spark_engine.EXTRA_CONF_ENV, "spark.executor.memory=2g; spark.ui.enabled=false")
    conf = spark_engine.default_spark_conf(Settings())
    assert conf["spark.eventLog.enabled"] == "true" and conf["spark.eventLog.dir"] == str(tmp_path / "events")
    assert (tmp_path / "events").is_dir()
    assert conf["spark.executor.memory"] == "2g" and conf["spark.ui.enabled"] == "false"


def test_module_imports_without_pyspark() -> None:
    import subprocess

    code = (
        "import sys; sys.modules['pyspark'] = None\n"
        "import dicom_assets.engines.spark as s, dicom_assets.engines.spark_cluster as c, dicom_assets.lake.delta_commit as d\n"
        "assert 'pyspark.sql' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})


# ----------------------------------------------------------------------------- acceptance 2


def _event_log_executors(log_dir: Path) -> tuple[set[str], dict[str, str]]:
    """Executor ids that ran tasks, and each executor's stdout log URL (names its worker)."""
    # Spark 4 rolls event logs: eventlog_v2_<app>/events_<n>_<app> (plus an appstatus marker).
    logs = sorted(p for p in log_dir.rglob("*") if p.is_file() and not p.name.startswith(("appstatus", ".")))
    assert logs, f"no event log under {log_dir}"
    ran: set[str] = set()
    added: dict[str, str] = {}
    for log in logs:
        for line in log.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)
            if event["Event"] == "SparkListenerTaskEnd":
                info = event["Task Info"]
                if not info.get("Failed") and not info.get("Killed"):
                    ran.add(str(info["Executor ID"]))
            elif event["Event"] == "SparkListenerExecutorAdded":
                added[str(event["Executor ID"])] = event["Executor Info"]["Log Urls"].get("stdout", "")
    return ran, added


@needs_spark
def test_a_standalone_cluster_of_two_workers_runs_the_extraction(tmp_path: Path, sessions: Sessions) -> None:
    from dicom_assets.engines.spark_cluster import start_cluster

    corpus = _corpus()
    manifest = _manifest_by_path(corpus)
    files = [f for f in _loose_files(corpus) if "dcm_qa_nih" in str(f) and manifest[str(f)]["valid_dicom"] == "yes"][:96]
    events = tmp_path / "events"
    events.mkdir()
    sessions.stop()  # one SparkContext per process: the local one makes way
    cluster = start_cluster(tmp_path / "cluster", workers=2, cores=1, memory="1g")
    try:
        conf = {
            **LOCAL_CONF,
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": events.as_uri(),
            "spark.eventLog.compress": "false",
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.executor.memory": "512m",
            # Start only when both executors are up, so the work can spread.
            "spark.scheduler.minRegisteredResourcesRatio": "1.0",
            "spark.scheduler.maxRegisteredResourcesWaitingTime": "60s",
        }
        spark = sessions.get(cluster.master_url, conf)
        uri = tmp_path / "metastore"
        out = spark_engine.run_extraction(_tasks(files), Settings(batch_size=8), metastore_uri=str(uri), day=DAY, now=NOW, spark=spark)
        status = cluster.status()
        assert len([w for w in status["workers"] if w["state"] == "ALIVE"]) == 2
        sessions.stop()  # flushes and closes the event log
    finally:
        sessions.stop()
        cluster.stop()

    assert out.rows_written == len(files) == delta.count(uri)
    assert out.failures.num_rows == 0
    uids = set(delta_read.read(uri, METASTORE_SCHEMA, columns=["sopInstanceUid"]).column("sopInstanceUid").to_pylist())
    assert uids == {manifest[str(f)]["sop_instance_uid"] for f in files}
    ran, added = _event_log_executors(events)
    assert len(ran) == 2, f"tasks ran on executors {sorted(ran)}"
    worker_urls = {added[e].split("/logPage")[0] for e in ran}
    assert len(worker_urls) == 2, f"executors {sorted(ran)} are not on two workers: {worker_urls}"
    # Each worker's own work folder holds an executor of the application.
    for wdir in cluster.worker_dirs:
        assert any(p.is_dir() for app in wdir.glob("app-*") for p in app.iterdir()), wdir
