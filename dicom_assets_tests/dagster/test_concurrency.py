"""Runs at once on a real instance: one run per partition at a time, tables never corrupted (SPEC §4, §6).

``dagster dev`` (web server + daemon, the project's ``dagster.yaml`` and
``workspace.yaml``) serves a temporary lake. Six runs are submitted at once
through GraphQL: three of today (what the ingest sensor and the daily schedule
request, evaluated from their definitions, plus a manual launch), two of
yesterday and one of the day before (backfills). The run queue must keep one
run per partition at a time (run start/end times from the instance never
overlap for one partition) while different partitions run side by side, and
the lake must end consistent: every file once, no duplicate rows, every
asset check passed, every Delta table readable.

The daemon's own sensors are kept quiet (settle time of ten years in its
environment; runs override it to 0 in their run config) so the runs are
exactly the six submitted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_assets.defs.partitions import today_key
from dicom_assets.defs.sensors import daily_all_assets_schedule, ingest_folder_sensor
from dicom_assets.lake import delta, delta_read
from dicom_assets.lake.paths import TABLES, LakePaths
from dicom_assets.lake.schemas import TABLE_SCHEMAS
from dicom_assets.settings import DicomAssetsSettings
from dicom_assets_tests.dagster.devserver import IN_PROCESS, dagster_dev, wait_for_runs

pytestmark = pytest.mark.xdist_group("dagster_dev")

PROJECT = Path(__file__).resolve().parents[2]
TEN_YEARS = str(10 * 365 * 86400)


def _day(offset: int) -> str:
    return (datetime.now(UTC) - timedelta(days=offset)).strftime("%Y/%m/%d")


def _write_study(folder: Path, tag: str, series: int, per_series: int, mtime: float) -> list[Path]:
    """A new study (fresh UIDs, written with pydicom) from CT_small, modified at ``mtime``."""
    study = generate_uid(entropy_srcs=[tag, "study"])
    out = []
    for s in range(series):
        series_uid = generate_uid(entropy_srcs=[tag, "series", str(s)])
        for i in range(per_series):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, "sop", str(s), str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"PID-{tag}"
            p = folder / tag / f"s{s}_{i}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(p, enforce_file_format=True)
            os.utime(p, (mtime, mtime))
            out.append(p)
    return out


def _drop_files(lake: LakePaths) -> list[Path]:
    ns = lake.ingest_root / "clinic"
    ns.mkdir(parents=True)
    files = []
    now = time.time()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"):
        p = ns / "today" / name
        p.parent.mkdir(exist_ok=True)
        shutil.copyfile(get_testdata_file(name), p)
        os.utime(p, (now - 120, now - 120))
        files.append(p)
    for offset, tag in ((1, "yesterday"), (2, "daybefore")):
        start = datetime.strptime(_day(offset), "%Y/%m/%d").replace(tzinfo=UTC).timestamp()
        files += _write_study(ns, tag, series=2, per_series=2, mtime=start + 3600)
    return files


def _expected(files: list[Path]) -> dict[str, int]:
    """Counts read independently with pydicom."""
    dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    return {
        "files": len(files),
        "instances": len({d.SOPInstanceUID for d in dss}),
        "studies": len({d.StudyInstanceUID for d in dss}),
        "series": len({(d.StudyInstanceUID, d.SeriesInstanceUID) for d in dss}),
    }


def _check_evaluations(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, bool]]:
    out = []
    for rec in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        data = rec.dagster_event.event_specific_data
        out.append((data.check_name, bool(data.passed)))
    return out


def test_runs_of_one_partition_queue_and_tables_stay_consistent(tmp_path: Path, dagster_home: Path) -> None:
    home = dagster_home
    lake = LakePaths.of(tmp_path / "lake").ensure()
    files = _drop_files(lake)
    expected = _expected(files)
    today, yesterday, daybefore = today_key(), _day(1), _day(2)
    env = {"DICOM_ASSETS_LAKE": str(lake.root), "DICOM_ASSETS_SETTLE_SECONDS": TEN_YEARS, "DICOM_ASSETS_WORKERS": "1"}
    run_config = {**IN_PROCESS, "resources": {"settings": {"config": {"settle_seconds": 0, "workers": 1}}}}
    with dagster_dev(home, env) as server, dg.DagsterInstance.get() as instance:
        # What the sensor and the schedule would request right now, from their definitions.
        settings = DicomAssetsSettings(lake=str(lake.root), settle_seconds=0)
        tick = ingest_folder_sensor(dg.build_sensor_context(instance=instance, resources={"settings": settings}))
        (sensor_request,) = tick.run_requests
        after_midnight = datetime.strptime(today, "%Y/%m/%d").replace(tzinfo=UTC) + timedelta(days=1, minutes=30)
        schedule_request = daily_all_assets_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=after_midnight))
        assert sensor_request.partition_key == schedule_request.partition_key == today
        launches = [
            (sensor_request.partition_key, {**sensor_request.tags, "dagster/sensor_name": "ingest_folder_sensor"}),
            (schedule_request.partition_key, {"dagster/schedule_name": "daily_all_assets_schedule"}),
            (today, {"dicom_assets/trigger": "manual"}),
            (yesterday, {"dicom_assets/trigger": "manual"}),
            (yesterday, {"dicom_assets/trigger": "manual"}),
            (daybefore, {"dicom_assets/trigger": "manual"}),
        ]
        run_ids = [server.launch(day, tags, run_config) for day, tags in launches]
        records = wait_for_runs(instance, run_ids, timeout=600)
        statuses = {r.dagster_run.run_id: r.dagster_run.status.value for r in records}
        assert set(statuses.values()) == {"SUCCESS"}, (statuses, server.log.read_text()[-3000:])
        checks = {rid: _check_evaluations(instance, rid) for rid in run_ids}

    # One run per partition at a time: the queue never started a run of a day while another ran.
    by_day: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        assert r.start_time and r.end_time
        by_day[r.dagster_run.tags["dagster/partition"]].append((r.start_time, r.end_time))
    for day, spans in by_day.items():
        spans.sort()
        for (_s1, e1), (s2, _e2) in zip(spans, spans[1:], strict=False):
            assert s2 >= e1, f"two runs of {day} overlapped: {spans}"
    assert Counter({d: len(s) for d, s in by_day.items()}) == Counter({today: 3, yesterday: 2, daybefore: 1})
    spans = sorted((s, e, d) for d, ss in by_day.items() for s, e in ss)
    overlapping_days = any(s2 < e1 and d1 != d2 for (s1, e1, d1) in spans for (s2, e2, d2) in spans if s1 < s2)
    print(f"runs of different partitions overlapped in time: {overlapping_days}")

    # Every asset check of every run ran and passed.
    for rid, evals in checks.items():
        assert len(evals) == 7 and all(ok for _n, ok in evals), (rid, evals)

    # The lake is consistent: every table readable, every file once, no duplicate rows.
    tables = {name: delta_read.read(lake.table_uri(name), TABLE_SCHEMAS[name]) for name in TABLES}
    process = [p for p in lake.process_root.rglob("*") if p.is_file()]
    assert len(process) == expected["files"] and not any(lake.ingest_root.rglob("*.dcm"))
    meta = tables["dicomimagingmetastore"]
    assert meta.num_rows == expected["files"]
    assert len(set(meta.column("filePath").to_pylist())) == meta.num_rows
    assert sorted(meta.column("filePath").to_pylist()) == sorted(map(str, process))
    silver = tables["ImagingMetastore"]
    keys = list(zip(*(silver.column(c).to_pylist() for c in ("studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "msftSourceSystem")), strict=False))
    assert len(keys) == len(set(keys)) == expected["instances"]
    for name, key, n in (
        ("silver_ImagingStudy", "id", expected["studies"]),
        ("bronze_ImagingStudy", "id", expected["studies"]),
        ("image_occurrence", "image_occurrence_id", expected["series"]),
        ("procedure_occurrence", "procedure_occurrence_id", expected["studies"]),
        ("_idmap_image_occurrence", "id", expected["series"]),
        ("_idmap_procedure_occurrence", "id", expected["studies"]),
    ):
        values = tables[name].column(key).to_pylist()
        assert len(values) == len(set(values)) == n, (name, len(values), len(set(values)), n)
    for kind in ("image_occurrence", "person", "procedure_occurrence"):
        t = tables[f"_idmap_{kind}"]
        assert len(set(t.column("key").to_pylist())) == t.num_rows


# ----------------------------------------------------------------------------- Delta commit races

WRITER = r"""
import json, sys, time
import pyarrow as pa
from dicom_assets.lake import delta, delta_commit, delta_read
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA, SILVER_METASTORE_SCHEMA

