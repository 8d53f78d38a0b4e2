"""Every Delta table's pyarrow schema, declared once (SPEC §3).

Writers cast to these schemas, Dagster metadata shows them and tests compare
against them. Column names follow Microsoft Fabric's imaging tables so queries
carry over; the OMOP tables follow the OHDSI MI-CDM column names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

#: The 30 promoted tags under Fabric's names (SPEC §3.2), in Fabric's order,
#: with the DICOM keyword each one is read from.
FABRIC_PROMOTED: tuple[tuple[str, str, pa.DataType], ...] = (
    ("studyInstanceUid", "StudyInstanceUID", pa.string()),
    ("patientName", "PatientName", pa.string()),
    ("patientSex", "PatientSex", pa.string()),
    ("patientId", "PatientID", pa.string()),
    ("patientBirthDate", "PatientBirthDate", pa.string()),
    ("accessionNumber", "AccessionNumber", pa.string()),
    ("referringPhysicianName", "ReferringPhysicianName", pa.string()),
    ("studyDate", "StudyDate", pa.string()),
    ("studyDescription", "StudyDescription", pa.string()),
    ("modalitiesInStudy", "ModalitiesInStudy", pa.list_(pa.string())),
    ("seriesInstanceUid", "SeriesInstanceUID", pa.string()),
    ("modality", "Modality", pa.string()),
    ("performedProcedureStepStartDate", "PerformedProcedureStepStartDate", pa.string()),
    ("manufacturerModelName", "ManufacturerModelName", pa.string()),
    ("sopInstanceUid", "SOPInstanceUID", pa.string()),
    ("studyTime", "StudyTime", pa.string()),
    ("timezoneOffsetFromUtc", "TimezoneOffsetFromUTC", pa.string()),
    ("numberOfStudyRelatedSeries", "NumberOfStudyRelatedSeries", pa.int64()),
    ("numberOfStudyRelatedInstances", "NumberOfStudyRelatedInstances", pa.int64()),
    ("seriesNumber", "SeriesNumber", pa.int64()),
    ("seriesDescription", "SeriesDescription", pa.string()),
    ("numberOfSeriesRelatedInstances", "NumberOfSeriesRelatedInstances", pa.int64()),
    ("bodyPartExamined", "BodyPartExamined", pa.string()),
    ("laterality", "Laterality", pa.string()),
    ("seriesDate", "SeriesDate", pa.string()),
    ("seriesTime", "SeriesTime", pa.string()),
    ("sopClassUid", "SOPClassUID", pa.string()),
    ("instanceNumber", "InstanceNumber", pa.int64()),
    ("documentTitle", "DocumentTitle", pa.string()),
    ("issuerOfPatientId", "IssuerOfPatientID", pa.string()),
)

#: Further promoted columns users ask for (SPEC §3.2).
EXTRA_PROMOTED: tuple[tuple[str, str, pa.DataType], ...] = (
    ("transferSyntaxUid", "TransferSyntaxUID", pa.string()),
    ("numberOfFrames", "NumberOfFrames", pa.int64()),
    ("rows", "Rows", pa.int64()),
    ("columns", "Columns", pa.int64()),
    ("manufacturer", "Manufacturer", pa.string()),
    ("institutionName", "InstitutionName", pa.string()),
    ("stationName", "StationName", pa.string()),
    ("imageType", "ImageType", pa.string()),
    ("issuerOfAccessionNumber", "IssuerOfAccessionNumberSequence", pa.string()),
)

PROMOTED_FIELDS: list[pa.Field] = (
    [pa.field(name, typ) for name, _kw, typ in FABRIC_PROMOTED]
    + [pa.field("modalitiesInStudy_string", pa.string())]
    + [pa.field(name, typ) for name, _kw, typ in EXTRA_PROMOTED]
)

#: Columns the pure extractor produces for one DICOM file (promoted tags,
#: the full DICOM JSON model, and content facts).
EXTRACTED_FIELDS: list[pa.Field] = PROMOTED_FIELDS + [
    pa.field("metadata_string", pa.large_string()),
    pa.field("fileSize", pa.int64()),
    pa.field("contentSha256", pa.string()),
]

#: Lineage columns the caller supplies for each file.
FILE_FIELDS: list[pa.Field] = [
    pa.field("filePath", pa.string()),
    pa.field("originalPath", pa.string()),
    pa.field("sourceModifiedAt", TS),
    pa.field("sourceSystem", pa.string()),
    pa.field("ingestDate", pa.string()),
    pa.field("createdDatetime", TS),
]

METASTORE_SCHEMA = pa.schema(EXTRACTED_FIELDS + FILE_FIELDS)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("filePath", pa.string()),
        pa.field("originalPath", pa.string()),
        pa.field("sourceSystem", pa.string()),
        pa.field("ingestDate", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("errorClass", pa.string()),
        pa.field("message", pa.string()),
        pa.field("fileSize", pa.int64()),
        pa.field("contentSha256", pa.string()),
        pa.field("detectedAt", TS),
    ]
)

#: Silver instance table: all promoted columns and tags plus Fabric lineage.
SILVER_METASTORE_SCHEMA = pa.schema(
    EXTRACTED_FIELDS
    + [
        pa.field("sourceModifiedAt", TS),
        pa.field("ingestDate", pa.string()),
        pa.field("originalPath", pa.string()),
        pa.field("imagingStudyId", pa.string()),
        pa.field("msftCreatedDatetime", TS),
        pa.field("msftModifiedDatetime", TS),
        pa.field("msftFilePath", pa.string()),
        pa.field("msftSourceSystem", pa.string()),
    ]
)

BRONZE_IMAGINGSTUDY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("resourceType", pa.string()),
        pa.field("sourceSystem", pa.string()),
        pa.field("filePath", pa.string()),
        pa.field("fhirContent", pa.large_string()),
        pa.field("lastUpdated", TS),
        pa.field("createdDatetime", TS),
        pa.field("ingestDate", pa.string()),
    ]
)

CODING = pa.struct(
    [
        pa.field("system", pa.string()),
        pa.field("code", pa.string()),
        pa.field("display", pa.string()),
    ]
)
IDENTIFIER = pa.struct(
    [
        pa.field("use", pa.string()),
        pa.field("system", pa.string()),
        pa.field("value", pa.string()),
        pa.field("type", pa.struct([pa.field("coding", pa.list_(CODING)), pa.field("text", pa.string())])),
    ]
)
REFERENCE = pa.struct(
    [
        pa.field("reference", pa.string()),
        pa.field("type", pa.string()),
        pa.field("identifier", IDENTIFIER),
        pa.field("display", pa.string()),
    ]
)
INSTANCE = pa.struct(
    [
        pa.field("uid", pa.string()),
        pa.field("sopClass", CODING),
        pa.field("number", pa.int64()),
        pa.field("title", pa.string()),
    ]
)
SERIES = pa.struct(
    [
        pa.field("uid", pa.string()),
        pa.field("number", pa.int64()),
        pa.field("modality", CODING),
        pa.field("description", pa.string()),
        pa.field("numberOfInstances", pa.int64()),
        pa.field("bodySite", CODING),
        pa.field("laterality", CODING),
        pa.field("started", pa.string()),
        pa.field("instance", pa.list_(INSTANCE)),
    ]
)

#: Complex columns of silver ImagingStudy; each is also stored as ``<name>_string`` JSON.
IMAGINGSTUDY_COMPLEX = ("identifier", "subject", "modality", "series")

SILVER_IMAGINGSTUDY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("resourceType", pa.string()),
        pa.field("identifier", pa.list_(IDENTIFIER)),
        pa.field("status", pa.string()),
        pa.field("subject", REFERENCE),
        pa.field("started", pa.string()),
        pa.field("numberOfSeries", pa.int64()),
        pa.field("numberOfInstances", pa.int64()),
        pa.field("modality", pa.list_(CODING)),
        pa.field("description", pa.string()),
        pa.field("series", pa.list_(SERIES)),
        pa.field("identifier_string", pa.string()),
        pa.field("subject_string", pa.string()),
        pa.field("modality_string", pa.string()),
        pa.field("series_string", pa.large_string()),
        pa.field("fhirContent", pa.large_string()),
        pa.field("studyInstanceUid", pa.string()),
        pa.field("lastUpdated", TS),
        pa.field("idOrig", pa.string()),
        pa.field("msftCreatedDatetime", TS),
        pa.field("msftModifiedDatetime", TS),
        pa.field("msftFilePath", pa.string()),
        pa.field("msftSourceSystem", pa.string()),
    ]
)

IMAGE_OCCURRENCE_SCHEMA = pa.schema(
    [
        pa.field("image_occurrence_id", pa.int64(), nullable=False),
        pa.field("person_id", pa.int64(), nullable=False),
        pa.field("procedure_occurrence_id", pa.int64(), nullable=False),
        pa.field("visit_occurrence_id", pa.int64()),
        pa.field("anatomic_site_concept_id", pa.int32()),
        pa.field("wadors_uri", pa.string()),
        pa.field("local_path", pa.string(), nullable=False),
        pa.field("image_occurrence_date", pa.date32(), nullable=False),
        pa.field("image_study_uid", pa.string(), nullable=False),
        pa.field("image_series_uid", pa.string(), nullable=False),
        pa.field("modality_concept_id", pa.int32(), nullable=False),
        pa.field("modality_source_value", pa.string()),
        pa.field("modality_source_concept_id", pa.int32()),
        pa.field("anatomic_site_source_value", pa.string()),
        pa.field("msftSourceRecordId", pa.string()),
        pa.field("msftSourceTableName", pa.string()),
        pa.field("msftSourceSystem", pa.string()),
        pa.field("msftModifiedDatetime", TS),
    ]
)

PROCEDURE_OCCURRENCE_SCHEMA = pa.schema(
    [
        pa.field("procedure_occurrence_id", pa.int64(), nullable=False),
        pa.field("person_id", pa.int64(), nullable=False),
        pa.field("procedure_concept_id", pa.int32(), nullable=False),
        pa.field("procedure_date", pa.date32(), nullable=False),
        pa.field("procedure_datetime", TS),
        pa.field("procedure_end_date", pa.date32()),
        pa.field("procedure_end_datetime", TS),
        pa.field("procedure_type_concept_id", pa.int32(), nullable=False),
        pa.field("modifier_concept_id", pa.int32()),
        pa.field("quantity", pa.int32()),
        pa.field("provider_id", pa.int64()),
        pa.field("visit_occurrence_id", pa.int64()),
        pa.field("visit_detail_id", pa.int64()),
        pa.field("procedure_source_value", pa.string()),
        pa.field("procedure_source_concept_id", pa.int32()),
        pa.field("modifier_source_value", pa.string()),
        pa.field("msftSourceRecordId", pa.string()),
        pa.field("msftSourceTableName", pa.string()),
        pa.field("msftSourceSystem", pa.string()),
        pa.field("msftModifiedDatetime", TS),
    ]
)

IDMAP_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("createdDatetime", TS),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "dicomimagingmetastore": METASTORE_SCHEMA,
    "dicom_failures": FAILURES_SCHEMA,
    "bronze_ImagingStudy": BRONZE_IMAGINGSTUDY_SCHEMA,
    "ImagingMetastore": SILVER_METASTORE_SCHEMA,
    "silver_ImagingStudy": SILVER_IMAGINGSTUDY_SCHEMA,
    "image_occurrence": IMAGE_OCCURRENCE_SCHEMA,
    "procedure_occurrence": PROCEDURE_OCCURRENCE_SCHEMA,
    "_idmap_image_occurrence": IDMAP_SCHEMA,
    "_idmap_person": IDMAP_SCHEMA,
    "_idmap_procedure_occurrence": IDMAP_SCHEMA,
}

#: Columns holding PHI: masked in previews, never in logs or event metadata (SPEC §6).
PHI_COLUMNS = frozenset(
    {
        "patientName",
        "patientId",
        "patientBirthDate",
        "referringPhysicianName",
        "accessionNumber",
        "issuerOfPatientId",
        "metadata_string",
        "subject",
        "subject_string",
        "fhirContent",
        "identifier",
        "identifier_string",
    }
)


def conform(table: pa.Table | Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, order and types."""
    if not isinstance(table, pa.Table):
        return pa.Table.from_pylist(list(table), schema=schema)
    if table.schema.equals(schema, check_metadata=True):
        return table
    have = dict(zip(table.column_names, table.columns, strict=True))
    cols = []
    for f in schema:
        col = have.get(f.name)
        if col is None:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            cols.append(col if col.type == f.type else col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)
