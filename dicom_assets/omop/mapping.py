"""Silver ImagingStudy + ImagingMetastore rows → OMOP ``image_occurrence`` and ``procedure_occurrence``.

Follows the OHDSI Medical Imaging CDM (MI-CDM: Park et al., "Development of Medical Imaging Data
Standardization for Imaging-Based Observational Research: OMOP Common Data Model Extension",
J Imaging Inform Med 37:899–908, 2024; OHDSI/ImageWG ``rmd/Approach.Rmd`` and
``inst/csv/new_csv/OMOP_CDM_Medical_Imaging_Ex_Field_Level.csv``). One ``image_occurrence`` row per
DICOM series, one ``procedure_occurrence`` row per study, linked by ``procedure_occurrence_id``.

MI-CDM IMAGE_OCCURRENCE columns marked required (isRequired = Yes), all non-null here:
``image_occurrence_id, person_id, procedure_occurrence_id, image_occurrence_date, image_study_uid,
image_series_uid, modality_concept_id``, and ``local_path`` (required in the ImageWG model page,
optional in its field-level CSV; we always know it, so ``IMAGE_OCCURRENCE_SCHEMA`` makes it
non-null). Optional: ``visit_occurrence_id`` (null: no visit is known from DICOM alone),
``anatomic_site_concept_id``, ``wadors_uri``. OMOP PROCEDURE_OCCURRENCE (CDM v5.4) requires
``procedure_occurrence_id, person_id, procedure_concept_id, procedure_date,
procedure_type_concept_id``. :func:`validate_rows` enforces the schema's non-null columns.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

import pyarrow as pa

from dicom_assets.lake.schemas import IMAGE_OCCURRENCE_SCHEMA, PROCEDURE_OCCURRENCE_SCHEMA
from dicom_assets.omop.concepts import NO_MATCHING_CONCEPT, ConceptResolver
from dicom_assets.omop.idmap import IdLookup, anonymous_person_key, person_key, series_key, study_key

#: OMOP Type Concept "EHR" (32817), the provenance of records read from the hospital's own systems.
EHR_TYPE_CONCEPT_ID = 32817
SNOMED_SYSTEM = "http://snomed.info/sct"
SOURCE_TABLE = "ImagingStudy"
DEFAULT_NAMESPACE = "default"

_DA = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})(?:$|[T ])")
_TM = re.compile(r"^(\d{2}):?(\d{2})?:?(\d{2})?(?:\.(\d{1,6}))?$")
_TZ = re.compile(r"^([+-])(\d{2})(\d{2})$")


def parse_date(value: Any) -> date | None:
    """A DICOM DA (``YYYYMMDD``), its ISO form (``YYYY-MM-DD``, as silver stores it) or the date part
    of an ISO dateTime → ``date``; partial or invalid values → ``None``."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    m = _DA.match(str(value).strip()) if value else None
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def parse_time(value: Any) -> time | None:
    """A DICOM TM (``HHMMSS.FFFFFF`` or ``HH:MM:SS.ffffff``) → ``time``; invalid → ``None``."""
    m = _TM.match(str(value).strip()) if value else None
    if not m:
        return None
    try:
        micros = int((m[4] or "0").ljust(6, "0"))
        return time(int(m[1]), int(m[2] or 0), min(int(m[3] or 0), 59), micros)
    except ValueError:
        return None


def parse_offset(value: Any) -> timezone | None:
    """TimezoneOffsetFromUTC (0008,0201) ``&ZZXX`` → ``timezone``; invalid → ``None``."""
    m = _TZ.match(str(value).strip()) if value else None
    if not m:
        return None
    delta = timedelta(hours=int(m[2]), minutes=int(m[3]))
    return timezone(-delta if m[1] == "-" else delta) if delta <= timedelta(hours=14) else None


def _first(values: Iterable[Any]) -> str | None:
    """Most frequent non-empty value (ties: smallest), for a series-level tag read from every instance."""
    counts = Counter(str(v).strip() for v in values if v is not None and str(v).strip())
    if not counts:
        return None
    best = max(counts.values())
    return min(v for v, n in counts.items() if n == best)


def _earliest(values: Iterable[Any]) -> date | None:
    dates = [d for d in (parse_date(v) for v in values) if d is not None]
    return min(dates) if dates else None


