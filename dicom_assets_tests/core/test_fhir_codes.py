"""PS3.16 code tables, coded mappings and the purity of the fhir package.

Expected codes are written from the standard (PS3.16 Annex L / CID 4031, CID 244, CID 33) and
cross-checked against pydicom's PS3.16-derived concept dictionaries, not taken from our tables.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import cast

import pytest
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr._concepts_dict import concepts

from dicom_assets.fhir import codes

SCT = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@pytest.mark.parametrize(
    ("body_part", "code", "display"),
    [
        # PS3.16 Annex L Table L-1 / CID 4031 "Common Anatomic Regions" (after CP 1962).
        ("CHEST", "816094009", "Chest"),
        ("HEAD", "69536005", "Head"),
        ("ABDOMEN", "818981001", "Abdomen"),
        ("BREAST", "76752008", "Breast"),
        ("KNEE", "72696002", "Knee"),
        ("SKULL", "89546000", "Skull"),
        ("CSPINE", "122494005", "Cervical spine"),
        ("LSPINE", "122496007", "Lumbar spine"),
        ("PELVIS", "816092008", "Pelvis"),
        ("WHOLEBODY", "38266002", "Entire body"),
    ],
)
def test_body_part_examined_maps_to_ps3_16_snomed_code(body_part: str, code: str, display: str) -> None:
    assert codes.body_site_coding(body_part) == {"system": SCT, "code": code, "display": display}


def test_body_part_lookup_ignores_case_and_padding_of_the_cs_value() -> None:
    assert codes.body_site_coding(" chest ")["code"] == "816094009"  # type: ignore[index]


def test_unknown_body_part_is_kept_as_display_text() -> None:
    assert codes.body_site_coding("LEFT LITTLE TOE NAIL") == {"display": "LEFT LITTLE TOE NAIL"}
    assert codes.body_site_coding("  ") is None
    assert codes.body_site_coding(None) is None


def test_every_body_part_row_is_a_ps3_16_concept_of_its_context_group() -> None:
    sct = cast(dict[str, dict[str, tuple[str, list[int]]]], concepts["SCT"])
    by_code = {code: entries for entries in sct.values() for code in entries}
    table = codes.body_part_table()
    assert len(table) >= 40
    for term, concept in table.items():
        assert concept.code in by_code, term
        meanings = {
            meaning: cids for entries in sct.values() for c, (meaning, cids) in entries.items() if c == concept.code
        }
        assert concept.display in meanings, term
        assert int(concept.cid) in meanings[concept.display], term


@pytest.mark.parametrize(
    ("value", "code", "display"),
    [("R", "24028007", "Right"), ("L", "7771000", "Left"), ("B", "51440002", "Bilateral")],
)
def test_laterality_maps_to_cid_244(value: str, code: str, display: str) -> None:
    assert codes.laterality_coding(value) == {"system": SCT, "code": code, "display": display}
    keywords = cast(list[str], cid_concepts[244]["SCT"])
    sct_cid_244 = {c for kw in keywords for c in cast(dict[str, object], concepts["SCT"][kw])}
    assert code in sct_cid_244


def test_unpaired_or_unknown_laterality_is_not_coded() -> None:
    # PS3.3 C.7.6.2: U = "unpaired", which is not CID 244 "Unilateral".
    assert codes.laterality_coding("U") is None
    assert codes.laterality_coding("X") is None
    assert codes.laterality_coding(None) is None


@pytest.mark.parametrize(
    ("sex", "gender"),
    [
        ("M", "male"),
        ("F", "female"),
        ("O", "other"),
        ("m", "male"),
        ("X", "unknown"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_patient_sex_to_administrative_gender(sex: str | None, gender: str) -> None:
    assert codes.administrative_gender(sex) == gender


def test_modality_coding_has_dcm_system_and_cid_33_meaning() -> None:
    assert codes.modality_coding("CT") == {"system": DCM, "code": "CT", "display": "Computed Tomography"}
    assert codes.modality_coding("mr")["display"] == "Magnetic Resonance"
    assert codes.modality_coding("ZZ") == {"system": DCM, "code": "ZZ"}


def test_fhir_package_imports_neither_dagster_nor_pyspark() -> None:
    package = Path(codes.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"dagster", "pyspark"}, f"{source.name} imports {name}"
