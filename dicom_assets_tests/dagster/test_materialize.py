"""Every asset of a partition materialised in-process on real files (pydicom's bundled data)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from dicom_assets.config import Settings
from dicom_assets.definitions import defs
from dicom_assets.defs import sensors
from dicom_assets.defs.partitions import today_key
from dicom_assets.lake import delta_read
from dicom_assets.lake.paths import LakePaths
from dicom_assets.runner import materialize_partition

DAY = today_key()
FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "SC_rgb_gdcm_KY.dcm", "MR_small_bigendian.dcm"]


def _read_uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


@pytest.fixture
def small_lake(tmp_path: Path) -> tuple[LakePaths, list[Path]]:
    lake = LakePaths.of(tmp_path / "lake").ensure()
    ns = lake.ingest_root / "clinic"
    ns.mkdir(parents=True)
    srcs = [Path(pydicom.data.get_testdata_file(f)) for f in FILES]
    for i, src in enumerate(srcs[:4]):
        (ns / ("sub" if i % 2 else "") ).mkdir(exist_ok=True)
        shutil.copy(src, ns / ("sub" if i % 2 else "") / (src.stem if i == 0 else src.name))  # one without extension
    with zipfile.ZipFile(ns / "batch.zip", "w") as z:
        for src in srcs[4:]:
            z.write(src, f"inner/{src.name}")
    (ns / "README.txt").write_text("not dicom")
    (ns / "broken.dcm").write_bytes(b"this is not a DICOM file")
    return lake, srcs


def test_materialize_every_asset_then_rematerialize_is_idempotent(small_lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake, srcs = small_lake
    settings = Settings(lake=str(lake.root), settle_seconds=0, workers=1)
    released: list[int] = []
    monkeypatch.setattr(sensors, "release_unused_memory", lambda: released.append(1))
    first = materialize_partition(settings, partition=DAY, progress=False, raise_on_error=True)
    assert first["success"]
    # The one-process run hands each step's freed heap back before the next step.
    assert len(released) == len(list(defs.assets or [])) + len(list(defs.asset_checks or []))
    meta = delta_read.read(lake.table_uri("dicomimagingmetastore"))
    expected = sorted(_read_uids(p) for p in srcs)
    got = sorted(zip(*(meta.column(c).to_pylist() for c in ("studyInstanceUid", "seriesInstanceUid", "sopInstanceUid")), strict=False))
    assert got == expected
    fails = delta_read.read(lake.table_uri("dicom_failures"))
    assert fails.num_rows == 1 and fails.column("originalPath").to_pylist()[0].endswith("broken.dcm")
    assert (lake.ingest_root / "clinic" / "README.txt").exists()
    # Every file was compressed after its read; paths in the table point at the zips.
    assert all(p.endswith(".zip") and Path(p).exists() for p in meta.column("filePath").to_pylist())

    studies = {u[0] for u in expected}
    silver = delta_read.read(lake.table_uri("silver_ImagingStudy"))
    assert sorted(silver.column("studyInstanceUid").to_pylist()) == sorted(studies)
    io = delta_read.read(lake.table_uri("image_occurrence"))
    assert sorted(zip(io.column("image_study_uid").to_pylist(), io.column("image_series_uid").to_pylist(), strict=False)) == sorted({u[:2] for u in expected})

    snapshot = {
        name: delta_read.read(lake.table_uri(name)).drop_columns(
            [c for c in delta_read.read(lake.table_uri(name)).column_names if "Datetime" in c or c in ("lastUpdated",)]
        ).sort_by([(delta_read.read(lake.table_uri(name)).column_names[0], "ascending")])
        for name in ("dicomimagingmetastore", "ImagingMetastore", "silver_ImagingStudy", "image_occurrence", "procedure_occurrence")
    }
    second = materialize_partition(settings, partition=DAY, progress=False, raise_on_error=True)
    assert second["success"]
    for name, before in snapshot.items():
        after = delta_read.read(lake.table_uri(name))
        after = after.drop_columns([c for c in after.column_names if "Datetime" in c or c in ("lastUpdated",)])
        after = after.sort_by([(after.column_names[0], "ascending")])
        assert after.equals(before), name
