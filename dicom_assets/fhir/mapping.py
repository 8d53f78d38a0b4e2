"""Silver ImagingMetastore rows of one study → FHIR R4B ``ImagingStudy`` (SPEC §3.4, §5.2).

The whole study is rebuilt from all of its instance rows every time, so a late instance completes
a study and never forks it. Counts are counted from distinct UIDs, never copied from the often
missing Number of Study/Series Related Instances tags.

When instances disagree on a descriptive value (a corrected Patient's Name, a re-sent Series
Description) the most recent row wins, as in the silver merge: rows are ranked by
``msftModifiedDatetime``, then ``sourceModifiedAt``, then SOP Instance UID. Disagreements that
change *whose* or *which* data this is raise ``ValueError`` naming the study UID and the field,
never the value (no PHI in messages, SPEC §6).
"""

from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from dicom_assets.fhir.codes import (
    URI_SYSTEM,
    administrative_gender,
    body_site_coding,
    laterality_coding,
    modality_coding,
)
from dicom_assets.fhir.datetimes import fhir_date, fhir_datetime, fhir_instant
from dicom_assets.fhir.identity import (
    accession_identifier,
    clean_uid,
    imaging_study_id,
    patient_identifier,
    study_uid_identifier,
)
from dicom_assets.fhir.names import human_names

#: Id of the contained Patient that ``subject`` points to (``#patient``).
PATIENT_REF_ID = "patient"

# DICOM JSON model keys (PS3.18 F.2) of the elements read from ``metadata_string``.
_TAG_PATIENT_NAME = "00100010"
_TAG_ISSUER_QUALIFIERS = "00100024"
_TAG_ISSUER_OF_ACCESSION = "00080051"
_TAG_LOCAL_NAMESPACE = "00400031"
_TAG_UNIVERSAL_ID = "00400032"
_TAG_UNIVERSAL_ID_TYPE = "00400033"
_TAG_IMAGE_LATERALITY = "00200062"
_TAG_MEDIA_STORAGE_SOP_CLASS = "00020002"


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip(" \x00")
    return text or None


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _epoch(value: Any) -> float:
    """A timestamp column (datetime, pandas Timestamp, ISO string or number) → sortable seconds."""
    if value is None:
        return -math.inf
    if isinstance(value, numbers.Real):
        return -math.inf if math.isnan(float(value)) else float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return -math.inf
    try:
        stamp = float(value.timestamp())
    except (AttributeError, ValueError, OSError):
        return -math.inf
    return -math.inf if math.isnan(stamp) else stamp


