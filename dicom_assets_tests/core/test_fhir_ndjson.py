"""NDJSON partition files: ≤ max per file, deterministic names, stale files removed (SPEC §3.4, §6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_assets.fhir import write_ndjson


def resources(n: int) -> list[dict]:
    return [{"resourceType": "ImagingStudy", "id": f"{i:064x}", "status": "available"} for i in range(n)]


def read_ids(paths: list[Path]) -> list[str]:
    return [json.loads(line)["id"] for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


def test_files_are_split_at_max_per_file_with_deterministic_names(tmp_path: Path) -> None:
    paths = write_ndjson(resources(2500), tmp_path)
    assert [p.name for p in paths] == [
        "ImagingStudy-00000.ndjson",
        "ImagingStudy-00001.ndjson",
        "ImagingStudy-00002.ndjson",
    ]
    assert [len(p.read_text().splitlines()) for p in paths] == [1000, 1000, 500]
    assert read_ids(paths) == [r["id"] for r in resources(2500)]


def test_rewrite_replaces_and_removes_stale_files_never_duplicates(tmp_path: Path) -> None:
    first = write_ndjson(resources(5), tmp_path, max_per_file=2)
    assert len(first) == 3
    (tmp_path / ".tmp-ImagingStudy-00000.ndjson.999").write_text("torn")  # crash leftover
    (tmp_path / "notes.txt").write_text("keep me")
    second = write_ndjson(resources(3), tmp_path, max_per_file=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ImagingStudy-00000.ndjson",
        "ImagingStudy-00001.ndjson",
        "notes.txt",
    ]
    assert read_ids(second) == [r["id"] for r in resources(3)]
    before = [p.read_bytes() for p in second]
    again = write_ndjson(resources(3), tmp_path, max_per_file=2)
    assert [p.read_bytes() for p in again] == before


def test_each_line_is_one_compact_json_resource(tmp_path: Path) -> None:
    [path] = write_ndjson([{"resourceType": "ImagingStudy", "id": "a", "description": "é\nx"}], tmp_path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 2
    assert lines[0] == '{"description":"é\\nx","id":"a","resourceType":"ImagingStudy"}'


def test_empty_input_removes_old_files_and_other_prefixes_are_left_alone(tmp_path: Path) -> None:
    write_ndjson(resources(2), tmp_path)
    write_ndjson(resources(1), tmp_path, prefix="DiagnosticReport")
    assert write_ndjson([], tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["DiagnosticReport-00000.ndjson"]


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_ndjson(resources(1), tmp_path, max_per_file=0)
    with pytest.raises(ValueError):
        write_ndjson(resources(1), tmp_path, prefix="../escape")
