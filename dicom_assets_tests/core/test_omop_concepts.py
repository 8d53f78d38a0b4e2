"""OMOP concept resolution: shipped CSV maps and an Athena-format vocabulary (SPEC §3.5).

The vocabulary is a tiny fixture in Athena's exact download format (tab-separated CONCEPT.csv and
CONCEPT_RELATIONSHIP.csv, Athena's column order) with made-up ids 2000000xxx; it encodes a modality
the way MI-CDM's DICOM vocabulary does (vocabulary_id 'DICOM', concept_code = the Modality defined
term, a non-standard concept that 'Maps to' a standard SNOMED procedure), and SNOMED body structures
by their PS3.16 Annex L codes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom.sr._concepts_dict as pydicom_concepts
import pytest

from dicom_assets.config import Settings
from dicom_assets.omop.concepts import ConceptResolver, Vocabulary, read_body_part_map, read_modality_map

ROOT = Path(__file__).resolve().parents[2]
MODALITY_MAP = ROOT / "data" / "omop_modality_concepts.csv"
BODY_PART_MAP = ROOT / "data" / "omop_body_part_concepts.csv"
FHIR_BODY_PARTS = ROOT / "dicom_assets" / "fhir" / "data" / "body_parts.csv"

CONCEPT_HEADER = [
    "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
    "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
]  # fmt: skip
RELATIONSHIP_HEADER = [
    "concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date", "invalid_reason",
]  # fmt: skip

# Fixture ids (made up). SNOMED codes are the real ones: 77477000 "Computed tomography",
# 816094009 "Chest" (Annex L Table L-1 CHEST), 43799004 the pre-CP-1962 chest code, now mapped.
SNOMED_CT_PROCEDURE = 2000000001
SNOMED_CHEST = 2000000002
SNOMED_CHEST_OLD = 2000000003
DICOM_CT_UNMAPPED = 2000000100
DICOM_CT = 2000000101
DICOM_MR = 2000000103
LOINC_NOISE = 2000000201

CONCEPTS = [
    [SNOMED_CT_PROCEDURE, "Computed tomography", "Procedure", "SNOMED", "Procedure", "S", "77477000", "20020131", "20991231", ""],
    [SNOMED_CHEST, "Chest", "Spec Anatomic Site", "SNOMED", "Body Structure", "S", "816094009", "20200131", "20991231", ""],
    [SNOMED_CHEST_OLD, "Thoracic structure", "Spec Anatomic Site", "SNOMED", "Body Structure", "", "43799004", "20020131", "20200130", "U"],
    [DICOM_CT_UNMAPPED, "Computed Tomography", "Measurement", "DICOM", "DICOM Value Sets", "", "CT", "19930101", "20991231", ""],
    [DICOM_CT, "Computed Tomography", "Measurement", "DICOM", "DICOM Value Sets", "", "CT", "19930101", "20991231", ""],
    [DICOM_MR, "Magnetic Resonance", "Measurement", "DICOM", "DICOM Value Sets", "", "MR", "19930101", "20991231", ""],
    [LOINC_NOISE, 'A "quoted" name', "Measurement", "LOINC", "Lab Test", "S", "CT", "19700101", "20991231", ""],
    [2000000202, "Unrelated drug", "Drug", "RxNorm", "Clinical Drug", "S", "12345", "19700101", "20991231", ""],
]  # fmt: skip
RELATIONSHIPS = [
    [DICOM_CT, SNOMED_CT_PROCEDURE, "Maps to", "19700101", "20991231", ""],
    [SNOMED_CT_PROCEDURE, SNOMED_CT_PROCEDURE, "Maps to", "19700101", "20991231", ""],
    [SNOMED_CHEST_OLD, SNOMED_CHEST, "Maps to", "20200131", "20991231", ""],
    [SNOMED_CHEST, SNOMED_CHEST, "Maps to", "20200131", "20991231", ""],
    [DICOM_CT_UNMAPPED, 2000000999, "Maps to", "19700101", "20200101", "D"],  # deprecated: ignored
    [DICOM_CT, SNOMED_CHEST, "Is a", "19700101", "20991231", ""],  # not a mapping: ignored
]  # fmt: skip


def write_athena_vocabulary(folder: Path) -> Path:
    """Write the fixture as an Athena download: tab-separated, unquoted, LF (CONCEPT) / CRLF (RELATIONSHIP)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "CONCEPT.csv", "w", encoding="utf-8", newline="") as fh:
        for row in [CONCEPT_HEADER, *CONCEPTS]:
            fh.write("\t".join(map(str, row)) + "\n")
    with open(folder / "CONCEPT_RELATIONSHIP.csv", "w", encoding="utf-8", newline="") as fh:
        for row in [RELATIONSHIP_HEADER, *RELATIONSHIPS]:
            fh.write("\t".join(map(str, row)) + "\r\n")
    return folder


