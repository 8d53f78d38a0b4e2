"""The raw-element walker against an independent reader (plain pydicom) and PS3.5/PS3.18.

Expected values come from pydicom's own parse of the same bytes, from files
pydicom writes, or from byte layouts written here by hand from PS3.5 §7.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from dicom_assets.dicom.extract import extract_dataset
from dicom_assets.dicom.records import DicomReadError
from dicom_assets.dicom.walker import walk

BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------- helpers
def bundled(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return Path(str(path)).read_bytes()


def make_dataset(**extra: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def to_bytes(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    """Write ``ds`` as a Part 10 file with pydicom (an independent writer)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT_IMAGE)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4.5")
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element, laid out per PS3.5 §7.1.2."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}:
        return struct.pack("<HH2sHL", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def part10(body: bytes, ts: str = ExplicitVRLittleEndian) -> bytes:
    """Preamble, DICM and a minimal file meta group around ``body``."""
    tsb = ts.encode() + (b"\0" if len(ts) % 2 else b"")
    meta = element(0x00020010, "UI", tsb)
    return b"\0" * 128 + b"DICM" + element(0x00020000, "UL", struct.pack("<L", len(meta))) + meta + body


def uid_elements() -> bytes:
    return element(0x00080016, "UI", CT_IMAGE.encode() + b"\0") + element(0x00080018, "UI", b"1.2.3.4.5\0")


def model(data: bytes, **kw: Any) -> dict[str, Any]:
    row = extract_dataset(data, bulk_data_uri="lake/file.dcm", **kw)
    result: dict[str, Any] = json.loads(row["metadata_string"])
    return result


# ------------------------------------------------- comparison with pydicom's values
def _norm(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def assert_same_as_pydicom(ours: dict[str, Any], ds: Dataset, path: str = "", label: str = "") -> None:
    """Every element of ``ds`` (pydicom) appears in ``ours`` with the same VR and value.

    ``path`` is the bulk-data path of ``ds`` (``52009230/0/`` for a nested item),
    ``label`` prefixes assertion messages.
    """
    theirs = {f"{e.tag:08X}": ds[e.tag] for e in ds}
    assert set(ours) == set(theirs), f"{label}{path}"
    for key, elem in theirs.items():
        got = ours[key]
        where = f"{label}{path}{key}"
        assert got["vr"] == elem.VR, where
        if elem.VR == "SQ":
            items = got.get("Value", [])
            assert len(items) == len(elem.value), where
            for i, (a, b) in enumerate(zip(items, elem.value, strict=True)):
                assert_same_as_pydicom(a, b, f"{path}{key}/{i}/", label)
        elif elem.VR in BINARY_VRS or elem.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            if "InlineBinary" in got:
                assert base64.b64decode(got["InlineBinary"]) == elem.value, where
            elif "BulkDataURI" in got:
                assert got["BulkDataURI"].endswith(f"#{path}{key}"), where
                if not elem.is_undefined_length:
                    assert got["length"] == len(elem.value), where
            else:
                assert not elem.value, where
        elif elem.VR == "PN":
            values = elem.value if elem.VM > 1 else ([elem.value] if elem.value else [])
            expected = [str(v) for v in values]
            got_pn = [
                "=".join(p.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic") if k in p) if p else ""
                for p in got.get("Value", [])
            ]
            assert got_pn == expected, where
        else:
            value = elem.value
            values = list(value) if elem.VM > 1 else ([value] if value not in (None, "", b"") else [])
            if elem.VR == "AT":
                values = [f"{int(v):08X}" for v in values]
            assert [_norm(v) for v in got.get("Value", [])] == [_norm(v) for v in values], where


BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "image_dfl.dcm",
    "rtplan.dcm",
    "rtstruct.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "ExplVR_LitEndNoMeta.dcm",
    "SC_rgb_jpeg.dcm",
    "JPEG2000.dcm",
    "waveform_ecg.dcm",
    "test-SR.dcm",
    "reportsi_with_empty_number_tags.dcm",
    "examples_overlay.dcm",
    "nested_priv_SQ.dcm",
    "UN_sequence.dcm",
]


@pytest.mark.parametrize("name", BUNDLED)
def test_every_element_matches_pydicom(name: str) -> None:
    data = bundled(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        model = walk(data, bulk_data_uri="f").model()
        assert_same_as_pydicom({k: v for k, v in model.items() if not k.startswith("0002")}, ds)
        assert_same_as_pydicom({k: v for k, v in model.items() if k.startswith("0002")}, ds.file_meta)


# ------------------------------------------------------------ transfer syntaxes
@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_transfer_syntaxes_read_the_same_values(ts: str) -> None:
    ds = make_dataset(Rows=2, Columns=3, WindowCenter=[40, 400], ImageType=["ORIGINAL", "PRIMARY"])
    ds.ReferencedSeriesSequence = Sequence([Dataset()])
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "9.8.7"
    ds.ReferencedSeriesSequence[0].SeriesNumber = "3"
    data = to_bytes(ds, ts)
    got = model(data)
    assert got["00020010"]["Value"] == [ts]
    assert got["00280010"] == {"vr": "US", "Value": [2]}
    assert got["00281050"] == {"vr": "DS", "Value": [40.0, 400.0]}
    assert got["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]}
    assert got["00081115"]["Value"][0]["0020000E"] == {"vr": "UI", "Value": ["9.8.7"]}
    assert got["00081115"]["Value"][0]["00200011"] == {"vr": "IS", "Value": [3]}
    assert got["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert list(got) == sorted(got), "keys sorted by tag"


def test_no_preamble_and_no_meta_is_read() -> None:
    data = bundled("ExplVR_BigEndNoMeta.dcm")
    assert not data[128:132] == b"DICM"
    row = extract_dataset(data, bulk_data_uri="x")
    assert row["transferSyntaxUid"] is None
    assert row["sopInstanceUid"] == pydicom.dcmread(io.BytesIO(data), force=True).SOPInstanceUID


# ------------------------------------------------------------------ bulk data
def test_pixel_data_becomes_bulk_data_uri_with_length() -> None:
    ds = make_dataset(Rows=2, Columns=2, BitsAllocated=16, BitsStored=16, HighBit=15, PixelRepresentation=0)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00" * 4
    got = model(to_bytes(ds))
    assert got["7FE00010"] == {"vr": "OW", "BulkDataURI": "lake/file.dcm#7FE00010", "length": 8}


def test_binary_threshold_inline_vs_bulk_and_nested_path() -> None:
    item = Dataset()
    item.add_new(0x00189219, "OB", b"\x07" * 64)  # small: inline
    item.add_new(0x00189220, "OB", b"\x08" * 66)  # over threshold 64: bulk
    ds = make_dataset()
    ds.add_new(0x52009230, "SQ", Sequence([Dataset(), item]))
    got = model(to_bytes(ds), bulk_data_threshold=64)
    second = got["52009230"]["Value"][1]
    assert second["00189219"] == {"vr": "OB", "InlineBinary": base64.b64encode(b"\x07" * 64).decode()}
    assert second["00189220"] == {"vr": "OB", "BulkDataURI": "lake/file.dcm#52009230/1/00189220", "length": 66}
    assert got["52009230"]["Value"][0] == {}


def test_encapsulated_pixel_data_length_is_total_of_fragments() -> None:
    frames = [b"\xff\xd8" + b"\x11" * 98 + b"\xff\xd9", b"\xff\xd8" + b"\x22" * 200 + b"\xff\xd9"]
    ds = make_dataset(Rows=8, Columns=8, NumberOfFrames=2)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    data = to_bytes(ds, JPEGBaseline8Bit)
    got = model(data)
    fragments = sum(len(f) + (len(f) % 2) for f in frames)
    assert got["7FE00010"] == {"vr": "OB", "BulkDataURI": "lake/file.dcm#7FE00010", "length": fragments}
    row = extract_dataset(data, bulk_data_uri="x")
    assert row["numberOfFrames"] == 2


def test_private_creator_and_private_elements_are_kept() -> None:
    ds = make_dataset()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "US", 7)
    got = model(to_bytes(ds, ImplicitVRLittleEndian))
    assert got["00090010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    # Implicit VR: an unknown private element is UN (PS3.5 §6.2.2), kept as binary.
    assert got["00091001"] == {"vr": "UN", "InlineBinary": base64.b64encode(b"private text").decode()}
    assert got["00091002"]["vr"] == "UN"


def test_non_finite_floats_keep_json_strict() -> None:
    ds = make_dataset()
    ds.add_new(0x00189087, "FD", [float("nan"), float("inf"), 1.5])
    text = extract_dataset(to_bytes(ds), bulk_data_uri="x")["metadata_string"]

    def refuse(c: str) -> None:
        raise ValueError(c)

    got = json.loads(text, parse_constant=refuse)
    assert got["00189087"]["Value"] == ["NaN", "Infinity", 1.5]


def test_unparseable_numbers_are_kept_raw() -> None:
    body = uid_elements() + element(0x00200011, "IS", b"1A") + element(0x00281050, "DS", b"4O\\12")
    got = model(part10(body))
    assert got["00200011"]["Value"] == ["1A"]
    assert got["00281050"]["Value"] == ["4O", 12.0]


def test_specific_character_set_after_text_still_applies() -> None:
    # (0008,0005) placed after a text element: it governs the whole dataset.
    body = (
        uid_elements()
        + element(0x00100010, "PN", "Müller^Jörg".encode("latin-1") + b" ")
        + element(0x00080005, "CS", b"ISO_IR 100")
    )
    got = model(part10(body))
    assert got["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jörg"


# ---------------------------------------------------------------------- errors
def expect_error(data: bytes, error_class: str) -> DicomReadError:
    with pytest.raises(DicomReadError) as info:
        extract_dataset(data, bulk_data_uri="x")
    assert info.value.error_class == error_class, info.value.message
    return info.value


def test_truncated_value_is_refused_without_leaking_values() -> None:
    data = to_bytes(make_dataset(PatientID="SECRET-ID-123456", StudyDescription="CONFIDENTIAL STUDY"))
    cut = data.index(b"CONFIDENTIAL") + 4
    err = expect_error(data[:cut], "Truncated")
    assert "CONF" not in err.message and "SECRET" not in err.message and "Doe" not in err.message
    assert "(0008,1030)" in err.message


def test_end_of_data_inside_undefined_length_sequence_is_truncated() -> None:
    seq = struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + element(0x0020000E, "UI", b"1.2\0")
    expect_error(part10(uid_elements() + seq + item), "Truncated")


def test_end_of_data_inside_encapsulated_pixel_data_is_truncated() -> None:
    px = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE000, 16) + b"\x00" * 16
    expect_error(part10(uid_elements() + px + items, JPEGBaseline8Bit), "Truncated")
    ok = part10(uid_elements() + px + items + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), JPEGBaseline8Bit)
    assert json.loads(extract_dataset(ok, bulk_data_uri="x")["metadata_string"])["7FE00010"]["length"] == 16


def test_numeric_value_of_impossible_length_is_invalid() -> None:
    expect_error(part10(uid_elements() + element(0x00280010, "US", b"\x01\x02\x03")), "InvalidElement")


def test_unknown_vr_is_invalid() -> None:
    expect_error(part10(uid_elements() + element(0x00081030, "QQ", b"AB")), "InvalidElement")


@pytest.mark.parametrize("missing", ["SOPClassUID", "SOPInstanceUID"])
def test_missing_sop_uid_is_refused(missing: str) -> None:
    ds = make_dataset()
    delattr(ds, missing)
    expect_error(to_bytes(ds), "MissingUid")


def test_missing_study_and_series_uid_is_not_a_failure() -> None:
    ds = make_dataset()
    del ds.StudyInstanceUID
    del ds.SeriesInstanceUID
    row = extract_dataset(to_bytes(ds), bulk_data_uri="x")
    assert row["studyInstanceUid"] is None and row["seriesInstanceUid"] is None
    assert row["sopInstanceUid"] == "1.2.3.4.5"


def test_dicomdir_takes_sop_instance_from_file_meta() -> None:
    data = bundled("DICOMDIR") if get_testdata_file("DICOMDIR", download=False) else b""
    if not data:
        pytest.skip("DICOMDIR not bundled")
    meta = pydicom.dcmread(io.BytesIO(data)).file_meta
    row = extract_dataset(data, bulk_data_uri="x")
    assert row["sopInstanceUid"] == meta.MediaStorageSOPInstanceUID
    assert row["sopClassUid"] == "1.2.840.10008.1.3.10"


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world, not dicom\n" * 10, b"\x1f\x8b\x08\x00" + b"\0" * 300, b"PK\x03\x04" + b"\0" * 300],
)
def test_not_dicom(data: bytes) -> None:
    expect_error(data, "NotDicom")


def test_content_facts() -> None:
    import hashlib

    data = to_bytes(make_dataset(StudyInstanceUID=generate_uid()))
    row = extract_dataset(data, bulk_data_uri="x")
    assert row["fileSize"] == len(data)
    assert row["contentSha256"] == hashlib.sha256(data).hexdigest()


def test_long_decimal_strings_are_copied_as_json_numbers() -> None:
    contour = [f"{x * 0.5 - 100:.4f}" for x in range(600)]
    ds = make_dataset()
    ds.add_new(0x30060050, "DS", "\\".join(contour))  # Contour Data: thousands of numbers in practice
    ds.add_new(0x00280030, "DS", ["0.5", "0.5"])
    text = extract_dataset(to_bytes(ds), bulk_data_uri="x")["metadata_string"]
    got = json.loads(text)
    assert got["30060050"]["Value"] == [float(c) for c in contour]
    assert got["00280030"]["Value"] == [0.5, 0.5]
    assert "\ue000" not in text


# Decimal strings (PS3.5 6.2, DS) float() reads; only some are also JSON numbers (RFC 8259 section 6).
_JSON_NUMBER_SPELLINGS = st.sampled_from(["0", "-0", "12", "-3.25", "1.5e3", "2E-07", "6.02e+23", "0.000"])
_OTHER_DS_SPELLINGS = st.sampled_from([".5", "5.", "+1", "01", "-.25", "1.e5", "1e005", "00.5"])


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.one_of(_JSON_NUMBER_SPELLINGS, _OTHER_DS_SPELLINGS), st.sampled_from(["", " ", "  "]), st.sampled_from(["", " "])),
        min_size=1,
        max_size=8,
    ),
    repeat=st.integers(min_value=1, max_value=80),
)
def test_long_decimal_strings_hold_the_numbers_float_reads_in_valid_json(parts: list[tuple[str, str, str]], repeat: int) -> None:
    # Long values are copied into the JSON as written only when every part is a JSON number.
    texts = [lead + number + trail for number, lead, trail in parts] * repeat
    ds = make_dataset()
    ds.add_new(0x30060050, "DS", "\\".join(texts))
    got = json.loads(extract_dataset(to_bytes(ds), bulk_data_uri="x")["metadata_string"])
    assert got["30060050"]["Value"] == [float(t) for t in texts]


