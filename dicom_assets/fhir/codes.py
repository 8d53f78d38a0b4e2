"""Coded values for ImagingStudy: code systems, PS3.16 tables (shipped as CSV data) and gender.

The tables live in ``dicom_assets/fhir/data/*.csv`` with their sources in each file's header:

* ``body_parts.csv``: PS3.16 Annex L Table L-1, Body Part Examined (0018,0015) → SNOMED CT code
  of CID 4031 "Common Anatomic Regions" (a few organs from CID 4 / CID 4030).
* ``laterality.csv``: Laterality (0020,0060) / Image Laterality (0020,0062) → CID 244 "Laterality".
* ``modalities.csv``: Modality (0008,0060) → CID 33 "Modality" meaning (display text only).

Nothing is computed at import time: tables load on first use and are cached.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

#: DICOM Controlled Terminology (PS3.16 §8), the FHIR system for Modality codes.
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
#: Study Instance UID identifier system (FHIR R4B ImagingStudy.identifier notes).
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: System of ``series.instance.sopClass`` (a URI: ``urn:oid:<SOP Class UID>``).
URI_SYSTEM = "urn:ietf:rfc:3986"
V2_0203_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
#: FHIR extension stating why a required element has no value (used for a series without Modality).
DATA_ABSENT_REASON_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
#: FHIR extension marking a HumanName as alphabetic (ABC), ideographic (IDE) or syllabic (SYL).
EN_REPRESENTATION_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"

#: ImagingStudy.status value set (FHIR R4B, required binding).
IMAGING_STUDY_STATUSES = frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"})
#: Patient.gender value set AdministrativeGender (FHIR R4B, required binding).
ADMINISTRATIVE_GENDERS = frozenset({"male", "female", "other", "unknown"})

#: Patient's Sex (0010,0040) enumerated values (PS3.3 C.7.1.1) → AdministrativeGender.
_SEX_TO_GENDER = {"M": "male", "F": "female", "O": "other"}


@dataclass(frozen=True)
class Concept:
    """One coded concept of a table: code, display and the PS3.16 context group it is listed in."""

    code: str
    display: str
    cid: str = ""


def _read_table(name: str) -> list[dict[str, str]]:
    text = resources.files("dicom_assets.fhir").joinpath("data", name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


@cache
def body_part_table() -> dict[str, Concept]:
    """Body Part Examined defined term → SNOMED CT concept (PS3.16 Annex L, CID 4031)."""
    return {
        row["body_part_examined"]: Concept(row["code"], row["display"], row["cid"])
        for row in _read_table("body_parts.csv")
    }


@cache
def laterality_table() -> dict[str, Concept]:
    """Laterality value (R, L, B) → SNOMED CT concept of CID 244."""
    return {row["dicom_value"]: Concept(row["code"], row["display"], "244") for row in _read_table("laterality.csv")}


@cache
def modality_table() -> dict[str, str]:
    """Modality code → CID 33 code meaning."""
    return {row["code"]: row["display"] for row in _read_table("modalities.csv")}


@cache
def snomed_codes() -> frozenset[str]:
    """Every SNOMED CT code our tables can emit (for validation)."""
    return frozenset(c.code for c in body_part_table().values()) | frozenset(
        c.code for c in laterality_table().values()
    )


def normalise_body_part(value: str | None) -> str | None:
    """Body Part Examined as a lookup key: trimmed, upper case (CS values are upper case, PS3.5 §6.2)."""
    if value is None:
        return None
    key = value.strip().upper()
    return key or None


def body_site_coding(body_part_examined: str | None) -> dict[str, Any] | None:
    """Body Part Examined (0018,0015) → ``series.bodySite`` Coding (R4B: a Coding, not a CodeableConcept).

    A term of PS3.16 Annex L gives ``{system: SNOMED CT, code, display}``; any other value is
    kept as ``{display: <value as recorded>}`` so the information is not lost; empty → ``None``.
    """
    key = normalise_body_part(body_part_examined)
    if key is None or body_part_examined is None:
        return None
    concept = body_part_table().get(key)
    if concept is None:
        return {"display": body_part_examined.strip()}
    return {"system": SNOMED_SYSTEM, "code": concept.code, "display": concept.display}


def laterality_coding(laterality: str | None) -> dict[str, Any] | None:
    """Laterality (0020,0060) or Image Laterality (0020,0062) → ``series.laterality`` (CID 244).

    R, L and B are coded; U ("unpaired", PS3.3 C.7.6.2) and unknown values give ``None``:
    an unpaired part has no laterality, and CID 244 "Unilateral" would be wrong for it.
    """
    if laterality is None:
        return None
    concept = laterality_table().get(laterality.strip().upper())
    if concept is None:
        return None
    return {"system": SNOMED_SYSTEM, "code": concept.code, "display": concept.display}


def modality_coding(modality: str | None) -> dict[str, Any]:
    """Modality (0008,0060) → Coding in the DCM system, with the CID 33 meaning as display when known.

    ``series.modality`` is required (1..1) in R4B, yet real files lack Modality (it is type 1, but
    secondary captures and converted images omit it). Rather than drop the study or invent a code,
    an absent value gives a Coding carrying only the FHIR ``data-absent-reason`` extension
    (``unknown``), the standard way to say a required element has no value.
    """
    if modality is None or not modality.strip():
        return {"extension": [{"url": DATA_ABSENT_REASON_URL, "valueCode": "unknown"}]}
    code = modality.strip().upper()
    coding: dict[str, Any] = {"system": DCM_SYSTEM, "code": code}
    display = modality_table().get(code)
    if display is not None:
        coding["display"] = display
    return coding


def administrative_gender(patient_sex: str | None) -> str:
    """Patient's Sex (0010,0040) → Patient.gender: M→male, F→female, O→other, anything else→unknown."""
    if patient_sex is None:
        return "unknown"
    return _SEX_TO_GENDER.get(patient_sex.strip().upper(), "unknown")
