"""Partition-scoped checks read only the partition's studies, and still see every duplicate there."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from dicom_assets.lake import delta
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import METASTORE_SCHEMA, SILVER_METASTORE_SCHEMA
from dicom_assets.steps import reconcile

DAY, OTHER = "2026/01/02", "2026/01/01"


def _lake(tmp_path: Path) -> LakePaths:
    paths = LakePaths.of(str(tmp_path / "lake"))
    bronze = [
        {"sourceSystem": "ns", "studyInstanceUid": "1.2.1", "sopInstanceUid": "1.2.1.1", "ingestDate": DAY},
        {"sourceSystem": "ns", "studyInstanceUid": "1.2.2", "sopInstanceUid": "1.2.2.1", "ingestDate": OTHER},
    ]
    delta.append(paths.table_uri("dicomimagingmetastore"), pa.Table.from_pylist(bronze), METASTORE_SCHEMA)
    silver = [
        {"studyInstanceUid": s, "seriesInstanceUid": s + ".9", "sopInstanceUid": s + ".1", "msftSourceSystem": "ns"}
        for s in ("1.2.1", "1.2.2")
    ]
    delta.append(paths.table_uri("ImagingMetastore"), pa.Table.from_pylist(silver), SILVER_METASTORE_SCHEMA)
    return paths


def _duplicate(paths: LakePaths, study: str) -> None:
    row = {"studyInstanceUid": study, "seriesInstanceUid": study + ".9", "sopInstanceUid": study + ".1", "msftSourceSystem": "ns"}
    delta.append(paths.table_uri("ImagingMetastore"), pa.Table.from_pylist([row]), SILVER_METASTORE_SCHEMA)


def test_clean_lake_passes(tmp_path: Path) -> None:
    paths = _lake(tmp_path)
    assert reconcile.silver_instances_unique(paths, DAY) == (True, {"instances": 1, "duplicate_keys": 0})
    assert reconcile.silver_instances_unique(paths)[0]


def test_a_duplicate_in_the_partitions_study_fails_its_check(tmp_path: Path) -> None:
    paths = _lake(tmp_path)
    _duplicate(paths, "1.2.1")
    assert reconcile.silver_instances_unique(paths, DAY) == (False, {"instances": 2, "duplicate_keys": 1})


def test_a_duplicate_elsewhere_is_the_other_days_finding(tmp_path: Path) -> None:
    paths = _lake(tmp_path)
    _duplicate(paths, "1.2.2")
    assert reconcile.silver_instances_unique(paths, DAY)[0]
    assert not reconcile.silver_instances_unique(paths, OTHER)[0]
    assert not reconcile.silver_instances_unique(paths)[0]  # the whole-table form still sees it