def write_map(path: Path, header: list[str], rows: list[list[object]]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return str(path)


@pytest.fixture
def vocabulary_dir(tmp_path: Path) -> Path:
    return write_athena_vocabulary(tmp_path / "athena")


@pytest.fixture
def shipped_with_vocabulary(vocabulary_dir: Path) -> ConceptResolver:
    return ConceptResolver.from_settings(str(MODALITY_MAP), str(BODY_PART_MAP), str(vocabulary_dir))


def test_ct_and_chest_resolve_to_the_vocabulary_ids(shipped_with_vocabulary: ConceptResolver) -> None:
    # CT: the DICOM concept with a 'Maps to' is the source concept; its target is the standard one.
    assert shipped_with_vocabulary.modality("CT") == (SNOMED_CT_PROCEDURE, DICOM_CT)
    assert shipped_with_vocabulary.modality(" ct ") == (SNOMED_CT_PROCEDURE, DICOM_CT)
    # CHEST → Annex L SCT 816094009 (shipped map) → standard SNOMED concept of the vocabulary.
    assert shipped_with_vocabulary.anatomic_site("CHEST", None) == SNOMED_CHEST
    assert shipped_with_vocabulary.anatomic_site("THORAX", None) == SNOMED_CHEST
    # A non-standard (upgraded) SNOMED code follows 'Maps to'.
    assert shipped_with_vocabulary.anatomic_site(None, "43799004") == SNOMED_CHEST


def test_vocabulary_keeps_only_what_a_resolver_can_ask_for(vocabulary_dir: Path) -> None:
    vocabulary = Vocabulary.load(vocabulary_dir, {"SNOMED": {"77477000"}})
    # Kept: 3 SNOMED (one asked for, two Spec Anatomic Site) + 3 DICOM; LOINC 'CT' and RxNorm skipped.
    assert len(vocabulary) == 6
    assert vocabulary.lookup("LOINC", "CT") is None
    assert vocabulary.lookup("RxNorm", "12345") is None


def test_duplicate_code_resolves_to_the_mapped_concept_and_deprecated_maps_are_ignored(vocabulary_dir: Path) -> None:
    # 'CT' twice in the DICOM vocabulary (as in MI-CDM's, from PS3.16 and PS3.3): the lower id has only
    # a deprecated 'Maps to', so the concept with a valid mapping is the one used.
    vocabulary = Vocabulary.load(vocabulary_dir)
    ct = vocabulary.lookup("DICOM", "CT")
    assert ct is not None and ct.concept_id == DICOM_CT
    assert vocabulary.standard_id(ct) == SNOMED_CT_PROCEDURE


def test_without_vocabulary_unknown_values_give_zero(tmp_path: Path) -> None:
    resolver = ConceptResolver.from_settings(str(MODALITY_MAP), str(BODY_PART_MAP))
    assert resolver.modality("XYZ") == (0, 0)
    assert resolver.modality(None) == (0, 0)
    assert resolver.modality("CT")[1] == 0  # no source concept without a vocabulary
    assert resolver.anatomic_site("NOT A BODY PART", None) == 0
    assert resolver.anatomic_site(None, None) == 0


def test_vocabulary_miss_falls_back_to_the_map(tmp_path: Path, vocabulary_dir: Path) -> None:
    modality = write_map(tmp_path / "m.csv", ["modality_code", "concept_id", "vocabulary_id", "concept_code", "source"],
                         [["MR", 123, "DICOM", "MR", "test"], ["US", 456, "", "", "test"]])  # fmt: skip
    body = write_map(tmp_path / "b.csv", ["body_part_examined", "snomed_code", "concept_id", "source"],
                     [["KNEE", "72696002", 789, "test"]])  # fmt: skip
    resolver = ConceptResolver.from_settings(modality, body, str(vocabulary_dir))
    # MR is in the DICOM vocabulary but maps nowhere: source concept kept, concept from the map.
    assert resolver.modality("MR") == (123, DICOM_MR)
    assert resolver.modality("US") == (456, 0)
    # KNEE's SNOMED code is not in the vocabulary: the map's concept id.
    assert resolver.anatomic_site("KNEE", None) == 789
    assert resolver.anatomic_site(None, "72696002") == 789


def test_map_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = write_map(tmp_path / "m.csv", ["modality_code", "concept_id", "vocabulary_id", "concept_code", "source"],
                    [["CT", "abc", "", "", ""]])  # fmt: skip
    with pytest.raises(ValueError, match=r"m\.csv line 2: concept_id 'abc'"):
        read_modality_map(bad)
    wrong = write_map(tmp_path / "b.csv", ["body_part", "code"], [["CHEST", "1"]])
    with pytest.raises(ValueError, match="missing column"):
        read_body_part_map(wrong)
    with pytest.raises(ValueError, match="no CONCEPT.csv"):
        Vocabulary.load(tmp_path)


def test_settings_point_at_the_shipped_maps() -> None:
    settings = Settings()
    assert Path(settings.modality_concept_map) == MODALITY_MAP
    assert Path(settings.body_part_concept_map) == BODY_PART_MAP


def _dcm_codes() -> set[str]:
    return {code for entries in pydicom_concepts.concepts["DCM"].values() for code in entries}


def _sct_meanings() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for entries in pydicom_concepts.concepts["SCT"].values():
        for code, (meaning, _cids) in entries.items():
            out.setdefault(code, set()).add(meaning)
    return out


def test_shipped_modality_map_uses_dicom_codes_and_cites_every_row() -> None:
    rows = read_modality_map(str(MODALITY_MAP))
    assert {"CT", "MR", "PT", "MG", "US", "CR", "DX", "NM", "XA"} <= set(rows)
    dcm = _dcm_codes()  # PS3.16 DCM codes as bundled by pydicom (an independent reader of the standard)
    for code, row in rows.items():
        assert code in dcm, code
        assert row.source, code
        assert (row.vocabulary_id, row.concept_code) == ("DICOM", code)  # MI-CDM DICOM vocabulary encoding
        assert row.concept_id >= 0
        assert (row.concept_id == 0) == ("no cited" in row.source), code


def test_shipped_body_part_map_uses_annex_l_snomed_codes() -> None:
    rows = read_body_part_map(str(BODY_PART_MAP))
    sct = _sct_meanings()
    for term, row in rows.items():
        assert row.snomed_code in sct, term  # a SNOMED CT code PS3.16 uses (pydicom's copy of the standard)
        assert row.source and row.concept_id == 0, term
    # Table L-1 (CP 1962): CHEST and THORAX share SCT 816094009 "Chest".
    assert rows["CHEST"].snomed_code == rows["THORAX"].snomed_code == "816094009"
    assert "Chest" in sct["816094009"]


def test_body_part_map_agrees_with_fhir_body_site_table() -> None:
    if not FHIR_BODY_PARTS.exists():
        pytest.skip("FHIR body part table not present")
    lines = [
        ln for ln in FHIR_BODY_PARTS.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")
    ]
    fhir = {r["body_part_examined"]: r["code"] for r in csv.DictReader(lines)}
    omop = {term: row.snomed_code for term, row in read_body_part_map(str(BODY_PART_MAP)).items()}
    # series.bodySite (FHIR) and anatomic_site_concept_id (OMOP) must name the same SNOMED concept.
    assert {t: c for t, c in omop.items() if t in fhir} == {t: fhir[t] for t in omop if t in fhir}
    assert set(fhir) <= set(omop)