class _Row:
    """One silver instance row with typed access and a lazily parsed ``metadata_string``."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.row = row
        self.sop_uid = clean_uid(_text(row.get("sopInstanceUid")))
        self.series_uid = clean_uid(_text(row.get("seriesInstanceUid")))
        self.rank = (
            _epoch(row.get("msftModifiedDatetime")),
            _epoch(row.get("sourceModifiedAt")),
            self.sop_uid or "",
        )
        self._metadata: dict[str, Any] | None = None

    def text(self, column: str) -> str | None:
        return _text(self.row.get(column))

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            raw = self.row.get("metadata_string")
            parsed: Any = {}
            if isinstance(raw, Mapping):
                parsed = raw
            elif isinstance(raw, str) and raw:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = {}
            self._metadata = dict(parsed) if isinstance(parsed, Mapping) else {}
        return self._metadata

    def has_tag(self, tag: str) -> bool:
        """Cheap pre-check so large JSON documents are parsed only when the element is there."""
        raw = self.row.get("metadata_string")
        if isinstance(raw, str):
            return f'"{tag}"' in raw
        return isinstance(raw, Mapping) and tag in raw

    def first_value(self, tag: str) -> Any:
        element = self.metadata().get(tag)
        if isinstance(element, Mapping):
            values = element.get("Value")
            if isinstance(values, list) and values:
                return values[0]
        return None


def _first(rows: Sequence[_Row], column: str) -> str | None:
    for row in rows:
        value = row.text(column)
        if value is not None:
            return value
    return None


def _first_int(rows: Sequence[_Row], column: str) -> int | None:
    for row in rows:
        value = _int(row.row.get(column))
        if value is not None:
            return value
    return None


def _issuer_item(item: Any) -> dict[str, str | None] | None:
    """An Issuer of Accession Number / Patient ID Qualifiers item → HD-like ``local/universal/type``."""
    if not isinstance(item, Mapping):
        return None

    def value(tag: str) -> str | None:
        element = item.get(tag)
        if isinstance(element, Mapping) and isinstance(element.get("Value"), list) and element["Value"]:
            return _text(element["Value"][0])
        return None

    issuer = {
        "local": value(_TAG_LOCAL_NAMESPACE),
        "universal": value(_TAG_UNIVERSAL_ID),
        "type": value(_TAG_UNIVERSAL_ID_TYPE),
    }
    return issuer if any(issuer.values()) else None


def _sort_key(number: int | None, uid: str) -> tuple[bool, int, str]:
    return (number is None, number or 0, uid)


def _patient(rows: Sequence[_Row], study_uid: str) -> dict[str, Any]:
    """Patient module (0010,xxxx) → the contained Patient: identifier, name, birthDate, gender."""
    counts = Counter(value for row in rows if (value := row.text("patientId")) is not None)
    patient_ids: set[str] = set()
    if counts:
        # Real archives hold studies whose instances disagree on PatientID (merges,
        # re-identification). The study still needs one subject: the most frequent
        # id wins (ties: the smallest), the same rule gold uses for person_id, so
        # the choice does not depend on the order in which files arrive.
        best = max(counts.values())
        chosen = min(v for v, n in counts.items() if n == best)
        patient_ids = {chosen}
        rows = [row for row in rows if row.text("patientId") in (chosen, None)]
    patient: dict[str, Any] = {"resourceType": "Patient", "id": PATIENT_REF_ID}
    named = [row for row in rows if row.text("patientName") is not None] or list(rows[:1])
    id_row = next((row for row in rows if row.text("patientId") is not None), rows[0])
    if patient_ids:
        qualifiers = None
        if id_row.has_tag(_TAG_ISSUER_QUALIFIERS):
            qualifiers = _issuer_item(id_row.first_value(_TAG_ISSUER_QUALIFIERS))
        patient["identifier"] = [
            patient_identifier(next(iter(patient_ids)), _first(rows, "issuerOfPatientId"), qualifiers)
        ]
    name_row = named[0]
    pn: Any = name_row.first_value(_TAG_PATIENT_NAME) if name_row.has_tag(_TAG_PATIENT_NAME) else None
    names = human_names(pn if isinstance(pn, Mapping) else name_row.text("patientName"))
    if names:
        patient["name"] = names
    patient["gender"] = administrative_gender(_first(rows, "patientSex"))
    birth_date = fhir_date(_first(rows, "patientBirthDate"))
    if birth_date is not None:
        patient["birthDate"] = birth_date
    return patient


def _started(rows: Sequence[_Row], date_col: str, time_col: str, default_offset: str | None) -> str | None:
    """DA + TM of the most recent row that has the date, with its Timezone Offset From UTC (0008,0201).

    The offset applies to every DA/TM of the SOP instance (PS3.3 C.12.1.1.8), series dates included.
    """
    for row in rows:
        if row.text(date_col) is not None:
            offset = row.text("timezoneOffsetFromUtc") or _first(rows, "timezoneOffsetFromUtc")
            return fhir_datetime(row.text(date_col), row.text(time_col), offset, default_offset=default_offset)
    return None


def _series_laterality(rows: Sequence[_Row]) -> dict[str, Any] | None:
    """Laterality (0020,0060); else the Image Laterality (0020,0062) all instances agree on (e.g. MG)."""
    coding = laterality_coding(_first(rows, "laterality"))
    if coding is not None:
        return coding
    values = {
        text
        for row in rows
        if row.has_tag(_TAG_IMAGE_LATERALITY) and (text := _text(row.first_value(_TAG_IMAGE_LATERALITY)))
    }
    return laterality_coding(values.pop()) if len(values) == 1 else None


def _instance(row: _Row, study_uid: str) -> dict[str, Any]:
    """SOP Instance UID / SOP Class UID / Instance Number / Document Title → ``series.instance``."""
    sop_class = clean_uid(row.text("sopClassUid"))
    if sop_class is None and row.has_tag(_TAG_MEDIA_STORAGE_SOP_CLASS):
        # PS3.10 §7.1: Media Storage SOP Class UID equals the SOP Class UID of the dataset.
        sop_class = clean_uid(_text(row.first_value(_TAG_MEDIA_STORAGE_SOP_CLASS)))
    if sop_class is None:
        raise ValueError(f"ImagingStudy {study_uid}: instance {row.sop_uid} lacks SOPClassUID (0008,0016)")
    instance: dict[str, Any] = {"uid": row.sop_uid, "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{sop_class}"}}
    number = _int(row.row.get("instanceNumber"))
    if number is not None:
        instance["number"] = number
    title = row.text("documentTitle")
    if title is not None:
        instance["title"] = title
    return instance


def _series(series_uid: str, rows: Sequence[_Row], study_uid: str, default_offset: str | None) -> dict[str, Any]:
    """General Series module → one ``series`` entry; ``rows`` are its distinct instances, newest first."""
    series: dict[str, Any] = {"uid": series_uid}
    number = _first_int(rows, "seriesNumber")
    if number is not None:
        series["number"] = number
    series["modality"] = modality_coding(_first(rows, "modality"))
    description = _first(rows, "seriesDescription")
    if description is not None:
        series["description"] = description
    series["numberOfInstances"] = len(rows)
    body_site = body_site_coding(_first(rows, "bodyPartExamined"))
    if body_site is not None:
        series["bodySite"] = body_site
    laterality = _series_laterality(rows)
    if laterality is not None:
        series["laterality"] = laterality
    started = _started(rows, "seriesDate", "seriesTime", default_offset)
    if started is not None:
        series["started"] = started
    instances = sorted((_instance(row, study_uid) for row in rows), key=lambda i: _sort_key(i.get("number"), i["uid"]))
    series["instance"] = instances
    return series


def _distinct_instances(rows: list[_Row], study_uid: str) -> list[_Row]:
    """One row per SOP Instance UID (the most recent), so re-sent files never double count."""
    seen: dict[str, _Row] = {}
    for row in rows:
        if row.sop_uid is None:
            raise ValueError(f"ImagingStudy {study_uid}: a row lacks SOPInstanceUID (0008,0018)")
        if row.series_uid is None:
            raise ValueError(f"ImagingStudy {study_uid}: instance {row.sop_uid} lacks SeriesInstanceUID (0020,000E)")
        kept = seen.get(row.sop_uid)
        if kept is None:
            seen[row.sop_uid] = row
        elif kept.series_uid != row.series_uid:
            raise ValueError(
                f"ImagingStudy {study_uid}: instance {row.sop_uid} is in more than one SeriesInstanceUID (0020,000E)"
            )
    return list(seen.values())


def _study_uid(rows: Sequence[_Row]) -> str:
    uids = {clean_uid(row.text("studyInstanceUid")) for row in rows}
    if None in uids:
        raise ValueError("build_imaging_study: a row lacks StudyInstanceUID (0020,000D)")
    if len(uids) != 1:
        raise ValueError(f"build_imaging_study: rows of {len(uids)} studies given: {sorted(u or '' for u in uids)}")
    return next(iter(uids)) or ""


def build_imaging_study(
    instances: Sequence[Mapping[str, Any]],
    *,
    namespace: str,
    last_updated: datetime,
    default_offset: str | None = None,
) -> dict[str, Any]:
    """All silver ``ImagingMetastore`` rows of ONE study → a JSON-ready FHIR R4B ImagingStudy (SPEC §5.2).

    Mapping (DICOM keyword → element): StudyInstanceUID → ``id`` (SPEC §5.1) and ``identifier``
    (``urn:dicom:uid``); AccessionNumber (+ IssuerOfAccessionNumberSequence) → ``identifier``
    (``ACSN``); PatientID, IssuerOfPatientID, PatientName, PatientBirthDate, PatientSex → a
    ``contained`` Patient ``#patient`` that ``subject`` references (with the same identifier);
    StudyDate + StudyTime + TimezoneOffsetFromUTC → ``started``; distinct series Modality →
    ``modality`` (DCM, sorted); StudyDescription → ``description``; distinct series / SOP
    instance UIDs → ``numberOfSeries`` / ``numberOfInstances``. Per series (sorted by
    SeriesNumber, then UID): SeriesInstanceUID, SeriesNumber, Modality, SeriesDescription, the
    counted instances, BodyPartExamined → ``bodySite`` (CID 4031), Laterality → ``laterality``
    (CID 244), SeriesDate + SeriesTime → ``started``; per instance (sorted by InstanceNumber,
    then UID): SOPInstanceUID, SOPClassUID (``urn:oid:``), InstanceNumber, DocumentTitle.

    ``last_updated`` (timezone-aware) becomes ``meta.lastUpdated``. ``default_offset``
    (``±HHMM``) is the zone assumed for DA/TM when the instances carry no Timezone Offset From
    UTC; without it such times are dropped and only the date is kept (see ``datetimes``).

    Raises ``ValueError`` naming the study UID and the field when the rows are inconsistent:
    several studies, a missing UID, a SOP instance in two series, differing PatientID, another
    namespace or an instance without SOP Class UID. A series without Modality keeps a
    ``data-absent-reason`` Coding (see ``codes.modality_coding``) and adds no study modality.
    """
    rows = sorted((_Row(row) for row in instances), key=lambda r: r.rank, reverse=True)
    if not rows:
        raise ValueError("build_imaging_study: no instance rows given")
    study_uid = _study_uid(rows)
    resource_id = imaging_study_id(namespace, study_uid)
    for row in rows:
        source = row.text("msftSourceSystem")
        if source is not None and source != namespace:
            raise ValueError(f"ImagingStudy {study_uid}: msftSourceSystem differs from namespace {namespace!r}")
        stored_id = row.text("imagingStudyId")
        if stored_id is not None and stored_id != resource_id:
            raise ValueError(f"ImagingStudy {study_uid}: imagingStudyId differs from the identity rule (SPEC 5.1)")
    distinct = _distinct_instances(rows, study_uid)

    by_series: dict[str, list[_Row]] = {}
    for row in distinct:
        by_series.setdefault(row.series_uid or "", []).append(row)
    series = sorted(
        (_series(uid, members, study_uid, default_offset) for uid, members in by_series.items()),
        key=lambda s: _sort_key(s.get("number"), s["uid"]),
    )

    patient = _patient(rows, study_uid)
    identifiers = [study_uid_identifier(study_uid)]
    accession = _first(rows, "accessionNumber")
    if accession is not None:
        acc_row = next(row for row in rows if row.text("accessionNumber") is not None)
        issuer = (
            _issuer_item(acc_row.first_value(_TAG_ISSUER_OF_ACCESSION))
            if acc_row.has_tag(_TAG_ISSUER_OF_ACCESSION)
            else None
        )
        identifiers.append(accession_identifier(accession, issuer))
    subject: dict[str, Any] = {"reference": f"#{PATIENT_REF_ID}", "type": "Patient"}
    if "identifier" in patient:
        subject["identifier"] = dict(patient["identifier"][0])

    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": resource_id,
        "meta": {"lastUpdated": fhir_instant(last_updated)},
        "contained": [patient],
        "identifier": identifiers,
        "status": "available",
        "subject": subject,
    }
    started = _started(rows, "studyDate", "studyTime", default_offset)
    if started is not None:
        resource["started"] = started
    resource["numberOfSeries"] = len(series)
    resource["numberOfInstances"] = len(distinct)
    codes = sorted({code for s in series if (code := s["modality"].get("code"))})
    if codes:
        resource["modality"] = [modality_coding(code) for code in codes]
    description = _first(rows, "studyDescription")
    if description is not None:
        resource["description"] = description
    resource["series"] = series
    return resource
