"""Sensors on a real Dagster instance: settled files trigger once, cursors survive restarts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pydicom.data

from dicom_assets.defs.partitions import today_key
from dicom_assets.defs.sensors import external_folder_sensor, ingest_folder_sensor
from dicom_assets.lake.paths import LakePaths
from dicom_assets.settings import DicomAssetsSettings

CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
MR = Path(pydicom.data.get_testdata_file("MR_small.dcm"))


def _drop(dst: Path, src: Path, age: float) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    t = time.time() - age
    os.utime(dst, (t, t))
    return dst


def _tick(instance: dg.DagsterInstance, settings: DicomAssetsSettings, cursor: str | None, sensor=ingest_folder_sensor):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"settings": settings})
    result = sensor(ctx)
    return result, result.cursor


def test_new_settled_files_give_one_run_for_today(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    lake = LakePaths.of(tmp_path / "lake").ensure()
    settings = DicomAssetsSettings(lake=str(lake.root), settle_seconds=5)
    _drop(lake.ingest_root / "ns1" / "a.dcm", CT, age=60)
    _drop(lake.ingest_root / "ns1" / "b.dcm", MR, age=60)
    result, cursor = _tick(instance, settings, None)
    assert len(result.run_requests) == 1
    assert result.run_requests[0].partition_key == today_key()
    # Same files, next tick: nothing.
    result, cursor2 = _tick(instance, settings, cursor)
    assert not result.run_requests
    # Restart: a fresh context from the stored cursor still remembers them.
    result, _ = _tick(instance, settings, cursor2)
    assert not result.run_requests


def test_file_changed_within_settle_time_is_not_taken(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    lake = LakePaths.of(tmp_path / "lake").ensure()
    settings = DicomAssetsSettings(lake=str(lake.root), settle_seconds=30)
    _drop(lake.ingest_root / "ns1" / "writing.dcm", CT, age=1)
    result, cursor = _tick(instance, settings, None)
    assert not result.run_requests
    # Once it has been quiet for the settle time it triggers, exactly once.
    p = lake.ingest_root / "ns1" / "writing.dcm"
    t = time.time() - 60
    os.utime(p, (t, t))
    result, cursor = _tick(instance, settings, cursor)
    assert len(result.run_requests) == 1
    result, cursor = _tick(instance, settings, cursor)
    assert not result.run_requests
    # A change of size and mtime makes it new again (after settling).
    with open(p, "ab") as fh:
        fh.write(b"\0" * 16)
    result, cursor = _tick(instance, settings, cursor)
    assert not result.run_requests
    t = time.time() - 60
    os.utime(p, (t, t))
    result, _ = _tick(instance, settings, cursor)
    assert len(result.run_requests) == 1


def test_external_sensor_sees_files_read_in_place(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    lake = LakePaths.of(tmp_path / "lake").ensure()
    storage = tmp_path / "pacs_export"
    _drop(storage / "x" / "ct.dcm", CT, age=60)
    (lake.external_root / "hospital").mkdir(parents=True)
    (lake.external_root / "hospital" / "pacs").symlink_to(storage, target_is_directory=True)
    settings = DicomAssetsSettings(lake=str(lake.root), settle_seconds=5)
    result, cursor = _tick(instance, settings, None, external_folder_sensor)
    assert len(result.run_requests) == 1
    result, _ = _tick(instance, settings, cursor, external_folder_sensor)
    assert not result.run_requests
