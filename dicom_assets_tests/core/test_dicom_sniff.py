"""looks_like_dicom: DICOM by content, whatever the file name (SPEC §2)."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_assets.dicom.sniff import SNIFF_BYTES, looks_like_dicom


def head_of(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not bundled")
    return Path(str(path)).read_bytes()[:SNIFF_BYTES]


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # preamble + DICM
        "ExplVR_BigEndNoMeta.dcm",  # bare dataset, explicit VR big endian
        "ExplVR_LitEndNoMeta.dcm",  # bare dataset, explicit VR little endian
        "rtstruct.dcm",  # bare dataset, implicit VR little endian
    ],
)
def test_dicom_files_are_recognised(name: str) -> None:
    assert looks_like_dicom(head_of(name))


def test_preamble_less_file_meta_is_recognised() -> None:
    data = head_of("CT_small.dcm")
    assert looks_like_dicom(data[132:])  # starts at (0002,0000) UL


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.dcm", b"\0" * 200)
    return buf.getvalue()


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"DICM",
        b"This is a README for the study export.\n" * 5,
        b"%PDF-1.7\n" + b"\0" * 200,
        gzip.compress(b"\0" * 300, mtime=0),
        _zip(),
        b"\x20\x08\x00\x05\x00CS\x0a\x00ISO_IR 100",  # a dataset shifted by one byte (pydicom's no_meta.dcm)
        b"\x08\x00\x05\x00" + b"\xff\xff\xff\x7f" + b"\0" * 40,  # implicit tag with an absurd length
    ],
)
def test_other_content_is_not_dicom(head: bytes) -> None:
    assert not looks_like_dicom(head)


def test_dicm_prefix_alone_decides() -> None:
    assert looks_like_dicom(b"\0" * 128 + b"DICM")
