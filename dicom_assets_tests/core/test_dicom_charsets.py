"""Specific Character Set (0008,0005) decoding agrees with plain pydicom (PS3.5 §6.1, Annex H/I/J/K).

pydicom's bundled charset files cover ISO_IR 100/192, Greek (126), Arabic (127),
Hebrew (138), Cyrillic (144), Japanese ISO 2022 IR 13/87, Korean IR 149 and
Chinese GB18030; the shared corpus adds real-world ones. Every Person Name
(at any depth) and every text element must decode to exactly what pydicom gives.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_charset_files

from dicom_assets.dicom.extract import extract_dataset
from dicom_assets.dicom.walker import walk
from dicom_assets_tests.conftest import CORPUS
from dicom_assets_tests.core.test_dicom_reader import assert_same_as_pydicom

BUNDLED = sorted(Path(p) for p in get_charset_files("*.dcm"))


def _corpus_charset_files() -> list[Path]:
    folder = CORPUS / "pydicom" / "charset_files"
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def person_names(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """(tag path, str(PersonName)) for every PN value, depth first."""
    out: list[tuple[str, str]] = []
    for elem in ds:
        key = f"{elem.tag:08X}"
        if elem.VR == "PN" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            out.extend((key, str(v)) for v in values)
        elif elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                out.extend((f"{key}/{i}/{k}", v) for k, v in person_names(item))
    return out


def our_person_names(ds: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, el in ds.items():
        if el["vr"] == "PN":
            for v in el.get("Value", []):
                if v:
                    out.append(
                        (
                            prefix + key,
                            "=".join(v.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic") if k in v),
                        )
                    )
        elif el["vr"] == "SQ":
            for i, item in enumerate(el.get("Value", [])):
                out.extend(our_person_names(item, f"{prefix}{key}/{i}/"))
    return out


def read_both(path: Path) -> tuple[pydicom.Dataset, dict[str, Any]]:
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        ds.decode()
    model = walk(data, bulk_data_uri="x").model()
    return ds, {k: v for k, v in model.items() if not k.startswith("0002")}


def test_bundled_charset_files_cover_the_character_sets() -> None:
    charsets: set[str] = set()
    for path in BUNDLED:
        cs = pydicom.dcmread(path, specific_tags=["SpecificCharacterSet"]).get("SpecificCharacterSet")
        charsets.update([cs] if isinstance(cs, str) else list(cs or []))
    assert {
        "ISO_IR 100",
        "ISO_IR 192",
        "ISO_IR 126",
        "ISO_IR 127",
        "ISO_IR 138",
        "ISO_IR 144",
        "ISO 2022 IR 87",
        "ISO 2022 IR 13",
        "ISO 2022 IR 149",
        "GB18030",
    } <= charsets


@pytest.mark.parametrize("path", BUNDLED + _corpus_charset_files(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_person_names_equal_pydicom(path: Path) -> None:
    ds, ours = read_both(path)
    expected = person_names(ds)
    assert expected, "every charset file has a person name"
    assert our_person_names(ours) == expected


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_every_text_element_equals_pydicom(path: Path) -> None:
    ds, ours = read_both(path)
    assert_same_as_pydicom(ours, ds)


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_promoted_patient_name_is_the_alphabetic_group(path: Path) -> None:
    ds, _ = read_both(path)
    if "SOPInstanceUID" not in ds or "PatientName" not in ds:
        pytest.skip("file lacks SOP Instance UID or Patient Name")
    row = extract_dataset(path.read_bytes(), bulk_data_uri="x")
    assert row["patientName"] == (ds.PatientName.alphabetic or None)


def test_person_names_of_every_non_latin1_corpus_file_equal_pydicom(
    corpus: Path, manifest: list[dict[str, str]]
) -> None:
    rows = [
        r
        for r in manifest
        if r["valid_dicom"] == "yes"
        and "!" not in r["path"]
        and "charset:" in r["notes"]
        and "charset: ISO_IR 100;" not in r["notes"] + ";"
    ]
    assert len(rows) >= 100  # ISO_IR 192, Japanese, Korean, Chinese, Greek, Arabic, Hebrew, Cyrillic
    compared = 0
    for r in rows:
        ds, ours = read_both(corpus / r["path"])
        expected = person_names(ds)
        assert our_person_names(ours) == expected, r["path"]
        compared += bool(expected)
    assert compared >= 100