root, day, go, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
waits = 0
class _Clock:
    # with_commit_retry sleeps only after a lost commit race: count those waits.
    def __getattr__(self, name):
        return getattr(time, name)
    def sleep(self, s):
        global waits
        waits += 1
        time.sleep(s)
delta.time = _Clock()

def rows(schema, n, r):
    return delta.conform(pa.table({
        "studyInstanceUid": [f"1.2.{day[-2:]}"] * n,
        "seriesInstanceUid": [f"1.2.{day[-2:]}.1"] * n,
        "sopInstanceUid": [f"1.2.{day[-2:]}.1.{i}" for i in range(n)],
        "msftSourceSystem": ["ns"] * n,
        "sourceSystem": ["ns"] * n,
        "filePath": [f"{day}/round{r}/{i}" for i in range(n)],
        "fileSize": [r] * n,
        "ingestDate": [day] * n,
    }), schema)

while not __import__("os").path.exists(go):
    time.sleep(0.005)
start = time.time()
for r in range(rounds):
    delta_commit.commit_replace(f"{root}/bronze/Tables/meta", METASTORE_SCHEMA,
                                [delta_commit.write_part(f"{root}/bronze/Tables/meta", rows(METASTORE_SCHEMA, 3, r))], day)
    delta.replace_where(f"{root}/bronze/Tables/fail", rows(FAILURES_SCHEMA, 2, r), FAILURES_SCHEMA,
                        f"ingestDate = {delta_read.sql_literal(day)}")
    delta.merge(f"{root}/silver/Tables/inst", rows(SILVER_METASTORE_SCHEMA, 3, r), SILVER_METASTORE_SCHEMA,
                keys=["studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "msftSourceSystem"])
print(json.dumps({"waits": waits, "start": start, "end": time.time()}))
"""


def test_two_processes_writing_different_days_to_the_same_tables(tmp_path: Path) -> None:
    """Replace, one-commit replace and merge of two days at once: conflicts retried, nothing lost or doubled."""
    from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA, SILVER_METASTORE_SCHEMA

    root = tmp_path / "lake"
    for uri, schema in (("bronze/Tables/meta", METASTORE_SCHEMA), ("bronze/Tables/fail", FAILURES_SCHEMA), ("silver/Tables/inst", SILVER_METASTORE_SCHEMA)):
        delta.ensure_table(root / uri, schema)
    go, rounds = tmp_path / "go", 8
    days = ["2024/01/01", "2024/01/02"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(root), d, str(go), str(rounds)], env=env, cwd=PROJECT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for d in days
    ]
    time.sleep(2.0)  # both imported and waiting
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0, err.decode()[-3000:]
    waits = sum(json.loads(out)["waits"] for out, _err in outs)

    last = rounds - 1
    meta = delta_read.read(root / "bronze/Tables/meta", METASTORE_SCHEMA, columns=["ingestDate", "filePath"]).to_pylist()
    assert sorted((r["ingestDate"], r["filePath"]) for r in meta) == sorted(
        (d, f"{d}/round{last}/{i}") for d in days for i in range(3)
    )
    fail = delta_read.read(root / "bronze/Tables/fail", FAILURES_SCHEMA, columns=["ingestDate", "filePath"]).to_pylist()
    assert sorted((r["ingestDate"], r["filePath"]) for r in fail) == sorted(
        (d, f"{d}/round{last}/{i}") for d in days for i in range(2)
    )
    inst = delta_read.read(root / "silver/Tables/inst", SILVER_METASTORE_SCHEMA, columns=["sopInstanceUid", "fileSize"]).to_pylist()
    assert sorted((r["sopInstanceUid"], r["fileSize"]) for r in inst) == sorted(
        (f"1.2.{d[-2:]}.1.{i}", last) for d in days for i in range(3)
    )
    # The two writers really wrote at the same time, and every commit of both is in each log.
    spans = [json.loads(out) for out, _err in outs]
    assert max(x["start"] for x in spans) < min(x["end"] for x in spans), spans
    for table in ("bronze/Tables/meta", "bronze/Tables/fail", "silver/Tables/inst"):
        history = delta.DeltaTable(str(root / table)).history()
        assert len(history) == 1 + 2 * rounds, (table, len(history))
    print(f"lost commit races retried by with_commit_retry: {waits}")
    assert waits >= 1, "the writers never raced; the test did not exercise the retry"


# ----------------------------------------------------------------------------- checks vs. a run in flight


def _run_killed(root: Path, day: str, kill: str) -> int:
    """Run every asset of ``day`` in a subprocess that SIGKILLs itself at ``kill``: a run frozen mid-way."""
    from dicom_assets_tests.e2e.test_crash_pipeline import RUNNER

    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("DICOM_ASSETS_")}
    env.update({"DICOM_ASSETS_KILL_AT": kill, "PYTHONPATH": str(PROJECT), "DAGSTER_TELEMETRY_DISABLED": "1"})
    r = subprocess.run([sys.executable, "-c", RUNNER, str(root), day, ""], env=env, cwd=PROJECT, capture_output=True, timeout=300)
    return r.returncode


def test_a_partitions_checks_pass_while_another_day_is_half_written(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Checks look at their own partition's studies: another day's run in flight cannot fail them."""
    from dicom_assets.config import Settings
    from dicom_assets.runner import materialize_partition
    from dicom_assets.steps import gold, reconcile

    lake = LakePaths.of(tmp_path / "lake").ensure()
    yesterday, today = _day(1), today_key()
    start = datetime.strptime(yesterday, "%Y/%m/%d").replace(tzinfo=UTC).timestamp()
    _write_study(lake.ingest_root / "clinic", "old", series=1, per_series=2, mtime=start + 3600)
    _write_study(lake.ingest_root / "clinic", "new", series=2, per_series=1, mtime=time.time() - 60)
    settings = Settings(lake=str(lake.root), settle_seconds=0, workers=1)

    def rerun_yesterday_and_its_checks() -> list[tuple[str, bool]]:
        assert materialize_partition(settings, partition=yesterday, progress=False)["success"]
        (last,) = instance.get_run_records(limit=1)
        return _check_evaluations(instance, last.dagster_run.run_id)

    assert materialize_partition(settings, partition=yesterday, progress=False)["success"]
    # Today's run frozen after merging its instances, before writing its ImagingStudy rows.
    assert _run_killed(lake.root, today, "delta:before_commit:silver.ImagingStudy:1") == -9
    assert not reconcile.silver_studies_consistent(lake)[0]  # the lake as a whole is mid-write
    assert reconcile.silver_studies_consistent(lake, yesterday)[0]
    evals = rerun_yesterday_and_its_checks()
    assert len(evals) == 7 and all(ok for _n, ok in evals), evals
    # Today's run frozen between its image_occurrence and procedure_occurrence merges.
    assert _run_killed(lake.root, today, "delta:before_commit:gold.procedure_occurrence:1") == -9
    assert not gold.check_image_occurrence(lake)[0]
    assert gold.check_image_occurrence(lake, yesterday)[0] and gold.check_procedure_occurrence(lake, yesterday)[0]
    evals = rerun_yesterday_and_its_checks()
    assert len(evals) == 7 and all(ok for _n, ok in evals), evals
