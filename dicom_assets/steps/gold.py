"""Gold steps (SPEC §3.5): OMOP ``image_occurrence`` and ``procedure_occurrence`` with stable ids."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pyarrow as pa

from dicom_assets.config import Settings
from dicom_assets.fhir.identity import imaging_study_id
from dicom_assets.lake import delta, delta_read, rewrite
from dicom_assets.lake.locks import lake_lock
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import (
    IDMAP_SCHEMA,
    IMAGE_OCCURRENCE_SCHEMA,
    PROCEDURE_OCCURRENCE_SCHEMA,
    SILVER_IMAGINGSTUDY_SCHEMA,
)
from dicom_assets.omop import idmap
from dicom_assets.omop.concepts import ConceptResolver
from dicom_assets.omop.mapping import image_occurrence_rows, keys_for_study, procedure_occurrence_rows, validate_rows
from dicom_assets.steps.silver import study_instances, touched_studies

#: Instance columns the OMOP mapping reads.
INSTANCE_COLUMNS = [
    "studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "msftSourceSystem", "patientId",
    "issuerOfPatientId", "studyDate", "studyTime", "timezoneOffsetFromUtc", "seriesDate", "seriesTime",
    "performedProcedureStepStartDate", "bodyPartExamined", "modality", "studyDescription", "msftFilePath",
]

IDMAPS = ("image_occurrence", "person", "procedure_occurrence")
#: Study columns the OMOP mapping reads: not the resource's JSON text nor the flattened copies.
STUDY_COLUMNS = [
    n for n in SILVER_IMAGINGSTUDY_SCHEMA.names
    if n not in ("fhirContent", "identifier_string", "subject_string", "modality_string", "series_string")
]


@dataclass(frozen=True)
class GoldResult:
    studies: int
    image_occurrences: int
    procedure_occurrences: int
    new_ids: dict[str, int]
    skipped: dict[str, str]


def _map_rows(paths: LakePaths, kind: str, column: str, values: Iterable[str | int]) -> pa.Table:
    """The id-map rows (``key``, ``id``) of ``kind`` whose ``column`` is one of ``values``.

    Files are skipped by their statistics: ids are handed out in increasing
    order, so the ids of a few studies sit in a few files whatever the map's size.
    """
    wanted = sorted({v for v in values if v is not None})  # type: ignore[type-var]
    return delta_read.read_in(paths.table_uri(f"_idmap_{kind}"), IDMAP_SCHEMA, column, wanted, columns=["key", "id"])


def ensure_ids(paths: LakePaths, wanted: Mapping[str, Iterable[str]], now: datetime) -> tuple[idmap.IdLookup, dict[str, int]]:
    """Ids for every wanted key, assigning new ones for unseen keys; existing ids never change.

    Only the wanted keys are looked up, and the next id comes from the map's
    largest id in the Delta log's statistics, so a round costs the same on a
    map of any size. Runs under a lake lock so that two partitions
    materialising at once never hand out the same id (see
    :mod:`dicom_assets.lake.locks`).
    """
    out: dict[str, dict[str, int]] = {}
    new_counts: dict[str, int] = {}
    with lake_lock(paths.state_dir, "idmaps"):
        for kind in IDMAPS:
            keys = set(wanted.get(kind, ()))
            found = _map_rows(paths, kind, "key", keys)
            existing = dict(zip(found.column("key").to_pylist(), found.column("id").to_pylist(), strict=True))
            new = idmap.assign_ids(existing, keys, max_id=delta.column_max(paths.table_uri(f"_idmap_{kind}"), "id"))
            if new:
                delta.append(
                    paths.table_uri(f"_idmap_{kind}"),
                    pa.Table.from_pylist(idmap.id_rows(new, now), schema=IDMAP_SCHEMA),
                    IDMAP_SCHEMA,
                )
            new_counts[kind] = len(new)
            out[kind] = {k: existing.get(k, new.get(k)) for k in keys}  # type: ignore[misc]
    return idmap.IdLookup(
        image_occurrence=out["image_occurrence"], person=out["person"], procedure_occurrence=out["procedure_occurrence"]
    ), new_counts


_FALLBACK_TAGS = {"contentDate": "00080023", "acquisitionDate": "00080022", "instanceCreationDate": "00080012"}


def _add_fallback_dates(paths: LakePaths, by_study: Mapping[tuple[str, str], Mapping[str, list[dict[str, Any]]]]) -> None:
    """For studies without any Series/Study/PPS date, add instance-level dates from the full tags.

    OMOP requires ``image_occurrence_date``; the other dates of the same
    objects come first, the arrival day last (see omop.mapping.FALLBACK_DATE_KEYS).
    Only undated studies pay for reading ``metadata_string``.
    """
    undated = [
        k for k, series in by_study.items()
        if not any(r.get(c) for rows in series.values() for r in rows for c in ("seriesDate", "studyDate", "performedProcedureStepStartDate"))
    ]
    if not undated:
        return
    extra = study_instances(paths, undated, columns=["msftSourceSystem", "studyInstanceUid", "sopInstanceUid", "seriesInstanceUid", "ingestDate", "metadata_string"])
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in extra.to_pylist():
        meta = json.loads(r["metadata_string"] or "{}")
        dates = {k: (meta.get(tag, {}).get("Value") or [None])[0] for k, tag in _FALLBACK_TAGS.items()}
        dates["arrivalDate"] = (r["ingestDate"] or "").replace("/", "-") or None
        found[(r["msftSourceSystem"], r["studyInstanceUid"], r["sopInstanceUid"])] = dates
    for key in undated:
        for rows in by_study[key].values():
            for r in rows:
                r.update(found.get((key[0], key[1], r["sopInstanceUid"]), {}))


def _any_distinct(columns: Sequence[str], s: Mapping[str, Any], t: Mapping[str, Any]) -> bool:
    # SQL's ``s.c IS DISTINCT FROM t.c`` for any column: two NULLs are not distinct, as in Python.
    return any(s[c] != t[c] for c in columns)


def _changed_rule(schema: pa.Schema, skip: Sequence[str]) -> rewrite.Rule:
    """A gold row is replaced only when a column other than ``skip`` changed (so ``msftModifiedDatetime`` moves only then)."""
    columns = tuple(f.name for f in schema if f.name not in skip)
    return rewrite.Rule(columns, partial(_any_distinct, columns))


#: Studies mapped per round of :func:`build_gold`: its memory is bounded by this
#: many studies, not by the size of the day.
STUDIES_PER_ROUND = 500


def build_gold(paths: LakePaths, settings: Settings, day: str, *, now: datetime | None = None) -> GoldResult:
    """Map every study touched by ``day`` (whole study, all days' instances) and merge into gold.

    Studies are taken :data:`STUDIES_PER_ROUND` at a time in (namespace,
    StudyInstanceUID) order; each round assigns its ids and merges its rows.
    """
    now = now or datetime.now(UTC)
    studies = sorted(set(touched_studies(paths, day)))
    concepts = ConceptResolver.from_settings(
        settings.modality_concept_map, settings.body_part_concept_map, settings.omop_vocabulary_dir
    )
    rounds = [studies[i : i + STUDIES_PER_ROUND] for i in range(0, len(studies), STUDIES_PER_ROUND)] or [[]]
    results = [_build_round(paths, settings, group, concepts, now) for group in rounds]
    return GoldResult(
        studies=sum(r.studies for r in results),
        image_occurrences=sum(r.image_occurrences for r in results),
        procedure_occurrences=sum(r.procedure_occurrences for r in results),
        new_ids={kind: sum(r.new_ids.get(kind, 0) for r in results) for kind in IDMAPS},
        skipped={k: v for r in results for k, v in r.skipped.items()},
    )


def _build_round(
    paths: LakePaths, settings: Settings, studies: list[tuple[str, str]], concepts: ConceptResolver, now: datetime
) -> GoldResult:
    uids = sorted({u for _ns, u in studies})
    st = delta_read.read_in(paths.table_uri("silver_ImagingStudy"), SILVER_IMAGINGSTUDY_SCHEMA, "studyInstanceUid", uids, columns=STUDY_COLUMNS)
    wanted_pairs = set(studies)
    study_rows = [r for r in st.to_pylist() if (r["msftSourceSystem"], r["studyInstanceUid"]) in wanted_pairs]
    del st
    inst = study_instances(paths, studies, columns=INSTANCE_COLUMNS)
    by_study: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in inst.to_pylist():
        by_study[(r["msftSourceSystem"], r["studyInstanceUid"])][r["seriesInstanceUid"]].append(r)
    del inst
    _add_fallback_dates(paths, by_study)

    wanted: dict[str, set[str]] = {k: set() for k in IDMAPS}
    for s in study_rows:
        keys = keys_for_study(s, by_study[(s["msftSourceSystem"], s["studyInstanceUid"])])
        wanted["person"].add(keys.person)
        wanted["procedure_occurrence"].add(keys.procedure_occurrence)
        wanted["image_occurrence"].update(keys.image_occurrence.values())
    ids, new_counts = ensure_ids(paths, wanted, now)

    io_rows: list[dict[str, Any]] = []
    po_rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for s in study_rows:
        series = by_study[(s["msftSourceSystem"], s["studyInstanceUid"])]
        try:
            io = image_occurrence_rows(
                s, series, ids=ids, concepts=concepts, dicomweb_base_url=settings.dicomweb_base_url,
                lake_root=str(paths.root), modified=now,
            )
            po = procedure_occurrence_rows(s, series, ids=ids, modified=now)
        except ValueError as exc:
            # Strict writer: a study we cannot map (no date at all) is reported, not guessed.
            skipped[s["studyInstanceUid"]] = str(exc)[:200]
            continue
        io_rows.extend(io)
        po_rows.extend(po)
    validate_rows(io_rows, IMAGE_OCCURRENCE_SCHEMA)
    validate_rows(po_rows, PROCEDURE_OCCURRENCE_SCHEMA)
    delta.upsert(
        paths.table_uri("image_occurrence"),
        pa.Table.from_pylist(io_rows, schema=IMAGE_OCCURRENCE_SCHEMA),
        IMAGE_OCCURRENCE_SCHEMA,
        keys=["image_occurrence_id"],
        lock=lambda: lake_lock(paths.state_dir, "image_occurrence"),
        update_rule=_changed_rule(IMAGE_OCCURRENCE_SCHEMA, ["msftModifiedDatetime"]),
    )
    delta.upsert(
        paths.table_uri("procedure_occurrence"),
        pa.Table.from_pylist(po_rows, schema=PROCEDURE_OCCURRENCE_SCHEMA),
        PROCEDURE_OCCURRENCE_SCHEMA,
        keys=["procedure_occurrence_id"],
        lock=lambda: lake_lock(paths.state_dir, "procedure_occurrence"),
        update_rule=_changed_rule(PROCEDURE_OCCURRENCE_SCHEMA, ["msftModifiedDatetime"]),
    )
    return GoldResult(
        studies=len(study_rows),
        image_occurrences=len(io_rows),
        procedure_occurrences=len(po_rows),
        new_ids=new_counts,
        skipped=skipped,
    )


# ---- checks -------------------------------------------------------------------------------------

def _ids(t: pa.Table, col: str) -> list[Any]:
    return t.column(col).to_pylist()


def _study_ids(paths: LakePaths, day: str | None) -> list[str] | None:
    """ImagingStudy ids (``msftSourceRecordId``) of the studies ``day`` touched; ``None`` without ``day``."""
    if day is None:
        return None
    return sorted({imaging_study_id(ns, uid) for ns, uid in touched_studies(paths, day)})


def _partition_rows(
    paths: LakePaths, table: str, schema: pa.Schema, study_ids: list[str] | None, columns: list[str] | None = None
) -> pa.Table:
    """The rows of ``table`` for the studies ``study_ids`` (:func:`_study_ids`; all rows when ``None``).

    A partition's checks look at what its run wrote: another day's run going
    on at the same time (image_occurrence merged, procedure_occurrence not
    yet) must not fail them. Rows are found by ``msftSourceRecordId`` (the
    ImagingStudy id), not by reading the table whole.
    """
    if study_ids is None:
        return delta_read.read(paths.table_uri(table), schema, columns=columns)
    return delta_read.read_in(paths.table_uri(table), schema, "msftSourceRecordId", study_ids, columns=columns)


def _duplicates(paths: LakePaths, table: str, schema: pa.Schema, column: str, rows: pa.Table, whole: bool) -> int:
    """Rows beyond the first of each ``column`` value of ``rows``, counted over the whole table."""
    ids = _ids(rows, column)
    if whole:
        return len(ids) - len(set(ids))
    held = delta_read.read_in(paths.table_uri(table), schema, column, sorted(set(ids)), columns=[column])
    return held.num_rows - len(set(ids))


def _known_ids(paths: LakePaths, table: str, schema: pa.Schema, column: str, ids: Iterable[int], whole: bool) -> set[int]:
    """Which of ``ids`` the table's ``column`` holds (the whole column when ``whole``)."""
    if whole:
        return set(_ids(delta_read.read(paths.table_uri(table), schema, columns=[column]), column))
    return set(_ids(delta_read.read_in(paths.table_uri(table), schema, column, sorted(set(ids)), columns=[column]), column))


def check_image_occurrence(paths: LakePaths, day: str | None = None) -> tuple[bool, dict[str, Any]]:
    """No duplicate ids, required columns non-null, person/procedure ids resolve.

    With ``day``: the rows of the studies that partition touched, each of their
    ids looked up in the whole table (a duplicate written by another day counts).
    """
    whole = day is None
    io = _partition_rows(paths, "image_occurrence", IMAGE_OCCURRENCE_SCHEMA, _study_ids(paths, day))
    dup = _duplicates(paths, "image_occurrence", IMAGE_OCCURRENCE_SCHEMA, "image_occurrence_id", io, whole)
    nulls = {f.name: io.column(f.name).null_count for f in IMAGE_OCCURRENCE_SCHEMA if not f.nullable}
    proc_ids = _ids(io, "procedure_occurrence_id")
    proc = _known_ids(paths, "procedure_occurrence", PROCEDURE_OCCURRENCE_SCHEMA, "procedure_occurrence_id", proc_ids, whole)
    persons = _known_ids(paths, "_idmap_person", IDMAP_SCHEMA, "id", _ids(io, "person_id"), whole)
    bad_proc = sum(1 for x in proc_ids if x not in proc)
    bad_person = sum(1 for x in _ids(io, "person_id") if x not in persons)
    facts = {"rows": io.num_rows, "duplicate_ids": dup, "null_required": sum(nulls.values()),
             "unresolved_procedure_ids": bad_proc, "unresolved_person_ids": bad_person}
    return dup == 0 and not sum(nulls.values()) and bad_proc == 0 and bad_person == 0, facts


def check_procedure_occurrence(paths: LakePaths, day: str | None = None) -> tuple[bool, dict[str, Any]]:
    """No duplicate ids, required columns non-null, person ids resolve (scoped like :func:`check_image_occurrence`)."""
    whole = day is None
    po = _partition_rows(paths, "procedure_occurrence", PROCEDURE_OCCURRENCE_SCHEMA, _study_ids(paths, day))
    dup = _duplicates(paths, "procedure_occurrence", PROCEDURE_OCCURRENCE_SCHEMA, "procedure_occurrence_id", po, whole)
    nulls = sum(po.column(f.name).null_count for f in PROCEDURE_OCCURRENCE_SCHEMA if not f.nullable)
    persons = _known_ids(paths, "_idmap_person", IDMAP_SCHEMA, "id", _ids(po, "person_id"), whole)
    bad_person = sum(1 for x in _ids(po, "person_id") if x not in persons)
    return dup == 0 and nulls == 0 and bad_person == 0, {
        "rows": po.num_rows, "duplicate_ids": dup, "null_required": nulls, "unresolved_person_ids": bad_person
    }


def check_idmaps_stable(paths: LakePaths, day: str | None = None) -> tuple[bool, dict[str, Any]]:
    """Each id-map key has exactly one id and each id one key.

    Without ``day`` the maps are checked whole. With ``day``, the ids that
    partition's gold rows use are checked: every map row holding one of those
    ids, then every map row holding one of their keys, anywhere in the map (a
    second id for a key, or a second key for an id, is found whichever run
    wrote it). The maps only grow, one locked append at a time, so a
    concurrent run never shows a half state.
    """
    used: dict[str, set[int]] = {kind: set() for kind in IDMAPS}
    if day is not None:
        study_ids = _study_ids(paths, day)
        io = _partition_rows(paths, "image_occurrence", IMAGE_OCCURRENCE_SCHEMA, study_ids,
                             ["image_occurrence_id", "procedure_occurrence_id", "person_id"])
        po = _partition_rows(paths, "procedure_occurrence", PROCEDURE_OCCURRENCE_SCHEMA, study_ids,
                             ["procedure_occurrence_id", "person_id"])
        used["image_occurrence"].update(_ids(io, "image_occurrence_id"))
        used["procedure_occurrence"].update(_ids(io, "procedure_occurrence_id") + _ids(po, "procedure_occurrence_id"))
        used["person"].update(_ids(io, "person_id") + _ids(po, "person_id"))
    facts: dict[str, Any] = {}
    ok = True
    for kind in IDMAPS:
        if day is None:
            by_id = by_key = delta_read.read(paths.table_uri(f"_idmap_{kind}"), IDMAP_SCHEMA, columns=["key", "id"])
        else:
            by_id = _map_rows(paths, kind, "id", used[kind])
            by_key = _map_rows(paths, kind, "key", _ids(by_id, "key"))
        dk = sum(c - 1 for c in Counter(_ids(by_key, "key")).values() if c > 1)
        di = sum(c - 1 for c in Counter(_ids(by_id, "id")).values() if c > 1)
        facts[f"{kind}_keys"] = by_key.num_rows
        facts[f"{kind}_conflicts"] = dk + di
        ok = ok and dk == 0 and di == 0
    return ok, facts
