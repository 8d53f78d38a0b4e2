"""The `dicom-assets` command as a newcomer uses it: sample → run → sql (SPEC §8, §10)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("cli")

PROJECT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_assets.cli", *args], capture_output=True, text=True, env=env, cwd=PROJECT, timeout=300
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    root = tmp_path_factory.mktemp("cli")
    lake = root / "lake"
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "DICOM_ASSETS_LAKE": str(lake)}
    s = cli("sample", "--size", "small", env=env)
    assert s.returncode == 0, s.stderr
    r = cli("run", "--settle-seconds", "0", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return lake, env, r.stdout


def _row_count(out: str, table: str) -> int:
    for line in out.splitlines():
        if line.startswith(table + " "):
            return int(line.split()[-1])
    raise AssertionError(f"{table} not in summary:\n{out}")


def test_run_summary_counts_the_small_sample(ran) -> None:
    import pydicom

    lake, _env, out = ran
    # Independent count: every DICOM file the sample wrote, read back with pydicom
    # (they are now zipped in Process).
    import zipfile

    sops = set()
    for p in (lake / "bronze/Files/Process").rglob("*.zip"):
        with zipfile.ZipFile(p) as z:
            for name in z.namelist():
                sops.add(pydicom.dcmread(io.BytesIO(z.read(name)), stop_before_pixels=True).SOPInstanceUID)
    assert len(sops) == 500
    assert _row_count(out, "bronze.dicomimagingmetastore") == 500
    assert "500 metastore rows, 1 failed files" in out
    assert _row_count(out, "silver.ImagingStudy") == 25
    assert _row_count(out, "gold.image_occurrence") == 32


@pytest.mark.parametrize(
    "table",
    [
        "bronze.dicomimagingmetastore",
        "bronze.dicom_failures",
        "bronze.ImagingStudy",
        "silver.ImagingMetastore",
        "silver.ImagingStudy",
        "gold.image_occurrence",
        "gold.procedure_occurrence",
    ],
)
def test_sql_reaches_every_table_of_every_layer(ran, table: str) -> None:
    _lake, env, _ = ran
    r = cli("sql", f"SELECT count(*) AS n FROM {table}", "--format", "json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] > 0


def test_sql_joins_gold_to_silver_in_each_format(ran) -> None:
    _lake, env, _ = ran
    q = (
        "SELECT s.studyInstanceUid, count(*) AS series FROM gold.image_occurrence io "
        "JOIN silver.ImagingStudy s ON io.msftSourceRecordId = s.id GROUP BY s.studyInstanceUid ORDER BY 1"
    )
    as_json = cli("sql", q, "--format", "json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(rows) == 25 and sum(r["series"] for r in rows) == 32
    as_csv = cli("sql", q, "--format", "csv", env=env)
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["studyInstanceUid"] for r in parsed] == [r["studyInstanceUid"] for r in rows]
    as_table = cli("sql", q, env=env)
    assert "(25 rows)" in as_table.stdout and "studyInstanceUid" in as_table.stdout


def test_sql_error_is_reported_plainly(ran) -> None:
    _lake, env, _ = ran
    r = cli("sql", "SELECT nope FROM gold.image_occurrence", env=env)
    assert r.returncode == 2 and "query failed" in r.stderr
