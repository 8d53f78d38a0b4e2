"""The settings resource (SPEC §9): the pure :class:`~dicom_assets.config.Settings` as Dagster config.

Every field defaults to ``None`` meaning "take ``DICOM_ASSETS_<FIELD>`` from the
environment, else the built-in default", so the same definitions serve a
laptop, CI and a cluster, and any field can be overridden per run in the
launchpad.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from dicom_assets.config import Settings
from dicom_assets.lake.paths import LakePaths


class DicomAssetsSettings(dg.ConfigurableResource):
    """Lake location, limits and engine choice; ``None`` = environment or default."""

    lake: str | None = Field(default=None, description="Lake root folder (env DICOM_ASSETS_LAKE).")
    namespaces: str | None = Field(default=None, description="Comma-separated namespaces to scan; empty = all.")
    compression_enabled: bool | None = Field(default=None, description="Zip .dcm files after a successful read.")
    settle_seconds: float | None = Field(default=None, description="A file must be unchanged this long before it is taken.")
    bulk_data_threshold: int | None = Field(default=None, description="Binary values over this many bytes become BulkDataURI stubs.")
    batch_size: int | None = Field(default=None, description="Files per worker call.")
    workers: int | None = Field(default=None, description="Worker processes (0 = one per core).")
    engine: str | None = Field(default=None, description="Extraction engine: local or spark.")
    spark_master: str | None = Field(default=None, description="Spark master URL for engine=spark.")
    max_file_bytes: int | None = None
    max_zip_bytes: int | None = None
    max_zip_uncompressed_bytes: int | None = None
    max_zip_ratio: float | None = None
    modality_concept_map: str | None = None
    body_part_concept_map: str | None = None
    omop_vocabulary_dir: str | None = Field(default=None, description="Folder with Athena CONCEPT.csv and CONCEPT_RELATIONSHIP.csv.")
    dicomweb_base_url: str | None = Field(default=None, description="DICOMweb base URL for image_occurrence.wadors_uri.")

    def to_settings(self) -> Settings:
        overrides: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "namespaces":
                value = tuple(x.strip() for x in str(value).split(",") if x.strip())
            overrides[name] = value
        return Settings.from_env(**overrides)

    def paths(self) -> LakePaths:
        return LakePaths.of(self.to_settings().lake)
