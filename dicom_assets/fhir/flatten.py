"""ImagingStudy resource → bronze and silver ``ImagingStudy`` table rows (SPEC §3.4).

Rows are shaped exactly like ``BRONZE_IMAGINGSTUDY_SCHEMA`` / ``SILVER_IMAGINGSTUDY_SCHEMA`` in
``dicom_assets.lake.schemas``: every struct carries exactly its schema's fields (absent → ``None``),
elements the structs have no field for (e.g. ``identifier.assigner``) are kept in the
``<name>_string`` JSON columns and in ``fhirContent``.

All JSON is canonical (sorted keys, compact separators, UTF-8 kept as is), so equal resources give
byte-equal strings and :func:`content_fingerprint` only changes when the content does.
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime
from typing import Any

from dicom_assets.fhir.codes import DICOM_UID_SYSTEM
from dicom_assets.fhir.datetimes import parse_instant


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the one serialisation used for tables, NDJSON and hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_fingerprint(resource: dict[str, Any]) -> str:
    """SHA-256 hex of the resource's canonical JSON without ``meta.lastUpdated``.

    Two builds of an unchanged study differ only in ``meta.lastUpdated``; this fingerprint lets the
    silver merge set ``msftModifiedDatetime`` on real change only.
    """
    content = copy.deepcopy(resource)
    meta = content.get("meta")
    if isinstance(meta, dict):
        meta.pop("lastUpdated", None)
        if not meta:
            content.pop("meta")
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def _coding(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {"system": value.get("system"), "code": value.get("code"), "display": value.get("display")}


def _identifier(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    type_ = value.get("type")
    type_row = None
    if isinstance(type_, dict):
        type_row = {
            "coding": [_coding(c) for c in type_.get("coding") or []] or None,
            "text": type_.get("text"),
        }
    return {"use": value.get("use"), "system": value.get("system"), "value": value.get("value"), "type": type_row}


def _reference(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {
        "reference": value.get("reference"),
        "type": value.get("type"),
        "identifier": _identifier(value.get("identifier")),
        "display": value.get("display"),
    }


def _instance(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "uid": value.get("uid"),
        "sopClass": _coding(value.get("sopClass")),
        "number": value.get("number"),
        "title": value.get("title"),
    }


def _series(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "uid": value.get("uid"),
        "number": value.get("number"),
        "modality": _coding(value.get("modality")),
        "description": value.get("description"),
        "numberOfInstances": value.get("numberOfInstances"),
        "bodySite": _coding(value.get("bodySite")),
        "laterality": _coding(value.get("laterality")),
        "started": value.get("started"),
        "instance": [_instance(i) for i in value.get("instance") or []],
    }


def _json_or_none(value: Any) -> str | None:
    return None if value is None else canonical_json(value)


def study_instance_uid(resource: dict[str, Any]) -> str | None:
    """The Study Instance UID of the ``urn:dicom:uid`` identifier, without its ``urn:oid:`` prefix."""
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == DICOM_UID_SYSTEM:
            return str(identifier.get("value", "")).removeprefix("urn:oid:") or None
    return None


def last_updated(resource: dict[str, Any]) -> datetime | None:
    """``meta.lastUpdated`` as a timezone-aware UTC datetime (the ``lastUpdated`` column)."""
    value = (resource.get("meta") or {}).get("lastUpdated")
    return parse_instant(value) if isinstance(value, str) else None


def flatten_imaging_study(
    resource: dict[str, Any],
    *,
    source_system: str,
    file_path: str,
    created: datetime,
    modified: datetime,
    id_orig: str | None = None,
) -> dict[str, Any]:
    """One row of silver ``ImagingStudy`` (``SILVER_IMAGINGSTUDY_SCHEMA``).

    Columns: ``id, resourceType, identifier, status, subject, started, numberOfSeries,
    numberOfInstances, modality, description, series`` as structs/lists; ``identifier_string,
    subject_string, modality_string, series_string`` as canonical JSON of the full FHIR
    elements; ``fhirContent`` (the whole resource); ``studyInstanceUid``; ``lastUpdated``
    (``meta.lastUpdated``); lineage ``idOrig`` (default: the id), ``msftCreatedDatetime``
    (``created``), ``msftModifiedDatetime`` (``modified``), ``msftFilePath`` (the NDJSON file),
    ``msftSourceSystem``.
    """
    return {
        "id": resource.get("id"),
        "resourceType": resource.get("resourceType"),
        "identifier": [_identifier(i) for i in resource.get("identifier") or []],
        "status": resource.get("status"),
        "subject": _reference(resource.get("subject")),
        "started": resource.get("started"),
        "numberOfSeries": resource.get("numberOfSeries"),
        "numberOfInstances": resource.get("numberOfInstances"),
        "modality": [_coding(m) for m in resource.get("modality") or []],
        "description": resource.get("description"),
        "series": [_series(s) for s in resource.get("series") or []],
        "identifier_string": _json_or_none(resource.get("identifier")),
        "subject_string": _json_or_none(resource.get("subject")),
        "modality_string": _json_or_none(resource.get("modality")),
        "series_string": _json_or_none(resource.get("series")),
        "fhirContent": canonical_json(resource),
        "studyInstanceUid": study_instance_uid(resource),
        "lastUpdated": last_updated(resource),
        "idOrig": id_orig if id_orig is not None else resource.get("id"),
        "msftCreatedDatetime": created,
        "msftModifiedDatetime": modified,
        "msftFilePath": file_path,
        "msftSourceSystem": source_system,
    }


def bronze_row(
    resource: dict[str, Any],
    *,
    source_system: str,
    file_path: str,
    created: datetime,
    ingest_date: str,
) -> dict[str, Any]:
    """One row of bronze ``ImagingStudy`` (``BRONZE_IMAGINGSTUDY_SCHEMA``): the raw resource JSON and lineage."""
    return {
        "id": resource.get("id"),
        "resourceType": resource.get("resourceType"),
        "sourceSystem": source_system,
        "filePath": file_path,
        "fhirContent": canonical_json(resource),
        "lastUpdated": last_updated(resource),
        "createdDatetime": created,
        "ingestDate": ingest_date,
    }