def _rich_file(ts: str) -> bytes:
    ds = make_dataset(Rows=2, Columns=2, BitsAllocated=8, PixelRepresentation=0, SeriesNumber="7")
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodeMeaning = "Brain"
    ds.AnatomicRegionSequence = Sequence([item, Dataset()])
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", "x")
    ds.PixelData = b"\x01\x02\x03\x04"
    return to_bytes(ds, ts)


_FUZZ_BASES = [_rich_file(ts) for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(range(len(_FUZZ_BASES))),
    cut=st.integers(min_value=0, max_value=2000),
    edits=st.lists(st.tuples(st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=4)), max_size=4),
)
def test_corrupt_bytes_only_ever_raise_dicom_read_error(base: int, cut: int, edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(_FUZZ_BASES[base])
    for pos, patch in edits:
        data[pos : pos + len(patch)] = patch
    data = data[: len(data) - cut] if cut < len(data) else data
    try:
        row = extract_dataset(bytes(data), bulk_data_uri="x")
    except DicomReadError as err:
        assert err.error_class in {"NotDicom", "Truncated", "InvalidElement", "MissingUid"}
        assert "Doe" not in err.message and "Brain" not in err.message
    else:
        json.loads(row["metadata_string"])


def test_deflated_dataset_that_stops_early_or_explodes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_assets.dicom.walker as walker_mod

    data = to_bytes(make_dataset(ImageComments="x" * 2000), DeflatedExplicitVRLittleEndian)
    assert model(data)["00204000"]["Value"] == ["x" * 2000]
    expect_error(data[:-40], "Truncated")
    monkeypatch.setattr(walker_mod, "MAX_INFLATED_BYTES", 1000)
    expect_error(data, "TooLarge")
