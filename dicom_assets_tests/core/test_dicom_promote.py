"""Promoted columns (SPEC §3.2): tag → column, PS3.5 value formats → Fabric's normalised forms."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_assets.dicom.extract import extract_dataset
from dicom_assets.dicom.promote import format_da, format_tm
from dicom_assets.lake.schemas import EXTRACTED_FIELDS


def file_bytes(ts: str = ExplicitVRLittleEndian, **attrs: Any) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def row_for(**attrs: Any) -> dict[str, Any]:
    return extract_dataset(file_bytes(**attrs), bulk_data_uri="x")


# PS3.5 §6.2 Table 6.2-1 DA/TM examples → ISO forms.
@pytest.mark.parametrize(
    ("da", "expected"),
    [
        ("19930822", "1993-08-22"),
        ("1993.08.22", "1993-08-22"),
        ("19931322", "19931322"),
        ("unknown", "unknown"),
        ("", ""),
    ],
)
def test_da(da: str, expected: str) -> None:
    assert format_da(da) == expected


@pytest.mark.parametrize(
    ("tm", "expected"),
    [
        ("070907.0705", "07:09:07.0705"),
        ("1010", "10:10:00"),
        ("021", "021"),
        ("10", "10:00:00"),
        ("235960", "23:59:60"),
        ("120000.123456", "12:00:00.123456"),
        ("12:30:15", "12:30:15"),
        ("250000", "250000"),
        ("1200xx", "1200xx"),
    ],
)
def test_tm(tm: str, expected: str) -> None:
    assert format_tm(tm) == expected


def test_every_extracted_column_is_present() -> None:
    row = row_for(StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3")
    assert set(row) == {f.name for f in EXTRACTED_FIELDS}


def test_fabric_columns_from_their_tags() -> None:
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    row = row_for(
        StudyInstanceUID="1.2.840.1",
        SeriesInstanceUID="1.2.840.1.2",
        PatientName="Yamada^Tarou=山田^太郎",
        SpecificCharacterSet=["ISO 2022 IR 6", "ISO 2022 IR 87"],
        PatientSex="F",
        PatientID="PID7",
        IssuerOfPatientID="HOSP",
        PatientBirthDate="19700102",
        AccessionNumber="ACC1",
        IssuerOfAccessionNumberSequence=Sequence([issuer]),
        ReferringPhysicianName="Ref^Doc",
        StudyDate="20240131",
        StudyTime="0930",
        TimezoneOffsetFromUTC="+0100",
        StudyDescription="Brain",
        ModalitiesInStudy=["MR", "SR"],
        Modality="MR",
        PerformedProcedureStepStartDate="20240131",
        ManufacturerModelName="Scanner X",
        Manufacturer="ACME",
        InstitutionName="General",
        StationName="MR1",
        NumberOfStudyRelatedSeries="3",
        NumberOfStudyRelatedInstances="120",
        SeriesNumber="4",
        SeriesDescription="T1",
        NumberOfSeriesRelatedInstances="40",
        BodyPartExamined="HEAD",
        Laterality="R",
        SeriesDate="20240131",
        SeriesTime="093512.5",
        InstanceNumber="17",
        DocumentTitle="Report",
        Rows=256,
        Columns=192,
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    )
    assert row["patientName"] == "Yamada^Tarou"
    assert row["referringPhysicianName"] == "Ref^Doc"
    assert row["patientBirthDate"] == "1970-01-02"
    assert row["studyDate"] == row["seriesDate"] == row["performedProcedureStepStartDate"] == "2024-01-31"
    assert row["studyTime"] == "09:30:00"
    assert row["seriesTime"] == "09:35:12.5"
    assert row["timezoneOffsetFromUtc"] == "+0100"
    assert row["modalitiesInStudy"] == ["MR", "SR"]
    assert json.loads(row["modalitiesInStudy_string"]) == ["MR", "SR"]
    assert (row["numberOfStudyRelatedSeries"], row["numberOfStudyRelatedInstances"]) == (3, 120)
    assert (row["seriesNumber"], row["numberOfSeriesRelatedInstances"], row["instanceNumber"]) == (4, 40, 17)
    assert (row["rows"], row["columns"]) == (256, 192)
    assert row["imageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert row["issuerOfAccessionNumber"] == "RIS-A"
    assert row["issuerOfPatientId"] == "HOSP"
    assert row["transferSyntaxUid"] == ExplicitVRLittleEndian
    assert row["sopClassUid"] == "1.2.840.10008.5.1.4.1.1.4"
    assert row["numberOfFrames"] == 0  # no Pixel Data, no (0028,0008)
    for col, value in {
        "patientSex": "F",
        "patientId": "PID7",
        "accessionNumber": "ACC1",
        "studyDescription": "Brain",
        "modality": "MR",
        "manufacturerModelName": "Scanner X",
        "manufacturer": "ACME",
        "institutionName": "General",
        "stationName": "MR1",
        "seriesDescription": "T1",
        "bodyPartExamined": "HEAD",
        "laterality": "R",
        "documentTitle": "Report",
    }.items():
        assert row[col] == value, col


def test_universal_entity_id_when_no_local_namespace() -> None:
    issuer = Dataset()
    issuer.UniversalEntityID = "2.16.840.1.999"
    issuer.UniversalEntityIDType = "ISO"
    assert row_for(IssuerOfAccessionNumberSequence=Sequence([issuer]))["issuerOfAccessionNumber"] == "2.16.840.1.999"


def test_bad_values_are_kept_raw_or_null_never_a_crash() -> None:
    data = file_bytes(ImplicitVRLittleEndian, StudyDate="20241345", StudyTime="2501", SeriesNumber="98765")
    # pydicom refuses to write an invalid IS, so corrupt the written bytes in place.
    data = data.replace(b"98765", b"9876A")
    row = extract_dataset(data, bulk_data_uri="x")
    assert row["studyDate"] == "20241345"
    assert row["studyTime"] == "2501"
    assert row["seriesNumber"] is None


def test_absent_tags_are_null() -> None:
    row = row_for()
    for col in (
        "patientName",
        "studyInstanceUid",
        "studyDate",
        "modalitiesInStudy",
        "modalitiesInStudy_string",
        "seriesNumber",
        "issuerOfAccessionNumber",
        "imageType",
    ):
        assert row[col] is None, col


PIXELS = {"BitsAllocated": 8, "Rows": 1, "Columns": 2, "PixelData": b"\0\0"}


@pytest.mark.parametrize(
    ("attrs", "frames"),
    [({"NumberOfFrames": "5"}, 5), (PIXELS, 1), ({"NumberOfFrames": "12345", **PIXELS}, 1), ({}, 0)],
)
def test_number_of_frames_rule(attrs: dict[str, Any], frames: int) -> None:
    data = file_bytes(**attrs).replace(b"12345", b"1234A")  # an unreadable (0028,0008)
    assert extract_dataset(data, bulk_data_uri="x")["numberOfFrames"] == frames