def _instances(instances_by_series: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    return [row for rows in instances_by_series.values() for row in rows]


@dataclass(frozen=True)
class StudyKeys:
    """Id-map keys of one study: its person, its procedure and each of its series (by SeriesInstanceUID)."""

    namespace: str
    study_uid: str
    person: str
    procedure_occurrence: str
    image_occurrence: dict[str, str]


def study_uid_of(study: Mapping[str, Any]) -> str:
    """StudyInstanceUID of a silver ImagingStudy row (``studyInstanceUid``, else ``identifier`` urn:oid)."""
    uid = (study.get("studyInstanceUid") or "").strip()
    if not uid:
        for ident in study.get("identifier") or []:
            value = (ident or {}).get("value") or ""
            if (ident or {}).get("system") == "urn:dicom:uid" and value.startswith("urn:oid:"):
                uid = value[len("urn:oid:") :]
    if not uid:
        raise ValueError(f"ImagingStudy {study.get('id')!r}: no StudyInstanceUID")
    return uid


def keys_for_study(
    study: Mapping[str, Any], instances_by_series: Mapping[str, Sequence[Mapping[str, Any]]]
) -> StudyKeys:
    """The id-map keys the mapping functions look up; assign ids for exactly these before mapping.

    Namespace = ``msftSourceSystem``; patient = most frequent PatientID (0010,0020) and
    IssuerOfPatientID (0010,0021) of the study's silver instances (no PatientID → a per-study person).
    """
    uid = study_uid_of(study)
    instances = _instances(instances_by_series)
    ns = study.get("msftSourceSystem") or _first(r.get("msftSourceSystem") for r in instances) or DEFAULT_NAMESPACE
    patient_id = _first(r.get("patientId") for r in instances)
    issuer = _first(r.get("issuerOfPatientId") for r in instances if (r.get("patientId") or "").strip() == patient_id)
    person = person_key(ns, issuer, patient_id) if patient_id else anonymous_person_key(ns, uid)
    series = {s["uid"]: series_key(ns, uid, s["uid"]) for s in study.get("series") or [] if s and s.get("uid")}
    return StudyKeys(ns, uid, person, study_key(ns, uid), series)


def _study_date(
    study: Mapping[str, Any], series_rows: Sequence[Mapping[str, Any]], all_rows: Sequence[Mapping[str, Any]]
) -> date | None:
    return (
        _earliest(r.get("studyDate") for r in series_rows)
        or _earliest(r.get("studyDate") for r in all_rows)
        or parse_date(study.get("started"))
    )


#: Instance dates tried, in order, when a study has no Series/Study/PPS date
#: (many test and secondary-capture objects): ContentDate (0008,0023),
#: AcquisitionDate (0008,0022), InstanceCreationDate (0008,0012), then the day
#: the file arrived in the lake (``arrivalDate``), which always exists.
FALLBACK_DATE_KEYS = ("contentDate", "acquisitionDate", "instanceCreationDate", "arrivalDate")


def _fallback_date(all_rows: Sequence[Mapping[str, Any]]) -> date | None:
    found = _earliest(
        [r.get("seriesDate") for r in all_rows] + [r.get("performedProcedureStepStartDate") for r in all_rows]
    )
    for key in FALLBACK_DATE_KEYS:
        if found is not None:
            break
        found = _earliest(r.get(key) for r in all_rows)
    return found


def _utc(modified: datetime) -> datetime:
    if modified.tzinfo is None:
        raise ValueError("modified must be timezone-aware (UTC)")
    return modified.astimezone(UTC)


def wadors_uri(base_url: str, study_uid: str, series_uid: str) -> str | None:
    """DICOMweb WADO-RS series resource (PS3.18 §10.4.1): ``{base}/studies/{study}/series/{series}``."""
    base = (base_url or "").strip().rstrip("/")
    return f"{base}/studies/{study_uid}/series/{series_uid}" if base else None


def _split_uri(path: str) -> tuple[str, str]:
    scheme, sep, rest = path.partition("://")
    if not sep:
        return "", path
    authority, slash, tail = rest.partition("/")
    return f"{scheme}://{authority}", slash + tail


def series_folder(file_paths: Iterable[str | None], lake_root: str) -> str | None:
    """Common parent folder of a series' files (``msftFilePath``); relative paths are under ``lake_root``.

    Paths or URIs (``abfss://…``) keep their scheme; files of one series under two storage roots
    raise ``ValueError``; no path → ``None``.
    """
    folders: set[tuple[str, str]] = set()
    for raw in file_paths:
        if not raw:
            continue
        prefix, path = _split_uri(str(raw))
        if not prefix and not path.startswith("/") and lake_root:
            path = lake_root.rstrip("/") + "/" + path
        folders.add((prefix, path.rsplit("/", 1)[0] if "/" in path else ""))
    if not folders:
        return None
    prefixes = {p for p, _ in folders}
    if len(prefixes) > 1:
        raise ValueError(f"series files live under different storage roots {sorted(prefixes)}")
    parts = [f.strip("/").split("/") for _, f in folders]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    absolute = any(f.startswith("/") for _, f in folders)
    return prefixes.pop() + ("/" if absolute else "") + "/".join(common)


def image_occurrence_rows(
    study: Mapping[str, Any],
    instances_by_series: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    ids: IdLookup,
    concepts: ConceptResolver,
    dicomweb_base_url: str,
    lake_root: str,
    modified: datetime,
) -> list[dict[str, Any]]:
    """One ``image_occurrence`` row per series of a silver ImagingStudy row (every IMAGE_OCCURRENCE_SCHEMA column).

    Per series (``study.series[]`` and its silver ImagingMetastore rows):

    * ``image_study_uid``/``image_series_uid``: StudyInstanceUID (0020,000D) / ``series.uid`` = SeriesInstanceUID (0020,000E).
    * ``image_occurrence_date``: SeriesDate (0008,0021) (MI-CDM's suggested source), else StudyDate
      (0008,0020) (of the series' instances, then of the study's, then ``ImagingStudy.started``), else the
      earliest SeriesDate / PerformedProcedureStepStartDate (0040,0244) in the study; none → ``ValueError``
      naming the series (OMOP requires the date and inventing one would mislead cohort queries).
    * ``modality_source_value``: ``series.modality.code`` = Modality (0008,0060); concepts via the resolver.
    * ``anatomic_site_source_value``: BodyPartExamined (0018,0015) (else ``series.bodySite.display``);
      ``anatomic_site_concept_id`` from ``series.bodySite`` (SNOMED CT) or the body part's Annex L code.
    * ``wadors_uri``: ``{dicomweb_base_url}/studies/{study}/series/{series}``, ``None`` without a base URL.
    * ``local_path``: common parent folder of the series' files (``msftFilePath``).
    * lineage: ``msftSourceRecordId`` = ImagingStudy ``id``, ``msftSourceTableName`` = ``'ImagingStudy'``.
    """
    keys = keys_for_study(study, instances_by_series)
    all_rows = _instances(instances_by_series)
    person_id = ids.person_id(keys.person)
    procedure_id = ids.procedure_occurrence_id(keys.procedure_occurrence)
    stamp = _utc(modified)
    rows: list[dict[str, Any]] = []
    for series in study.get("series") or []:
        uid = (series or {}).get("uid")
        if not uid:
            raise ValueError(f"ImagingStudy {study.get('id')!r} (study {keys.study_uid}): a series has no uid")
        where = f"study {keys.study_uid} series {uid}"
        instances = list(instances_by_series.get(uid) or [])
        occurred = (
            _earliest(r.get("seriesDate") for r in instances)
            or _study_date(study, instances, all_rows)
            or _fallback_date(all_rows)
        )
        if occurred is None:
            raise ValueError(f"{where}: no SeriesDate, StudyDate or other date; image_occurrence_date is required")
        folder = series_folder((r.get("msftFilePath") for r in instances), lake_root)
        if folder is None:
            raise ValueError(f"{where}: no instance file paths; local_path is required")
        modality_code = (series.get("modality") or {}).get("code") or _first(r.get("modality") for r in instances)
        modality_concept, modality_source_concept = concepts.modality(modality_code)
        body_site = series.get("bodySite") or {}
        body_part = _first(r.get("bodyPartExamined") for r in instances)
        snomed = body_site.get("code") if body_site.get("system") == SNOMED_SYSTEM else None
        rows.append(
            {
                "image_occurrence_id": ids.image_occurrence_id(keys.image_occurrence[uid]),
                "person_id": person_id,
                "procedure_occurrence_id": procedure_id,
                "visit_occurrence_id": None,
                "anatomic_site_concept_id": concepts.anatomic_site(body_part, snomed),
                "wadors_uri": wadors_uri(dicomweb_base_url, keys.study_uid, uid),
                "local_path": folder,
                "image_occurrence_date": occurred,
                "image_study_uid": keys.study_uid,
                "image_series_uid": uid,
                "modality_concept_id": modality_concept,
                "modality_source_value": modality_code.strip() if modality_code else None,
                "modality_source_concept_id": modality_source_concept,
                "anatomic_site_source_value": body_part or body_site.get("display") or None,
                "msftSourceRecordId": study.get("id"),
                "msftSourceTableName": SOURCE_TABLE,
                "msftSourceSystem": keys.namespace,
                "msftModifiedDatetime": stamp,
            }
        )
    validate_rows(rows, IMAGE_OCCURRENCE_SCHEMA)
    return rows


def procedure_occurrence_rows(
    study: Mapping[str, Any],
    instances_by_series: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    ids: IdLookup,
    modified: datetime,
    procedure_concepts: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One ``procedure_occurrence`` row for a study (every PROCEDURE_OCCURRENCE_SCHEMA column).

    * ``procedure_date``: StudyDate (0008,0020) (instances, then ``ImagingStudy.started``), else the
      earliest SeriesDate / PerformedProcedureStepStartDate; none → ``ValueError``.
    * ``procedure_datetime``: StudyDate + StudyTime (0008,0030), shifted by TimezoneOffsetFromUTC
      (0008,0201) when present, else the recorded local time taken as UTC; ``None`` without StudyTime.
    * ``procedure_source_value``: StudyDescription (0008,1030), else the study's modalities (``CT,PT``).
    * ``procedure_concept_id``: ``procedure_concepts[upper-cased source value]`` when given, else 0.
    * ``procedure_type_concept_id``: 32817 (OMOP Type Concept "EHR").
    """
    keys = keys_for_study(study, instances_by_series)
    all_rows = _instances(instances_by_series)
    study_day = _study_date(study, [], all_rows)
    on = study_day or _fallback_date(all_rows)
    if on is None:
        raise ValueError(f"study {keys.study_uid}: no StudyDate or other date; procedure_date is required")
    at = None
    study_time = parse_time(_first(r.get("studyTime") for r in all_rows))
    if study_time is not None and study_day is not None:
        tz = parse_offset(_first(r.get("timezoneOffsetFromUtc") for r in all_rows)) or UTC
        at = datetime.combine(on, study_time, tz).astimezone(UTC)
    description = (study.get("description") or _first(r.get("studyDescription") for r in all_rows) or "").strip()
    modalities = sorted({((s or {}).get("modality") or {}).get("code") or "" for s in study.get("series") or []} - {""})
    source_value = description or ",".join(modalities) or None
    concept = (
        (procedure_concepts or {}).get(source_value.upper(), NO_MATCHING_CONCEPT)
        if source_value
        else NO_MATCHING_CONCEPT
    )
    row = {
        "procedure_occurrence_id": ids.procedure_occurrence_id(keys.procedure_occurrence),
        "person_id": ids.person_id(keys.person),
        "procedure_concept_id": concept,
        "procedure_date": on,
        "procedure_datetime": at,
        "procedure_end_date": None,
        "procedure_end_datetime": None,
        "procedure_type_concept_id": EHR_TYPE_CONCEPT_ID,
        "modifier_concept_id": None,
        "quantity": None,
        "provider_id": None,
        "visit_occurrence_id": None,
        "visit_detail_id": None,
        "procedure_source_value": source_value,
        "procedure_source_concept_id": NO_MATCHING_CONCEPT,
        "modifier_source_value": None,
        "msftSourceRecordId": study.get("id"),
        "msftSourceTableName": SOURCE_TABLE,
        "msftSourceSystem": keys.namespace,
        "msftModifiedDatetime": _utc(modified),
    }
    validate_rows([row], PROCEDURE_OCCURRENCE_SCHEMA)
    return [row]


_ROW_NAMES = (
    "image_series_uid",
    "image_study_uid",
    "image_occurrence_id",
    "procedure_occurrence_id",
    "msftSourceRecordId",
    "key",
)


def validate_rows(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> None:
    """Raise ``ValueError`` naming the row and column when a row lacks a schema column, has an unknown
    one, or holds null in a non-nullable column (the MI-CDM / OMOP required columns)."""
    names = set(schema.names)
    required = [f.name for f in schema if not f.nullable]
    for n, row in enumerate(rows):
        who = next((f"{c}={row[c]}" for c in _ROW_NAMES if row.get(c) is not None), f"row {n}")
        missing = sorted(names - set(row))
        extra = sorted(set(row) - names)
        if missing or extra:
            raise ValueError(f"{who}: columns do not match the schema (missing {missing}, unknown {extra})")
        for column in required:
            if row[column] is None:
                raise ValueError(f"{who}: required column {column} is null")
