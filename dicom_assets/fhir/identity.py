"""Identity of an ImagingStudy (SPEC §5.1) and its FHIR identifiers (SPEC §5.2).

* ``id`` = lowercase hex SHA-256 of ``<namespace>/ImagingStudy/<StudyInstanceUID>``: stable across
  re-runs and engines, 64 characters (the longest FHIR id allowed), no PHI.
* Study Instance UID (0020,000D) → ``{system: urn:dicom:uid, value: urn:oid:<uid>}`` (FHIR R4B
  ImagingStudy.identifier comments).
* Accession Number (0008,0050) → identifier typed ``v2-0203#ACSN``; Issuer of Accession Number
  Sequence (0008,0051) gives its ``system`` or ``assigner``.
* Patient ID (0010,0020) → Patient / subject identifier; Issuer of Patient ID (0010,0021) or the
  Issuer of Patient ID Qualifiers Sequence (0010,0024) gives its ``system`` or ``assigner``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from dicom_assets.fhir.codes import DICOM_UID_SYSTEM, V2_0203_SYSTEM

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URI_RE = re.compile(r"^(urn:[a-z0-9][a-z0-9-]*:\S+|https?://\S+)$", re.IGNORECASE)
#: Universal Entity ID Type (0040,0033) values whose Universal Entity ID is an OID or a URI.
_ISO_TYPES = frozenset({"ISO"})
_URI_TYPES = frozenset({"URI", "URL"})


def clean_uid(value: str | None) -> str | None:
    """A UI value without the trailing NUL / space padding of PS3.5 §6.2 (padding is not part of the UID)."""
    if value is None:
        return None
    uid = value.strip(" \x00")
    return uid or None


def imaging_study_id(namespace: str, study_instance_uid: str) -> str:
    """FHIR ``ImagingStudy.id``: SHA-256 hex of ``f"{namespace}/ImagingStudy/{StudyInstanceUID}"`` (SPEC §5.1)."""
    uid = clean_uid(study_instance_uid)
    if not namespace:
        raise ValueError("imaging_study_id: namespace is empty")
    if uid is None:
        raise ValueError("imaging_study_id: StudyInstanceUID is empty")
    return hashlib.sha256(f"{namespace}/ImagingStudy/{uid}".encode()).hexdigest()


def study_uid_identifier(study_instance_uid: str) -> dict[str, Any]:
    """Study Instance UID (0020,000D) → the official ``urn:dicom:uid`` identifier."""
    return {"use": "official", "system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_instance_uid}"}


def issuer_system(issuer: str | None) -> str | None:
    """An issuer that is already a URI (``urn:…``, ``http(s)://…``) or a bare OID → an Identifier.system.

    Any other text (a local namespace such as ``HOSPITAL_A``) is not a URI and must not be put in
    ``system``; callers put it in ``assigner.display`` instead.
    """
    if issuer is None:
        return None
    text = issuer.strip()
    if _OID_RE.match(text):
        return f"urn:oid:{text}"
    if _URI_RE.match(text):
        return text
    return None


def _hl7v2_issuer(item: Mapping[str, str | None]) -> tuple[str | None, str | None]:
    """An HL7v2 HD-style issuer (Local Namespace / Universal Entity ID / its type) → (system, assigner)."""
    local = (item.get("local") or "").strip() or None
    universal = (item.get("universal") or "").strip() or None
    universal_type = (item.get("type") or "").strip().upper()
    if universal is not None:
        if universal_type in _ISO_TYPES and _OID_RE.match(universal):
            return f"urn:oid:{universal}", local
        if universal_type in _URI_TYPES or _URI_RE.match(universal):
            system = issuer_system(universal)
            if system is not None:
                return system, local
        return None, local or universal
    system = issuer_system(local)
    return system, None if system else local


def _with_issuer(identifier: dict[str, Any], system: str | None, assigner: str | None) -> dict[str, Any]:
    if system is not None:
        identifier["system"] = system
    if assigner is not None:
        identifier["assigner"] = {"display": assigner}
    return identifier


def accession_identifier(accession_number: str, issuer: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Accession Number (0008,0050) → identifier with type ``v2-0203#ACSN`` (FHIR R4B ImagingStudy).

    ``issuer`` holds Issuer of Accession Number Sequence (0008,0051) item values as ``local``
    (0040,0031), ``universal`` (0040,0032) and ``type`` (0040,0033).
    """
    identifier: dict[str, Any] = {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203_SYSTEM, "code": "ACSN", "display": "Accession ID"}]},
        "value": accession_number,
    }
    system, assigner = _hl7v2_issuer(issuer) if issuer else (None, None)
    return _with_issuer(identifier, system, assigner)


def patient_identifier(
    patient_id: str,
    issuer_of_patient_id: str | None = None,
    qualifiers: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """Patient ID (0010,0020) → Patient identifier (SPEC §5.2).

    The system comes from Issuer of Patient ID (0010,0021) when it is a URI or OID, else from the
    Issuer of Patient ID Qualifiers Sequence (0010,0024) universal entity ID; a plain-text issuer
    becomes ``assigner.display``.
    """
    identifier: dict[str, Any] = {"use": "usual", "value": patient_id}
    system = issuer_system(issuer_of_patient_id)
    assigner = None if system or not issuer_of_patient_id else issuer_of_patient_id.strip() or None
    if system is None and qualifiers:
        q_system, q_assigner = _hl7v2_issuer(qualifiers)
        system = q_system
        assigner = assigner or q_assigner
    return _with_issuer(identifier, system, assigner)
