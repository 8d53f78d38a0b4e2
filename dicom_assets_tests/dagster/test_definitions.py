"""The one Definitions loads and wires what SPEC §3–§4 promise."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC

import dagster as dg

from dicom_assets.definitions import defs
from dicom_assets.defs.partitions import daily_partitions

EXPECTED_ASSETS = {
    "bronze/dicom_files",
    "bronze/dicomimagingmetastore",
    "silver/ImagingMetastore",
    "bronze/ImagingStudy_ndjson",
    "bronze/ImagingStudy",
    "silver/ImagingStudy",
    "gold/image_occurrence",
    "gold/procedure_occurrence",
}


def test_definitions_load_with_every_asset_partitioned_by_day() -> None:
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == EXPECTED_ASSETS
    for key in graph.get_all_asset_keys():
        assert graph.get(key).partitions_def == daily_partitions
    assert daily_partitions.fmt == "%Y/%m/%d"


def test_partition_keys_are_yyyy_mm_dd() -> None:
    from datetime import datetime

    keys = daily_partitions.get_partition_keys(current_time=datetime(2026, 1, 3, 12, tzinfo=UTC))
    assert keys[-1] == "2026/01/03"  # today's partition exists (end_offset=1)
    assert "2026/01/01" in keys


def test_sensors_schedule_and_checks_are_registered() -> None:
    repo = defs.get_repository_def()
    assert {s.name for s in repo.sensor_defs} == {"ingest_folder_sensor", "external_folder_sensor"}
    assert {s.name for s in repo.schedule_defs} == {"daily_all_assets_schedule"}
    check_names = {k.name for k in repo.asset_graph.asset_check_keys}
    assert {"metastore_files_reconcile", "imagingstudy_valid_and_counted", "image_occurrence_ids_and_keys", "idmaps_stable"} <= check_names


def test_dagster_yaml_limits_one_run_per_partition(instance: dg.DagsterInstance) -> None:
    cfg = instance.get_concurrency_config().run_queue_config
    limits = cfg.tag_concurrency_limits
    assert any(
        lim["key"] == "dagster/partition" and lim["limit"] == 1 and lim["value"] == {"applyLimitPerUniqueValue": True}
        for lim in limits
    )


def test_loading_the_definitions_imports_no_spark() -> None:
    """Every Dagster process loads the definitions; only engine=spark may pay for pyspark (~0.5 s)."""
    code = "import sys, dicom_assets.definitions; print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyspark', 'py4j', 'dagster_pyspark')))"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # engine=spark's session: test_spark_pipeline

