"""Flattening to the bronze/silver ImagingStudy schemas and the content fingerprint (SPEC §3.4)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from dicom_assets.fhir import bronze_row, build_imaging_study, content_fingerprint, flatten_imaging_study
from dicom_assets.lake.schemas import BRONZE_IMAGINGSTUDY_SCHEMA, SILVER_IMAGINGSTUDY_SCHEMA

T1 = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
T2 = datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.2.1125.9"


def rows() -> list[dict[str, Any]]:
    base = {
        "studyInstanceUid": STUDY,
        "patientName": "Doe^John",
        "patientId": "P9",
        "patientSex": "M",
        "issuerOfPatientId": "CLINIC",
        "accessionNumber": "A9",
        "studyDate": "2001-02-03",
        "studyTime": "04:05:06",
        "timezoneOffsetFromUtc": "+0100",
        "modality": "MR",
        "bodyPartExamined": "KNEE",
        "laterality": "L",
        "sopClassUid": "1.2.840.10008.5.1.4.1.1.4",
    }
    return [
        {
            **base,
            "seriesInstanceUid": f"{STUDY}.{s}",
            "seriesNumber": s,
            "sopInstanceUid": f"{STUDY}.{s}.{i}",
            "instanceNumber": i,
        }
        for s in (1, 2)
        for i in (1, 2, 3)
    ]


def resource(last_updated: datetime = T1) -> dict[str, Any]:
    return build_imaging_study(rows(), namespace="ns", last_updated=last_updated)


def test_silver_row_fits_the_silver_schema_exactly() -> None:
    row = flatten_imaging_study(resource(), source_system="ns", file_path="/lake/x.ndjson", created=T1, modified=T2)
    assert list(row) == SILVER_IMAGINGSTUDY_SCHEMA.names
    table = pa.Table.from_pylist([row], schema=SILVER_IMAGINGSTUDY_SCHEMA)
    back = table.to_pylist()[0]
    assert back["studyInstanceUid"] == STUDY
    assert back["numberOfSeries"] == 2 and back["numberOfInstances"] == 6
    assert back["identifier"][1]["type"]["coding"][0]["code"] == "ACSN"
    assert back["subject"]["identifier"]["value"] == "P9"
    assert back["series"][0]["bodySite"]["code"] == "72696002"
    assert back["series"][0]["laterality"]["code"] == "7771000"
    assert [i["number"] for i in back["series"][1]["instance"]] == [1, 2, 3]
    assert back["lastUpdated"] == T1
    assert back["msftModifiedDatetime"] == T2 and back["msftCreatedDatetime"] == T1
    assert back["idOrig"] == back["id"]


def test_string_columns_hold_the_full_fhir_elements_and_fhircontent_the_resource() -> None:
    res = resource()
    row = flatten_imaging_study(res, source_system="ns", file_path="f", created=T1, modified=T1, id_orig="orig")
    assert json.loads(row["fhirContent"]) == res
    assert json.loads(row["series_string"]) == res["series"]
    assert json.loads(row["subject_string"]) == res["subject"]
    # Elements the struct has no field for survive in the JSON columns.
    assert json.loads(row["subject_string"])["identifier"]["assigner"] == {"display": "CLINIC"}
    assert row["fhirContent"] == json.dumps(res, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert row["idOrig"] == "orig"


def test_bronze_row_fits_the_bronze_schema() -> None:
    row = bronze_row(resource(), source_system="ns", file_path="f.ndjson", created=T2, ingest_date="2024/01/02")
    table = pa.Table.from_pylist([row], schema=BRONZE_IMAGINGSTUDY_SCHEMA)
    back = table.to_pylist()[0]
    assert back["resourceType"] == "ImagingStudy" and back["lastUpdated"] == T1 and back["ingestDate"] == "2024/01/02"


def test_fingerprint_ignores_last_updated_but_sees_content_changes() -> None:
    assert content_fingerprint(resource(T1)) == content_fingerprint(resource(T2))
    changed = resource(T1)
    changed["series"][0]["description"] = "new"
    assert content_fingerprint(changed) != content_fingerprint(resource(T1))
    original = resource(T1)
    content_fingerprint(original)
    assert original["meta"]["lastUpdated"]  # the input is not mutated
