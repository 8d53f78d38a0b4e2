"""Pure FHIR R4B ``ImagingStudy`` mapping (SPEC §3.4, §5): no dagster, no pyspark.

Silver instance rows of one study → :func:`build_imaging_study` → :func:`validate_imaging_study`
→ :func:`write_ndjson` (bronze files), :func:`bronze_row` (bronze table) and
:func:`flatten_imaging_study` (silver table); :func:`content_fingerprint` tells whether a
rebuilt resource really changed. PS3.16 code tables are package data (``fhir/data/*.csv``).
"""

from __future__ import annotations

from dicom_assets.fhir.flatten import (
    bronze_row,
    canonical_json,
    content_fingerprint,
    flatten_imaging_study,
)
from dicom_assets.fhir.identity import imaging_study_id
from dicom_assets.fhir.mapping import build_imaging_study
from dicom_assets.fhir.ndjson import write_ndjson
from dicom_assets.fhir.validate import imaging_study_errors, validate_imaging_study

__all__ = [
    "bronze_row",
    "build_imaging_study",
    "canonical_json",
    "content_fingerprint",
    "flatten_imaging_study",
    "imaging_study_errors",
    "imaging_study_id",
    "validate_imaging_study",
    "write_ndjson",
]
