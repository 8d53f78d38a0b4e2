"""Bring-your-own-storage (External, read in place) and the ImagingStudy NDJSON files, via Dagster."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pydicom
import pydicom.data
from fhir.resources.R4B.imagingstudy import ImagingStudy

from dicom_assets.config import Settings
from dicom_assets.defs.partitions import today_key
from dicom_assets.lake import delta_read
from dicom_assets.lake.paths import LakePaths
from dicom_assets.runner import materialize_partition

FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]


def _state(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_external_files_are_read_in_place_once_and_again_when_changed(tmp_path: Path) -> None:
    storage = tmp_path / "pacs_export"
    (storage / "a").mkdir(parents=True)
    for name in FILES:
        shutil.copy(pydicom.data.get_testdata_file(name), storage / "a" / name)
    old = time.time() - 3600
    for p in storage.rglob("*"):
        os.utime(p, (old, old))
    lake = LakePaths.of(tmp_path / "lake").ensure()
    (lake.external_root / "hospital").mkdir(parents=True)
    (lake.external_root / "hospital" / "pacs").symlink_to(storage, target_is_directory=True)
    before = _state(storage)
    settings = Settings(lake=str(lake.root), settle_seconds=0)
    day = today_key()

    assert materialize_partition(settings, partition=day, progress=False)["success"]
    rows = delta_read.read(lake.table_uri("dicomimagingmetastore")).to_pylist()
    assert sorted(r["sopInstanceUid"] for r in rows) == sorted(
        pydicom.dcmread(storage / "a" / n, stop_before_pixels=True).SOPInstanceUID for n in FILES
    )
    assert all(r["sourceSystem"] == "hospital" and "/External/" in r["filePath"] for r in rows)
    assert _state(storage) == before  # never moved, renamed, compressed or deleted
    assert not any(lake.process_root.rglob("*.dcm*"))

    # Same files again: nothing new to read, same rows.
    assert materialize_partition(settings, partition=day, progress=False)["success"]
    again = delta_read.read(lake.table_uri("dicomimagingmetastore")).to_pylist()
    assert sorted(r["contentSha256"] for r in again) == sorted(r["contentSha256"] for r in rows)

    # A changed file is read again.
    ds = pydicom.dcmread(storage / "a" / "CT_small.dcm")
    ds.SeriesDescription = "re-exported"
    ds.save_as(storage / "a" / "CT_small.dcm")
    os.utime(storage / "a" / "CT_small.dcm", (old + 60, old + 60))
    assert materialize_partition(settings, partition=day, progress=False)["success"]
    changed = delta_read.read(lake.table_uri("dicomimagingmetastore")).to_pylist()
    ct = [r for r in changed if r["sopInstanceUid"] == ds.SOPInstanceUID]
    assert len(ct) == 1 and ct[0]["seriesDescription"] == "re-exported"
    silver = delta_read.read(lake.table_uri("ImagingMetastore")).to_pylist()
    assert [r["seriesDescription"] for r in silver if r["sopInstanceUid"] == ds.SOPInstanceUID] == ["re-exported"]
    assert len(_state(storage)) == len(before)


def test_ndjson_files_hold_valid_resources_and_are_rewritten_not_duplicated(tmp_path: Path) -> None:
    lake = LakePaths.of(tmp_path / "lake").ensure()
    ns = lake.ingest_root / "clinic"
    ns.mkdir(parents=True)
    for name in FILES:
        shutil.copy(pydicom.data.get_testdata_file(name), ns / name)
    settings = Settings(lake=str(lake.root), settle_seconds=0)
    day = today_key()
    assert materialize_partition(settings, partition=day, progress=False)["success"]
    folder = lake.ndjson_dir("clinic", day)
    files = sorted(folder.glob("*.ndjson"))
    assert files
    studies = {pydicom.dcmread(pydicom.data.get_testdata_file(n), stop_before_pixels=True).StudyInstanceUID for n in FILES}
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    assert len(lines) == len(studies)
    for res in lines:
        ImagingStudy.model_validate(res)
        assert res["identifier"][0]["value"].removeprefix("urn:oid:") in studies
    snapshot = {f.name: f.read_bytes() for f in files}
    assert materialize_partition(settings, partition=day, progress=False)["success"]
    assert {f.name: f.read_bytes() for f in sorted(folder.glob("*"))} == snapshot
    bronze = delta_read.read(lake.table_uri("bronze_ImagingStudy")).to_pylist()
    assert len(bronze) == len(studies) and all(Path(r["filePath"]).parent == folder for r in bronze)
