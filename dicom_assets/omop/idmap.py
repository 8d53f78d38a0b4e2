"""Stable OMOP integer ids (SPEC §3.5): pure id assignment for the persisted id-map tables.

OMOP keys are integers; DICOM keys are UIDs and patient identifiers. Three id maps
(``gold/Tables/_idmap_image_occurrence``, ``_idmap_person``, ``_idmap_procedure_occurrence``, schema
``IDMAP_SCHEMA``: ``key, id, createdDatetime``) hold the assignment. A persisted id never changes:
new keys get new ids, existing keys are never renumbered, and nothing here rewrites an old row.

Keys (text, unambiguous: every component is percent-encoded, so ``/`` only separates):

* series → ``image_occurrence_id``: ``<ns>/<StudyInstanceUID>/<SeriesInstanceUID>``
* study → ``procedure_occurrence_id``: ``<ns>/<StudyInstanceUID>``
* patient → ``person_id``: ``<ns>/person/sha256:<hex>`` over (IssuerOfPatientID, PatientID), so the
  id map carries no PatientID in clear; a study without PatientID gets its own person
  ``<ns>/person/study:<StudyInstanceUID>`` rather than being merged with other unidentified patients.

Concurrent writers (the lead's Delta retry loop): :func:`assign_ids` is a pure function of the map as
read, so two writers that read the same map propose the same ids for different keys. The writer
appends only :func:`id_rows` of its *new* assignments with a Delta transaction that fails on a
concurrent append; on conflict it re-reads the map, calls :func:`find_conflicts` (or simply
:func:`assign_ids` again — keys the other writer added are then existing and keep *its* ids) and
retries. :func:`find_conflicts` is also the post-commit check that no key or id was given twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote


def _part(value: str) -> str:
    # UIDs are digits and dots (PS3.5 §9.1); anything else is escaped so keys stay unambiguous.
    return quote(value, safe=".-_")


def series_key(ns: str, study_uid: str, series_uid: str) -> str:
    """Id-map key of a series (StudyInstanceUID (0020,000D), SeriesInstanceUID (0020,000E))."""
    _require(study_uid=study_uid, series_uid=series_uid)
    return f"{_part(ns)}/{_part(study_uid)}/{_part(series_uid)}"


def study_key(ns: str, study_uid: str) -> str:
    """Id-map key of a study (StudyInstanceUID (0020,000D)) → ``procedure_occurrence_id``."""
    _require(study_uid=study_uid)
    return f"{_part(ns)}/{_part(study_uid)}"


def person_key(ns: str, issuer: str | None, patient_id: str) -> str:
    """Id-map key of a patient: namespace + IssuerOfPatientID (0010,0021) + PatientID (0010,0020).

    Values are trimmed (LO values may be space padded) and compared exactly; the pair is hashed
    (SHA-256) so the persisted key is not the PatientID itself.
    """
    pid = (patient_id or "").strip()
    _require(patient_id=pid)
    digest = hashlib.sha256(json.dumps([(issuer or "").strip(), pid], ensure_ascii=False).encode()).hexdigest()
    return f"{_part(ns)}/person/sha256:{digest}"


def anonymous_person_key(ns: str, study_uid: str) -> str:
    """Person key for a study without PatientID: one person per study, never merged with another."""
    _require(study_uid=study_uid)
    return f"{_part(ns)}/person/study:{_part(study_uid)}"


def _require(**values: str) -> None:
    for name, value in values.items():
        if not value or not value.strip():
            raise ValueError(f"id-map key needs a non-empty {name}")


def assign_ids(existing: Mapping[str, int], keys: Iterable[str], *, max_id: int | None = None) -> dict[str, int]:
    """Ids for the keys not yet in ``existing``: ``max_id + 1, + 2, …`` in sorted key order.

    ``existing`` may be the whole map or only the part of it that holds ``keys``
    (what a lookup by key finds); ``max_id`` is then the largest id of the
    whole map, by default the largest of ``existing``. Returns only the new
    assignments (empty when every key is known), so calling it twice with the
    same keys and the updated map gives nothing new, and existing ids are
    never touched.
    """
    new_keys = sorted({k for k in keys if k not in existing})
    if any(not k for k in new_keys):
        raise ValueError("id-map keys must be non-empty")
    top = max(existing.values(), default=0)
    start = max(top, max_id or 0) + 1
    return {key: start + i for i, key in enumerate(new_keys)}


def find_conflicts(current: Mapping[str, int], proposed: Mapping[str, int]) -> list[str]:
    """Keys of ``proposed`` that collide with ``current``: the key is already mapped to another id,
    or the id is already used by another key (a concurrent writer got there first). Sorted."""
    used: dict[int, str] = {v: k for k, v in current.items()}
    bad = {k for k, v in proposed.items() if (k in current and current[k] != v) or used.get(v, k) != k}
    seen: dict[int, str] = {}
    for k, v in sorted(proposed.items()):
        if v in seen:
            bad.update((k, seen[v]))
        seen[v] = k
    return sorted(bad)


def id_rows(assigned: Mapping[str, int], created: datetime) -> list[dict[str, Any]]:
    """Rows for an id-map table (``IDMAP_SCHEMA``: ``key, id, createdDatetime``), sorted by id."""
    return [{"key": k, "id": v, "createdDatetime": created} for k, v in sorted(assigned.items(), key=lambda kv: kv[1])]


@dataclass(frozen=True)
class IdLookup:
    """The ids already assigned for the keys a mapping call needs (a subset of each id map is enough)."""

    image_occurrence: Mapping[str, int] = field(default_factory=dict)
    person: Mapping[str, int] = field(default_factory=dict)
    procedure_occurrence: Mapping[str, int] = field(default_factory=dict)

    def image_occurrence_id(self, key: str) -> int:
        return _get(self.image_occurrence, "image_occurrence_id", key)

    def person_id(self, key: str) -> int:
        return _get(self.person, "person_id", key)

    def procedure_occurrence_id(self, key: str) -> int:
        return _get(self.procedure_occurrence, "procedure_occurrence_id", key)


def _get(ids: Mapping[str, int], column: str, key: str) -> int:
    try:
        return ids[key]
    except KeyError:
        raise ValueError(f"no {column} assigned for key {key!r}; assign ids before mapping") from None
