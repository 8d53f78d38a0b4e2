"""engine: spark through the Dagster resource gives the same tables as engine: local (issue 5)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pydicom.data
import pytest

from dicom_assets.config import Settings
from dicom_assets.defs.partitions import today_key
from dicom_assets.lake import delta_read
from dicom_assets.lake.paths import TABLES, LakePaths
from dicom_assets.runner import materialize_partition

pytestmark = [pytest.mark.spark, pytest.mark.xdist_group("spark")]

FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "SC_rgb_gdcm_KY.dcm"]
VOLATILE = {"createdDatetime", "msftCreatedDatetime", "msftModifiedDatetime", "lastUpdated", "detectedAt", "fhirContent"}


def _java_or_skip() -> None:
    pytest.importorskip("pyspark", reason="pyspark not installed: pip install -e '.[spark]'")
    if shutil.which("java") is None or subprocess.run(["java", "-version"], capture_output=True).returncode != 0:
        pytest.skip("java not found: the Spark engine needs a JVM (Java 17)")


def _lake(root: Path) -> LakePaths:
    lake = LakePaths.of(root).ensure()
    ns = lake.ingest_root / "clinic"
    ns.mkdir(parents=True)
    for name in FILES:
        shutil.copy(pydicom.data.get_testdata_file(name), ns / name)
    (ns / "bad.dcm").write_bytes(b"not dicom at all")
    when = (time.time() // 3600 - 1) * 3600  # same source mtimes in both lakes, earlier today
    for p in ns.iterdir():
        os.utime(p, (when, when))
    return lake


def _comparable(lake: LakePaths, name: str) -> pa.Table:
    """The table with volatile columns dropped and lake-specific paths neutralised.

    The two lakes live in different folders and organise names files
    ``<epoch>_<basename>``, so paths (also inside BulkDataURIs) differ by
    those two parts only.
    """
    t = delta_read.read(lake.table_uri(name))
    t = t.drop_columns([c for c in t.column_names if c in VOLATILE])
    root = str(lake.root)
    for i, f in enumerate(t.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            vals = [None if v is None else re.sub(r"/\d+(\.\d+)?_", "/_", v.replace(root, "<lake>")) for v in t.column(i).to_pylist()]
            t = t.set_column(i, f, pa.array(vals, f.type))
    keys = [c for c in ("sopInstanceUid", "filePath", "originalPath", "id", "image_series_uid", "image_study_uid", "key", "procedure_occurrence_id") if c in t.column_names]
    return t.sort_by([(c, "ascending") for c in keys])


def test_spark_engine_tables_equal_local_engine_tables(tmp_path: Path) -> None:
    _java_or_skip()
    day = today_key()
    local = _lake(tmp_path / "local" / "lake")
    spark = _lake(tmp_path / "spark" / "lake")
    assert materialize_partition(Settings(lake=str(local.root), settle_seconds=0), partition=day, progress=False)["success"]
    assert materialize_partition(
        Settings(lake=str(spark.root), settle_seconds=0, engine="spark"), partition=day, progress=False
    )["success"]
    for name in TABLES:
        a, b = _comparable(local, name), _comparable(spark, name)
        assert a.num_rows == b.num_rows, name
        if not name.startswith("_idmap"):
            assert a.equals(b), f"{name}\n{_debug(a, b)}"


def _debug(a: pa.Table, b: pa.Table) -> str:
    out = []
    for c in a.column_names:
        if not a.column(c).equals(b.column(c)):
            out.append(f"{c}: {a.column(c).to_pylist()[:2]!r:.300} != {b.column(c).to_pylist()[:2]!r:.300}")
    return "\n".join(out)
