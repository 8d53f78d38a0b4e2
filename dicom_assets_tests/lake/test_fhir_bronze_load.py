"""Bronze ImagingStudy: the day's NDJSON files streamed into one part file that replaces the day."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from dicom_assets.lake import delta_commit, delta_read
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import BRONZE_IMAGINGSTUDY_SCHEMA
from dicom_assets.steps import fhir_steps

DAY1, DAY2 = "2024/03/01", "2024/03/02"


def _ndjson(paths: LakePaths, ns: str, day: str, name: str, ids: list[str]) -> None:
    folder = paths.ndjson_dir(ns, day)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"resourceType": "ImagingStudy", "id": i, "meta": {"lastUpdated": "2024-03-01T10:00:00Z"}}) for i in ids]
    (folder / name).write_text("\n".join(lines) + "\n\n", encoding="utf-8")


def _ids_by_day(paths: LakePaths) -> dict[str, list[str]]:
    t = delta_read.read(paths.table_uri("bronze_ImagingStudy"), BRONZE_IMAGINGSTUDY_SCHEMA, columns=["id", "ingestDate"])
    out: dict[str, list[str]] = {}
    for i, day in zip(t.column("id").to_pylist(), t.column("ingestDate").to_pylist(), strict=True):
        out.setdefault(day, []).append(i)
    return {d: sorted(v) for d, v in out.items()}


def test_the_day_is_one_file_of_a_row_group_per_ndjson_file_and_other_days_stay(tmp_path: Path) -> None:
    paths = LakePaths.of(tmp_path)
    _ndjson(paths, "clinic", DAY1, "ImagingStudy-00000.ndjson", ["a1", "a2"])
    _ndjson(paths, "clinic", DAY1, "ImagingStudy-00001.ndjson", ["a3", "a4"])
    _ndjson(paths, "research", DAY1, "ImagingStudy-00000.ndjson", ["b1"])
    _ndjson(paths, "clinic", DAY2, "ImagingStudy-00000.ndjson", ["c1"])
    assert fhir_steps.load_bronze(paths, DAY1) == 5
    assert fhir_steps.load_bronze(paths, DAY2) == 1
    uri = paths.table_uri("bronze_ImagingStudy")
    assert _ids_by_day(paths) == {DAY1: ["a1", "a2", "a3", "a4", "b1"], DAY2: ["c1"]}
    (day1_file,) = delta_commit.day_files(uri, DAY1)
    assert pq.ParquetFile(delta_commit.table_dir(uri) / day1_file).metadata.num_row_groups == 3

    # A re-run replaces the day with the same rows; with no NDJSON left the day is emptied.
    assert fhir_steps.load_bronze(paths, DAY1) == 5
    assert _ids_by_day(paths) == {DAY1: ["a1", "a2", "a3", "a4", "b1"], DAY2: ["c1"]}
    assert len(DeltaTable(str(uri)).file_uris()) == 2
    for f in paths.ndjson_dir("clinic", DAY1).iterdir():
        f.unlink()
    for f in paths.ndjson_dir("research", DAY1).iterdir():
        f.unlink()
    assert fhir_steps.load_bronze(paths, DAY1) == 0
    assert _ids_by_day(paths) == {DAY2: ["c1"]}


def test_a_failed_commit_leaves_no_part_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = LakePaths.of(tmp_path)
    _ndjson(paths, "clinic", DAY1, "ImagingStudy-00000.ndjson", ["a1"])
    assert fhir_steps.load_bronze(paths, DAY1) == 1
    uri = paths.table_uri("bronze_ImagingStudy")
    before = sorted(p.name for p in delta_commit.table_dir(uri).glob("*.parquet"))

    def lost(*_a: object, **_k: object) -> None:
        raise RuntimeError("commit lost")

    monkeypatch.setattr(delta_commit, "_commit_replace", lost)  # the commit itself fails
    with pytest.raises(RuntimeError, match="commit lost"):
        fhir_steps.load_bronze(paths, DAY1)
    assert sorted(p.name for p in delta_commit.table_dir(uri).glob("*.parquet")) == before
    assert _ids_by_day(paths) == {DAY1: ["a1"]}
