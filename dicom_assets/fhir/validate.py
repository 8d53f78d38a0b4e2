"""Validation of an ImagingStudy before it is written (SPEC §3.4, §5.3).

Two layers: the structural FHIR R4B model of ``fhir.resources`` (cardinalities, datatypes and
their regular expressions), then our own checks of what that model does not enforce: required
value sets (status, gender), code systems and codes of our PS3.16 tables, reference to the
contained Patient, counts consistent with the series and instances, and the identity rule.

Messages name the resource id and the failing element path, never a patient value (SPEC §6).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fhir.resources.R4B.imagingstudy import ImagingStudy
from pydantic import ValidationError

from dicom_assets.fhir.codes import (
    ADMINISTRATIVE_GENDERS,
    DATA_ABSENT_REASON_URL,
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    IMAGING_STUDY_STATUSES,
    SNOMED_SYSTEM,
    URI_SYSTEM,
    body_part_table,
    laterality_table,
)
from dicom_assets.fhir.identity import imaging_study_id

_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_OID_URN_RE = re.compile(r"^urn:oid:[0-9]+(\.[0-9]+)*$")
# Study UIDs outside PS3.5 §9.1 syntax exist in real (e.g. de-identified) data; keep them, non-empty.
_UID_URN_RE = re.compile(r"^urn:oid:\S+$")


def _model_errors(resource: dict[str, Any]) -> Iterator[str]:
    try:
        ImagingStudy.model_validate(resource)
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
            path = path.lstrip(".") or "ImagingStudy"
            yield f"{path}: {error['msg']}"
    except (TypeError, ValueError) as exc:  # model-level failures not reported as ValidationError
        yield f"ImagingStudy: {type(exc).__name__}"


def _coding_errors(coding: Any, path: str, system: str, codes: frozenset[str] | None) -> Iterator[str]:
    if not isinstance(coding, dict):
        yield f"{path}: not a Coding"
        return
    if "code" not in coding:
        if codes is not None and coding.get("display"):
            return  # an uncoded value kept as text (bodySite of an unknown Body Part Examined)
        if any(isinstance(e, dict) and e.get("url") == DATA_ABSENT_REASON_URL for e in coding.get("extension") or []):
            return  # a required Coding whose DICOM source is absent (series.modality)
        yield f"{path}.code: missing"
        return
    if coding.get("system") != system:
        yield f"{path}.system: must be {system}"
    if codes is not None and coding["code"] not in codes:
        yield f"{path}.code: {coding['code']!r} is not in our PS3.16 table"


def _identifier_errors(resource: dict[str, Any]) -> Iterator[str]:
    uids = [i for i in resource.get("identifier") or [] if isinstance(i, dict) and i.get("system") == DICOM_UID_SYSTEM]
    if len(uids) != 1:
        yield f"identifier: expected exactly one {DICOM_UID_SYSTEM} identifier, found {len(uids)}"
    elif not _UID_URN_RE.match(str(uids[0].get("value", ""))):
        yield "identifier[urn:dicom:uid].value: must be urn:oid:<StudyInstanceUID>"


def _subject_errors(resource: dict[str, Any]) -> Iterator[str]:
    reference = (resource.get("subject") or {}).get("reference")
    contained = {c.get("id"): c for c in resource.get("contained") or [] if isinstance(c, dict)}
    if not isinstance(reference, str) or not reference.startswith("#"):
        yield "subject.reference: must point to the contained Patient (#patient)"
        return
    patient = contained.get(reference[1:])
    if patient is None or patient.get("resourceType") != "Patient":
        yield "subject.reference: no contained Patient with that id"
        return
    gender = patient.get("gender")
    if gender is not None and gender not in ADMINISTRATIVE_GENDERS:
        yield "contained[Patient].gender: not in AdministrativeGender (male | female | other | unknown)"


def _series_errors(resource: dict[str, Any]) -> Iterator[str]:
    body_codes = frozenset(c.code for c in body_part_table().values())
    laterality_codes = frozenset(c.code for c in laterality_table().values())
    series_list = resource.get("series") or []
    seen_series: set[str] = set()
    seen_instances: set[str] = set()
    total = 0
    for s_index, series in enumerate(series_list):
        path = f"series[{s_index}]"
        if series.get("uid") in seen_series:
            yield f"{path}.uid: duplicate series UID"
        seen_series.add(series.get("uid"))
        yield from _coding_errors(series.get("modality"), f"{path}.modality", DCM_SYSTEM, None)
        if "bodySite" in series:
            yield from _coding_errors(series["bodySite"], f"{path}.bodySite", SNOMED_SYSTEM, body_codes)
        if "laterality" in series:
            yield from _coding_errors(series["laterality"], f"{path}.laterality", SNOMED_SYSTEM, laterality_codes)
        instances = series.get("instance") or []
        total += len(instances)
        if series.get("numberOfInstances") != len(instances):
            yield f"{path}.numberOfInstances: {series.get('numberOfInstances')} but {len(instances)} instances"
        for i_index, instance in enumerate(instances):
            i_path = f"{path}.instance[{i_index}]"
            if instance.get("uid") in seen_instances:
                yield f"{i_path}.uid: duplicate SOP Instance UID"
            seen_instances.add(instance.get("uid"))
            sop_class = instance.get("sopClass") or {}
            if sop_class.get("system") != URI_SYSTEM:
                yield f"{i_path}.sopClass.system: must be {URI_SYSTEM}"
            if not _OID_URN_RE.match(str(sop_class.get("code", ""))):
                yield f"{i_path}.sopClass.code: must be urn:oid:<SOPClassUID>"
    if resource.get("numberOfSeries") != len(series_list):
        yield f"numberOfSeries: {resource.get('numberOfSeries')} but {len(series_list)} series"
    if resource.get("numberOfInstances") != total:
        yield f"numberOfInstances: {resource.get('numberOfInstances')} but {total} instances"
    series_modalities = {(s.get("modality") or {}).get("code") for s in series_list}
    for m_index, coding in enumerate(resource.get("modality") or []):
        yield from _coding_errors(coding, f"modality[{m_index}]", DCM_SYSTEM, None)
        if isinstance(coding, dict) and coding.get("code") not in series_modalities:
            yield f"modality[{m_index}].code: not the modality of any series"


def imaging_study_errors(resource: dict[str, Any], *, namespace: str | None = None) -> list[str]:
    """Every problem of ``resource`` as ``"<element path>: <reason>"`` (empty when valid)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "ImagingStudy":
        return ["resourceType: must be ImagingStudy"]
    errors = list(_model_errors(resource))
    status = resource.get("status")
    if status is not None and status not in IMAGING_STUDY_STATUSES:
        errors.append(f"status: {status!r} is not in ImagingStudyStatus")
    resource_id = resource.get("id")
    if not isinstance(resource_id, str) or not _ID_RE.match(resource_id):
        errors.append("id: must be 64 lowercase hex characters (SHA-256, SPEC 5.1)")
    errors.extend(_identifier_errors(resource))
    if namespace is not None and not errors:
        uid = next(i["value"] for i in resource["identifier"] if i.get("system") == DICOM_UID_SYSTEM)
        if resource_id != imaging_study_id(namespace, uid.removeprefix("urn:oid:")):
            errors.append(f"id: not the identity of namespace {namespace!r} and the study UID (SPEC 5.1)")
    errors.extend(_subject_errors(resource))
    errors.extend(_series_errors(resource))
    return errors


def validate_imaging_study(resource: dict[str, Any], *, namespace: str | None = None) -> None:
    """Raise ``ValueError("ImagingStudy <id>: <path>: <reason>; …")`` unless ``resource`` is valid.

    Checks the ``fhir.resources.R4B`` ImagingStudy model, then: ``status`` in ImagingStudyStatus;
    ``id`` a SHA-256 hex id (and, when ``namespace`` is given, the SPEC §5.1 identity of the
    ``urn:dicom:uid`` identifier); exactly one study UID identifier; ``subject`` pointing to a
    contained Patient whose ``gender`` is in AdministrativeGender; modality Codings in the DCM
    system; bodySite / laterality codes present in our PS3.16 tables (SNOMED CT); sopClass as
    ``urn:oid:``; unique series and instance UIDs; counts equal to the series and instances.
    """
    errors = imaging_study_errors(resource, namespace=namespace)
    if errors:
        resource_id = resource.get("id") if isinstance(resource, dict) else None
        shown = "; ".join(errors[:10]) + (f"; … {len(errors) - 10} more" if len(errors) > 10 else "")
        raise ValueError(f"ImagingStudy {resource_id}: {shown}")
