"""Person Name (PN, PS3.5 §6.2.1) → FHIR HumanName, including multi-byte character sets."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from dicom_assets.fhir.names import human_names, split_person_name

EN_REP = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
CORPUS = Path(
    os.environ.get("DICOM_ASSETS_CORPUS", Path(__file__).resolve().parents[2].parent / "shared" / "dicom-corpus")
)


def _rep(name: dict) -> str:
    return name["extension"][0]["valueCode"]


def test_ps3_5_japanese_example_gives_one_name_per_component_group() -> None:
    # PS3.5 Annex H example value (ISO 2022 IR 87): alphabetic, ideographic, phonetic groups.
    names = human_names("Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert [(_rep(n), n["family"], n["given"]) for n in names] == [
        ("ABC", "Yamada", ["Tarou"]),
        ("IDE", "山田", ["太郎"]),
        ("SYL", "やまだ", ["たろう"]),
    ]
    assert names[0]["text"] == "Tarou Yamada"
    assert names[1]["text"] == "山田 太郎"
    assert all(n["extension"][0]["url"] == EN_REP for n in names)


def test_dicom_json_model_pn_object_is_read_like_the_string_form() -> None:
    as_json = {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    assert human_names(as_json) == human_names("Yamada^Tarou=山田^太郎=やまだ^たろう")


def test_all_five_components_map_to_humanname_parts() -> None:
    # PS3.5 §6.2.1.1 example: "Rev. John Robert Quincy Adams, B.A. M.Div." =
    # family ^ given ^ middle ^ prefix ^ suffix.
    [name] = human_names("Adams^John Robert Quincy^^Rev.^B.A. M.Div.")
    assert name == {
        "family": "Adams",
        "given": ["John Robert Quincy"],
        "prefix": ["Rev."],
        "suffix": ["B.A. M.Div."],
        "text": "Rev. John Robert Quincy Adams B.A. M.Div.",
    }
    [with_middle] = human_names("Smith^John^Paul")
    assert with_middle["given"] == ["John", "Paul"]


def test_single_group_has_no_representation_extension_and_empty_parts_are_dropped() -> None:
    assert human_names("Wang^XiaoDong") == [{"family": "Wang", "given": ["XiaoDong"], "text": "XiaoDong Wang"}]
    assert human_names("^^^^") == []
    assert human_names("") == []
    assert human_names(None) == []


def test_ideographic_only_name_keeps_its_group() -> None:
    # Alphabetic group empty (PS3.5 allows omitting any group): "=山田^太郎".
    names = human_names("=山田^太郎")
    assert len(names) == 1 and names[0]["family"] == "山田"
    assert split_person_name("=山田^太郎").keys() == {"Ideographic"}


@pytest.mark.skipif(not (CORPUS / "MANIFEST.tsv").exists(), reason="shared DICOM corpus not present")
def test_iso_2022_ir_87_file_decoded_by_pydicom_maps_to_the_three_names() -> None:
    dataset = pydicom.dcmread(CORPUS / "pydicom/charset_files/chrH31.dcm", stop_before_pixels=True)
    pn_json = dataset.to_json_dict()["00100010"]["Value"][0]
    names = human_names(pn_json)
    assert [(n.get("family"), n.get("given")) for n in names] == [
        ("Yamada", ["Tarou"]),
        ("山田", ["太郎"]),
        ("やまだ", ["たろう"]),
    ]
