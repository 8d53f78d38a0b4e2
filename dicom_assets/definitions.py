"""The one ``Definitions``: assets, checks, sensors, schedules and resources."""

from __future__ import annotations

import dagster as dg

from dicom_assets.defs import bronze, checks, gold, silver
from dicom_assets.defs.resources import default_resources
from dicom_assets.defs.sensors import (
    all_assets_job,
    daily_all_assets_schedule,
    external_folder_sensor,
    ingest_folder_sensor,
)
from dicom_assets.lake.arrow_memory import fix_mmap_threshold, use_system_allocator

# Every Dagster process (code server, run worker, step) imports this module first.
use_system_allocator()
fix_mmap_threshold()

defs = dg.Definitions(
    assets=[
        bronze.dicom_files,
        bronze.dicomimagingmetastore,
        silver.ImagingMetastore,
        silver.imagingstudy_ndjson,
        silver.bronze_imagingstudy,
        silver.silver_imagingstudy,
        gold.omop_gold,
    ],
    asset_checks=checks.ALL_CHECKS,
    jobs=[all_assets_job],
    sensors=[ingest_folder_sensor, external_folder_sensor],
    schedules=[daily_all_assets_schedule],
    resources=default_resources(),
)
