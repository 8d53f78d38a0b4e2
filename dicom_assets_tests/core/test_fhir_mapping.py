"""Silver instance rows → FHIR R4B ImagingStudy (SPEC §5.1, §5.2).

Expected values come from the spec and the standards (identity rule computed here with hashlib,
codes from PS3.16), and for the corpus test from MANIFEST.tsv and plain pydicom.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_assets.fhir import build_imaging_study, imaging_study_id, validate_imaging_study

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.2.1125.1"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
CORPUS = Path(
    os.environ.get("DICOM_ASSETS_CORPUS", Path(__file__).resolve().parents[2].parent / "shared" / "dicom-corpus")
)


def row(series: str = "1", sop: str = "1", **overrides: Any) -> dict[str, Any]:
    """A silver ImagingMetastore row (promoted camelCase columns) of study STUDY."""
    base: dict[str, Any] = {
        "studyInstanceUid": STUDY,
        "patientName": "Doe^Jane",
        "patientId": "PID-1",
        "patientBirthDate": "1960-03-04",
        "patientSex": "F",
        "issuerOfPatientId": None,
        "accessionNumber": "ACC-9",
        "studyDate": "1974-07-10",
        "studyTime": "07:10:24",
        "timezoneOffsetFromUtc": "+0000",
        "studyDescription": "CT CHEST",
        "seriesInstanceUid": f"{STUDY}.{series}",
        "seriesNumber": int(series),
        "modality": "CT",
        "seriesDescription": f"series {series}",
        "bodyPartExamined": "CHEST",
        "laterality": None,
        "seriesDate": "1974-07-10",
        "seriesTime": "07:12:00",
        "sopInstanceUid": f"{STUDY}.{series}.{sop}",
        "sopClassUid": CT_IMAGE,
        "instanceNumber": int(sop),
        "documentTitle": None,
        "metadata_string": "{}",
        "msftSourceSystem": "ns",
    }
    base.update(overrides)
    return base


def build(rows: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    return build_imaging_study(rows, namespace="ns", last_updated=NOW, **kwargs)


def test_id_is_sha256_of_namespace_imagingstudy_uid() -> None:
    expected = hashlib.sha256(f"ns/ImagingStudy/{STUDY}".encode()).hexdigest()
    assert imaging_study_id("ns", STUDY) == expected
    assert imaging_study_id("ns", STUDY + "\x00") == expected  # UI NUL padding is not part of the UID
    assert build([row()])["id"] == expected
    with pytest.raises(ValueError):
        imaging_study_id("", STUDY)


def test_resource_follows_spec_5_2() -> None:
    resource = build([row()])
    assert resource["resourceType"] == "ImagingStudy"
    assert resource["meta"] == {"lastUpdated": "2024-01-02T03:04:05.000000Z"}
    assert resource["status"] == "available"
    study_uid, accession = resource["identifier"]
    assert study_uid == {"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}
    assert accession["value"] == "ACC-9"
    assert accession["type"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0203"
    assert accession["type"]["coding"][0]["code"] == "ACSN"
    assert resource["started"] == "1974-07-10T07:10:24+00:00"
    assert resource["modality"] == [{"system": DCM, "code": "CT", "display": "Computed Tomography"}]
    assert resource["description"] == "CT CHEST"
    [series] = resource["series"]
    assert series["bodySite"] == {"system": SCT, "code": "816094009", "display": "Chest"}
    assert series["started"] == "1974-07-10T07:12:00+00:00"
    assert series["instance"] == [
        {"uid": f"{STUDY}.1.1", "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{CT_IMAGE}"}, "number": 1}
    ]
    validate_imaging_study(resource, namespace="ns")


def test_subject_references_contained_patient_by_identifier() -> None:
    resource = build([row(issuerOfPatientId="HOSPITAL_A")])
    [patient] = resource["contained"]
    assert resource["subject"]["reference"] == "#patient"
    assert resource["subject"]["identifier"] == patient["identifier"][0]
    assert patient["identifier"][0]["value"] == "PID-1"
    # A plain-text IssuerOfPatientID is not a URI: it names the assigner.
    assert patient["identifier"][0]["assigner"] == {"display": "HOSPITAL_A"}
    assert "system" not in patient["identifier"][0]
    assert patient["name"] == [{"family": "Doe", "given": ["Jane"], "text": "Jane Doe"}]
    assert patient["birthDate"] == "1960-03-04"
    assert patient["gender"] == "female"


def test_oid_issuer_of_patient_id_becomes_the_identifier_system() -> None:
    patient = build([row(issuerOfPatientId="2.16.840.1.113883.3.1")])["contained"][0]
    assert patient["identifier"][0]["system"] == "urn:oid:2.16.840.1.113883.3.1"


def test_accession_issuer_from_issuer_of_accession_number_sequence() -> None:
    issuer = {
        "00080051": {
            "vr": "SQ",
            "Value": [
                {
                    "00400031": {"vr": "UT", "Value": ["RIS"]},
                    "00400032": {"vr": "UT", "Value": ["1.2.3.4.5"]},
                    "00400033": {"vr": "CS", "Value": ["ISO"]},
                }
            ],
        }
    }
    accession = build([row(metadata_string=json.dumps(issuer))])["identifier"][1]
    assert accession["system"] == "urn:oid:1.2.3.4.5"
    assert accession["assigner"] == {"display": "RIS"}


@pytest.mark.parametrize(
    ("sex", "gender"), [("M", "male"), ("F", "female"), ("O", "other"), ("Q", "unknown"), (None, "unknown")]
)
def test_patient_sex_maps_to_gender(sex: str | None, gender: str) -> None:
    assert build([row(patientSex=sex)])["contained"][0]["gender"] == gender


def test_japanese_name_uses_every_component_group_of_the_json_model() -> None:
    pn = {
        "00100010": {
            "vr": "PN",
            "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}],
        }
    }
    resource = build([row(patientName="Yamada^Tarou", metadata_string=json.dumps(pn, ensure_ascii=False))])
    names = resource["contained"][0]["name"]
    assert [(n["family"], n["given"][0]) for n in names] == [
        ("Yamada", "Tarou"),
        ("山田", "太郎"),
        ("やまだ", "たろう"),
    ]
    validate_imaging_study(resource)


@pytest.mark.parametrize(
    ("study_time", "offset", "started"),
    [
        ("07", "+0000", "1974-07-10T07:00:00+00:00"),
        ("0710", "+0000", "1974-07-10T07:10:00+00:00"),
        ("07:10:24", None, "1974-07-10"),
        (None, "+0000", "1974-07-10"),
    ],
)
def test_partial_times_and_missing_zone(study_time: str | None, offset: str | None, started: str) -> None:
    resource = build([row(studyTime=study_time, timezoneOffsetFromUtc=offset)])
    assert resource["started"] == started
    validate_imaging_study(resource)


def test_missing_dates_give_no_started() -> None:
    resource = build([row(studyDate=None, seriesDate=None)])
    assert "started" not in resource
    assert "started" not in resource["series"][0]
    validate_imaging_study(resource)


def test_counts_are_counted_and_duplicates_do_not_double_count() -> None:
    rows = [row("1", "1"), row("1", "2"), row("1", "2"), row("2", "1", modality="MR"), row("2", "1", modality="MR")]
    resource = build(rows)
    assert resource["numberOfSeries"] == 2
    assert resource["numberOfInstances"] == 3
    assert [s["numberOfInstances"] for s in resource["series"]] == [2, 1]
    assert [m["code"] for m in resource["modality"]] == ["CT", "MR"]
    validate_imaging_study(resource)


def test_series_and_instances_sorted_by_number_then_uid_missing_numbers_last() -> None:
    rows = [row("3", "2"), row("3", "1", instanceNumber=None), row("1", "5"), row("2", "1", seriesNumber=None)]
    resource = build(rows)
    assert [s.get("number") for s in resource["series"]] == [1, 3, None]
    assert [i.get("number") for i in resource["series"][1]["instance"]] == [2, None]


def test_body_site_laterality_and_unknown_body_part() -> None:
    rows = [
        row("1", "1", bodyPartExamined="KNEE", laterality="R"),
        row("2", "1", bodyPartExamined="SOMEWHERE ODD"),
        row("3", "1", bodyPartExamined=None),
    ]
    series = build(rows)["series"]
    assert series[0]["bodySite"]["code"] == "72696002"
    assert series[0]["laterality"] == {"system": SCT, "code": "24028007", "display": "Right"}
    assert series[1]["bodySite"] == {"display": "SOMEWHERE ODD"}
    assert "bodySite" not in series[2] and "laterality" not in series[2]


def test_image_laterality_is_used_when_series_laterality_is_absent() -> None:
    meta = json.dumps({"00200062": {"vr": "CS", "Value": ["L"]}})
    series = build([row(bodyPartExamined="BREAST", modality="MG", metadata_string=meta)])["series"][0]
    assert series["bodySite"]["code"] == "76752008"
    assert series["laterality"]["code"] == "7771000"


def test_latest_row_wins_for_descriptive_values() -> None:
    old = row("1", "1", studyDescription="OLD", msftModifiedDatetime=datetime(2020, 1, 1, tzinfo=UTC))
    new = row("1", "2", studyDescription="NEW", msftModifiedDatetime=datetime(2021, 1, 1, tzinfo=UTC))
    assert build([old, new])["description"] == "NEW"
    assert build([new, old])["description"] == "NEW"


def test_document_title_and_sop_class_fallback_to_media_storage() -> None:
    meta = json.dumps({"00020002": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.104.1"]}})
    [instance] = build([row(modality="DOC", sopClassUid=None, documentTitle="Report", metadata_string=meta)])["series"][
        0
    ]["instance"]
    assert instance["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.104.1"
    assert instance["title"] == "Report"


@pytest.mark.parametrize(
    ("rows", "field"),
    [
        ([row(), row(studyInstanceUid="9.9.9")], "studies"),
        ([row("1", "1"), row("2", "1", sopInstanceUid=f"{STUDY}.1.1")], "SeriesInstanceUID"),
        ([row(sopClassUid=None)], "SOPClassUID"),
        ([row(msftSourceSystem="elsewhere")], "msftSourceSystem"),
        ([row(imagingStudyId="0" * 64)], "imagingStudyId"),
        ([row(sopInstanceUid=None)], "SOPInstanceUID"),
    ],
)
def test_inconsistent_input_raises_naming_study_and_field(rows: list[dict[str, Any]], field: str) -> None:
    with pytest.raises(ValueError) as error:
        build(rows)
    assert field in str(error.value)
    assert STUDY in str(error.value)
    assert "Doe" not in str(error.value) and "PID-1" not in str(error.value)  # no PHI in messages


def test_disagreeing_patient_ids_resolve_to_the_most_frequent_whatever_the_order() -> None:
    rows = [row("1", "1"), row("1", "2", patientId="OTHER"), row("1", "3", patientId="OTHER")]
    for ordering in (rows, rows[::-1]):
        patient = build(ordering)["contained"][0]
        assert patient["identifier"][0]["value"] == "OTHER"


def test_empty_input_and_naive_last_updated_are_rejected() -> None:
    with pytest.raises(ValueError):
        build([])
    with pytest.raises(ValueError):
        build_imaging_study([row()], namespace="ns", last_updated=datetime(2024, 1, 1))


def test_build_is_deterministic_whatever_the_row_order() -> None:
    rows = [row("1", "1"), row("1", "2"), row("2", "1", modality="MR")]
    assert build(rows) == build(list(reversed(rows)))


# --- real files, read by plain pydicom, expectations from MANIFEST.tsv ---------------------------------


def _silver_row(path: Path) -> dict[str, Any]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return None if value is None or str(value) == "" else str(value)

    def da(keyword: str) -> str | None:
        value = text(keyword)
        return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if value and len(value) == 8 and value.isdigit() else value

    def number(keyword: str) -> int | None:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)

    sop_class = text("SOPClassUID")
    return {
        "studyInstanceUid": text("StudyInstanceUID"),
        "seriesInstanceUid": text("SeriesInstanceUID"),
        "sopInstanceUid": text("SOPInstanceUID"),
        "sopClassUid": sop_class,
        "patientName": text("PatientName"),
        "patientId": text("PatientID"),
        "patientSex": text("PatientSex"),
        "patientBirthDate": da("PatientBirthDate"),
        "accessionNumber": text("AccessionNumber"),
        "studyDate": da("StudyDate"),
        "studyTime": text("StudyTime"),
        "timezoneOffsetFromUtc": text("TimezoneOffsetFromUTC"),
        "studyDescription": text("StudyDescription"),
        "seriesNumber": number("SeriesNumber"),
        "modality": text("Modality"),
        "seriesDescription": text("SeriesDescription"),
        "bodyPartExamined": text("BodyPartExamined"),
        "laterality": text("Laterality"),
        "seriesDate": da("SeriesDate"),
        "seriesTime": text("SeriesTime"),
        "instanceNumber": number("InstanceNumber"),
        "documentTitle": text("DocumentTitle"),
        "metadata_string": "{}",
    }


@pytest.mark.skipif(not (CORPUS / "MANIFEST.tsv").exists(), reason="shared DICOM corpus not present")
@pytest.mark.parametrize(
    "study_uid",
    [
        "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",  # CT + SEG + SR + OT, one SOP in two files
        "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.1",  # MR, 11 files in 3 series
    ],
)
def test_corpus_study_counts_match_manifest(study_uid: str) -> None:
    with open(CORPUS / "MANIFEST.tsv", encoding="utf-8") as handle:
        manifest = [
            r
            for r in csv.DictReader(handle, delimiter="\t")
            if r["study_instance_uid"] == study_uid and r["valid_dicom"] == "yes" and "!" not in r["path"]
        ]
    series: dict[str, set[str]] = defaultdict(set)
    for entry in manifest:
        series[entry["series_instance_uid"]].add(entry["sop_instance_uid"])
    rows = [_silver_row(CORPUS / entry["path"]) for entry in manifest]
    resource = build_imaging_study(rows, namespace="corpus", last_updated=NOW)
    validate_imaging_study(resource, namespace="corpus")
    assert resource["numberOfSeries"] == len(series)
    assert resource["numberOfInstances"] == sum(len(sops) for sops in series.values())
    assert {s["uid"]: s["numberOfInstances"] for s in resource["series"]} == {k: len(v) for k, v in series.items()}
    assert sorted(m["code"] for m in resource["modality"]) == sorted({e["modality"] for e in manifest if e["modality"]})


def test_series_without_modality_keeps_a_data_absent_reason_and_no_study_modality() -> None:
    resource = build([row("1", "1", modality=None), row("2", "1", modality="MR")])
    assert resource["series"][0]["modality"] == {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]
    }
    assert [m["code"] for m in resource["modality"]] == ["MR"]
    validate_imaging_study(resource)
    only_absent = build([row(modality=None)])
    assert "modality" not in only_absent
    validate_imaging_study(only_absent)
