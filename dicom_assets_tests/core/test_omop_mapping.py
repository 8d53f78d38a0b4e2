"""OMOP MI-CDM image_occurrence / procedure_occurrence rows from silver rows (SPEC §3.5).

Expected values come from the inputs as the standards define them (SeriesDate/StudyDate, the
PS3.18 WADO-RS series URI, the Athena fixture's ids) or from the MI-CDM definition, never from
running the mapper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from dicom_assets.lake.schemas import IMAGE_OCCURRENCE_SCHEMA, PROCEDURE_OCCURRENCE_SCHEMA
from dicom_assets.omop.concepts import ConceptResolver
from dicom_assets.omop.idmap import IdLookup, assign_ids
from dicom_assets.omop.mapping import (
    image_occurrence_rows,
    keys_for_study,
    procedure_occurrence_rows,
    series_folder,
    validate_rows,
    wadors_uri,
)
from dicom_assets_tests.core.test_omop_concepts import (
    BODY_PART_MAP,
    DICOM_CT,
    MODALITY_MAP,
    SNOMED_CHEST,
    SNOMED_CT_PROCEDURE,
    write_athena_vocabulary,
)

STUDY = "1.2.826.0.1.3680043.8.498.10"
CT_SERIES = "1.2.826.0.1.3680043.8.498.10.1"
MR_SERIES = "1.2.826.0.1.3680043.8.498.10.2"
LAKE = "/lake"
DAY = f"{LAKE}/bronze/Files/Process/Imaging/DICOM/hospital/2024/03/05"
MODIFIED = datetime(2024, 3, 5, 8, 0, tzinfo=UTC)
BASE = "https://pacs.example.org/dicom-web/"

#: MI-CDM IMAGE_OCCURRENCE isRequired = Yes (OHDSI/ImageWG OMOP_CDM_Medical_Imaging_Ex_Field_Level.csv),
#: plus local_path (required in the ImageWG model page, rmd/Approach.Rmd).
MI_CDM_REQUIRED = {
    "image_occurrence_id", "person_id", "procedure_occurrence_id", "image_occurrence_date",
    "image_study_uid", "image_series_uid", "modality_concept_id", "local_path",
}  # fmt: skip
#: OMOP CDM v5.4 PROCEDURE_OCCURRENCE required columns.
OMOP_PROCEDURE_REQUIRED = {
    "procedure_occurrence_id", "person_id", "procedure_concept_id", "procedure_date", "procedure_type_concept_id",
}  # fmt: skip


def series(uid: str, modality: str, body_site: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "uid": uid,
        "number": 1,
        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality, "display": None},
        "description": None,
        "numberOfInstances": 2,
        "bodySite": body_site,
        "laterality": None,
        "started": None,
        "instance": [],
    }


def study_row(
    *series_rows: dict[str, Any], description: str | None = "CT CHEST W/O", started: str | None = None
) -> dict[str, Any]:
    return {
        "id": "4f1c0e",
        "studyInstanceUid": STUDY,
        "started": started,
        "description": description,
        "series": list(series_rows),
        "msftSourceSystem": "hospital",
    }


def instance(folder: str, n: int, modality: str, **tags: Any) -> dict[str, Any]:
    row = {
        "patientId": "PAT-0001",
        "issuerOfPatientId": "HOSPITAL_A",
        "studyDate": "2024-03-01",
        "studyTime": "10:30:00",
        "timezoneOffsetFromUtc": None,
        "seriesDate": None,
        "performedProcedureStepStartDate": None,
        "bodyPartExamined": None,
        "modality": modality,
        "studyDescription": "CT CHEST W/O",
        "msftFilePath": f"{DAY}/{folder}/1700000000.{n}_IM{n}.dcm.zip",
        "msftSourceSystem": "hospital",
    }
    row.update(tags)
    return row


def default_case() -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    chest = {"system": "http://snomed.info/sct", "code": "816094009", "display": "Chest"}
    study = study_row(series(CT_SERIES, "CT", chest), series(MR_SERIES, "MR"))
    instances = {
        CT_SERIES: [instance("ct", n, "CT", seriesDate="2024-03-02", bodyPartExamined="CHEST") for n in (1, 2)],
        MR_SERIES: [instance("mr/sub", 3, "MR"), instance("mr/other", 4, "MR")],
    }
    return study, instances


def ids_for(study: Mapping[str, Any], instances: Mapping[str, Sequence[Mapping[str, Any]]]) -> IdLookup:
    keys = keys_for_study(study, instances)
    return IdLookup(
        image_occurrence=assign_ids({}, keys.image_occurrence.values()),
        person=assign_ids({}, [keys.person]),
        procedure_occurrence=assign_ids({}, [keys.procedure_occurrence]),
    )


def occurrences(study: Mapping[str, Any], instances: Mapping[str, Sequence[Mapping[str, Any]]],
                resolver: ConceptResolver | None = None, base: str = BASE) -> dict[str, dict[str, Any]]:  # fmt: skip
    resolver = resolver or ConceptResolver.from_settings(str(MODALITY_MAP), str(BODY_PART_MAP))
    rows = image_occurrence_rows(study, instances, ids=ids_for(study, instances), concepts=resolver,
                                 dicomweb_base_url=base, lake_root=LAKE, modified=MODIFIED)  # fmt: skip
    pa.Table.from_pylist(rows, schema=IMAGE_OCCURRENCE_SCHEMA)  # every value has the column's type
    return {r["image_series_uid"]: r for r in rows}


def test_ct_chest_series_with_athena_vocabulary(tmp_path: Path) -> None:
    resolver = ConceptResolver.from_settings(str(MODALITY_MAP), str(BODY_PART_MAP),
                                             str(write_athena_vocabulary(tmp_path / "athena")))  # fmt: skip
    study, instances = default_case()
    row = occurrences(study, instances, resolver)[CT_SERIES]
    assert row["modality_concept_id"] == SNOMED_CT_PROCEDURE
    assert row["modality_source_concept_id"] == DICOM_CT
    assert row["modality_source_value"] == "CT"
    assert row["anatomic_site_concept_id"] == SNOMED_CHEST
    assert row["anatomic_site_source_value"] == "CHEST"
    assert row["image_study_uid"] == STUDY and row["image_series_uid"] == CT_SERIES
    assert row["image_occurrence_date"] == date(2024, 3, 2)  # SeriesDate (0008,0021)
    assert row["visit_occurrence_id"] is None
    assert row["local_path"] == f"{DAY}/ct"
    assert row["msftSourceRecordId"] == "4f1c0e" and row["msftSourceTableName"] == "ImagingStudy"
    assert row["msftSourceSystem"] == "hospital" and row["msftModifiedDatetime"] == MODIFIED


def test_series_without_series_date_takes_the_study_date() -> None:
    study, instances = default_case()
    row = occurrences(study, instances)[MR_SERIES]
    assert row["image_occurrence_date"] == date(2024, 3, 1)  # StudyDate (0008,0020)
    assert row["local_path"] == f"{DAY}/mr"  # common parent of mr/sub and mr/other


def test_unknown_values_give_zero_and_keep_the_source_value() -> None:
    odd = study_row(series(CT_SERIES, "XYZ"))
    instances = {CT_SERIES: [instance("x", 1, "XYZ", bodyPartExamined="Left little toe")]}
    row = occurrences(odd, instances)[CT_SERIES]
    assert (row["modality_concept_id"], row["modality_source_concept_id"]) == (0, 0)
    assert row["modality_source_value"] == "XYZ"
    assert row["anatomic_site_concept_id"] == 0
    assert row["anatomic_site_source_value"] == "Left little toe"


def test_wadors_uri_is_the_ps318_series_resource() -> None:
    study, instances = default_case()
    assert occurrences(study, instances)[CT_SERIES]["wadors_uri"] == (
        f"https://pacs.example.org/dicom-web/studies/{STUDY}/series/{CT_SERIES}"
    )
    assert occurrences(study, instances, base="")[CT_SERIES]["wadors_uri"] is None
    assert wadors_uri("http://h/wado", "1.2", "1.2.3") == "http://h/wado/studies/1.2/series/1.2.3"


def test_date_falls_back_to_started_then_to_the_earliest_known_date() -> None:
    study = study_row(series(CT_SERIES, "CT"), series(MR_SERIES, "MR"), started="2023-12-31T09:00:00+01:00")
    no_dates = {"studyDate": None, "seriesDate": None}
    instances = {CT_SERIES: [instance("ct", 1, "CT", **no_dates)], MR_SERIES: [instance("mr", 2, "MR", **no_dates)]}
    assert occurrences(study, instances)[CT_SERIES]["image_occurrence_date"] == date(2023, 12, 31)
    study["started"] = None
    instances[MR_SERIES] = [instance("mr", 2, "MR", studyDate=None, seriesDate="2023-11-05")]
    instances[CT_SERIES] = [instance("ct", 1, "CT", studyDate=None, performedProcedureStepStartDate="20231104")]
    assert occurrences(study, instances)[CT_SERIES]["image_occurrence_date"] == date(2023, 11, 4)


def test_no_date_at_all_raises_naming_the_series() -> None:
    study = study_row(series(CT_SERIES, "CT"))
    instances = {CT_SERIES: [instance("ct", 1, "CT", studyDate="not a date", seriesDate="")]}
    with pytest.raises(ValueError, match=f"series {CT_SERIES}.*image_occurrence_date"):
        occurrences(study, instances)


def test_series_without_files_raises_for_local_path() -> None:
    study = study_row(series(CT_SERIES, "CT"), series(MR_SERIES, "MR"))
    instances = {CT_SERIES: [instance("ct", 1, "CT")]}
    with pytest.raises(ValueError, match=f"series {MR_SERIES}.*local_path"):
        occurrences(study, instances)


def test_mapping_twice_gives_identical_rows() -> None:
    study, instances = default_case()
    assert occurrences(study, instances) == occurrences(study, instances)


def test_mi_cdm_required_columns_are_non_nullable() -> None:
    schema_required = {f.name for f in IMAGE_OCCURRENCE_SCHEMA if not f.nullable}
    assert MI_CDM_REQUIRED <= schema_required
    assert OMOP_PROCEDURE_REQUIRED <= {f.name for f in PROCEDURE_OCCURRENCE_SCHEMA if not f.nullable}


def test_validate_rows_names_row_and_column() -> None:
    study, instances = default_case()
    row = dict(occurrences(study, instances)[CT_SERIES])
    row["person_id"] = None
    with pytest.raises(ValueError, match=f"image_series_uid={CT_SERIES}: required column person_id is null"):
        validate_rows([row], IMAGE_OCCURRENCE_SCHEMA)
    del row["person_id"]
    with pytest.raises(ValueError, match=r"missing \['person_id'\]"):
        validate_rows([row], IMAGE_OCCURRENCE_SCHEMA)


def test_procedure_occurrence_row() -> None:
    study, instances = default_case()
    for rows in instances.values():
        for r in rows:
            r["timezoneOffsetFromUtc"] = "+0100"
    ids = ids_for(study, instances)
    [row] = procedure_occurrence_rows(study, instances, ids=ids, modified=MODIFIED)
    pa.Table.from_pylist([row], schema=PROCEDURE_OCCURRENCE_SCHEMA)
    assert row["procedure_date"] == date(2024, 3, 1)
    assert row["procedure_datetime"] == datetime(2024, 3, 1, 9, 30, tzinfo=UTC)  # 10:30 at UTC+01:00
    assert row["procedure_type_concept_id"] == 32817  # OMOP Type Concept "EHR"
    assert row["procedure_concept_id"] == 0
    assert row["procedure_source_value"] == "CT CHEST W/O"
    image_rows = occurrences(study, instances)
    assert {r["procedure_occurrence_id"] for r in image_rows.values()} == {row["procedure_occurrence_id"]}
    assert {r["person_id"] for r in image_rows.values()} == {row["person_id"]}
    mapped = procedure_occurrence_rows(study, instances, ids=ids, modified=MODIFIED,
                                       procedure_concepts={"CT CHEST W/O": 2000000301})  # fmt: skip
    assert mapped[0]["procedure_concept_id"] == 2000000301


def test_procedure_source_value_falls_back_to_modalities() -> None:
    study, instances = default_case()
    study["description"] = None
    for rows in instances.values():
        for r in rows:
            r["studyDescription"] = None
    [row] = procedure_occurrence_rows(study, instances, ids=ids_for(study, instances), modified=MODIFIED)
    assert row["procedure_source_value"] == "CT,MR"


def test_patients_and_anonymous_studies_get_their_own_persons() -> None:
    study, instances = default_case()
    other_study = dict(study, studyInstanceUid="1.2.3.4.5")
    assert keys_for_study(study, instances).person == keys_for_study(other_study, instances).person
    anonymous = {uid: [dict(r, patientId="  ") for r in rows] for uid, rows in instances.items()}
    assert keys_for_study(study, anonymous).person != keys_for_study(other_study, anonymous).person


def test_series_folder_handles_relative_paths_and_uris() -> None:
    assert series_folder(["a/b/1.dcm", "a/b/c/2.dcm"], "/lake") == "/lake/a/b"
    assert series_folder(["abfss://fs@acct/x/y/1.dcm", "abfss://fs@acct/x/z/2.dcm"], "") == "abfss://fs@acct/x"
    assert series_folder([None, ""], "/lake") is None
    with pytest.raises(ValueError, match="storage roots"):
        series_folder(["abfss://a@b/x/1.dcm", "/local/x/2.dcm"], "")


def test_naive_modified_time_is_refused() -> None:
    study, instances = default_case()
    with pytest.raises(ValueError, match="timezone-aware"):
        procedure_occurrence_rows(study, instances, ids=ids_for(study, instances), modified=datetime(2024, 1, 1))
