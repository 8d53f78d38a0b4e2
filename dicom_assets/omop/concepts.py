"""OMOP concept ids for DICOM values: editable CSV maps, optionally resolved in an Athena vocabulary.

Two maps ship in ``data/`` (SPEC §3.5), one row per value with the citation in ``source``:

* ``omop_modality_concepts.csv`` — ``modality_code, concept_id, vocabulary_id, concept_code, source``:
  Modality (0008,0060) → ``image_occurrence.modality_concept_id``. ``vocabulary_id``/``concept_code``
  name the vocabulary concept that stands for the code (MI-CDM's DICOM vocabulary encodes a modality
  as ``vocabulary_id 'DICOM'``, ``concept_code`` = the defined term, e.g. ``CT``, a non-standard
  concept that ``Maps to`` a standard procedure concept).
* ``omop_body_part_concepts.csv`` — ``body_part_examined, snomed_code, concept_id, source``:
  Body Part Examined (0018,0015) → SNOMED CT code (PS3.16 Annex L Table L-1) →
  ``image_occurrence.anatomic_site_concept_id``.

Resolution order, the same for every value: (1) the Athena vocabulary when ``vocabulary_dir`` is set
(the concept named by the map row, else the DICOM/SNOMED concept whose ``concept_code`` is the value;
a non-standard concept follows ``Maps to``); (2) the map's ``concept_id``; (3) ``0`` ("No matching
concept"). The caller always keeps the source value, so nothing is lost when the id is ``0``.

The vocabulary reader (:class:`Vocabulary`) streams Athena's tab-separated ``CONCEPT.csv`` and
``CONCEPT_RELATIONSHIP.csv`` line by line and keeps only what a resolver can ask for (the DICOM
vocabulary, SNOMED ``Spec Anatomic Site`` concepts and the codes the maps name, plus their
``Maps to`` rows), so a full 5-million-concept download never sits in memory.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: OMOP "No matching concept".
NO_MATCHING_CONCEPT = 0
DICOM_VOCABULARY = "DICOM"
SNOMED_VOCABULARY = "SNOMED"
#: OMOP domain of SNOMED body structures (MI-CDM: anatomic_site_concept_id is in this domain).
SPEC_ANATOMIC_SITE = "Spec Anatomic Site"

MODALITY_COLUMNS = ("modality_code", "concept_id", "vocabulary_id", "concept_code", "source")
BODY_PART_COLUMNS = ("body_part_examined", "snomed_code", "concept_id", "source")
CONCEPT_COLUMNS = (
    "concept_id",
    "domain_id",
    "vocabulary_id",
    "concept_class_id",
    "standard_concept",
    "concept_code",
    "invalid_reason",
)
RELATIONSHIP_COLUMNS = ("concept_id_1", "concept_id_2", "relationship_id", "invalid_reason")


def normalise_code(value: str | None) -> str | None:
    """A CS value as a lookup key: trimmed, upper case (CS is upper case, PS3.5 §6.2); empty → ``None``."""
    if value is None:
        return None
    key = value.strip().upper()
    return key or None


@dataclass(frozen=True)
class ModalityRow:
    """One row of the modality map."""

    modality_code: str
    concept_id: int
    vocabulary_id: str
    concept_code: str
    source: str


@dataclass(frozen=True)
class BodyPartRow:
    """One row of the body part map."""

    body_part_examined: str
    snomed_code: str
    concept_id: int
    source: str


def _read_map(path: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    if not path:
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(columns)}")
        return [(n, {k: (v or "").strip() for k, v in row.items() if k}) for n, row in enumerate(reader, start=2)]


def _concept_id(path: str, line: int, raw: str) -> int:
    try:
        return int(raw) if raw else NO_MATCHING_CONCEPT
    except ValueError:
        raise ValueError(f"{path} line {line}: concept_id {raw!r} is not an integer") from None


def read_modality_map(path: str) -> dict[str, ModalityRow]:
    """Read the modality map CSV (columns :data:`MODALITY_COLUMNS`), keyed by normalised modality code."""
    out: dict[str, ModalityRow] = {}
    for line, row in _read_map(path, MODALITY_COLUMNS):
        key = normalise_code(row["modality_code"])
        if key is None:
            continue
        out[key] = ModalityRow(
            key, _concept_id(path, line, row["concept_id"]), row["vocabulary_id"], row["concept_code"], row["source"]
        )
    return out


def read_body_part_map(path: str) -> dict[str, BodyPartRow]:
    """Read the body part map CSV (columns :data:`BODY_PART_COLUMNS`), keyed by normalised defined term."""
    out: dict[str, BodyPartRow] = {}
    for line, row in _read_map(path, BODY_PART_COLUMNS):
        key = normalise_code(row["body_part_examined"])
        if key is None:
            continue
        out[key] = BodyPartRow(key, row["snomed_code"], _concept_id(path, line, row["concept_id"]), row["source"])
    return out


@dataclass(frozen=True)
class VocabularyConcept:
    """The CONCEPT.csv columns a resolver needs."""

    concept_id: int
    vocabulary_id: str
    concept_code: str
    domain_id: str
    concept_class_id: str
    standard: bool
    valid: bool


class Vocabulary:
    """The part of an Athena vocabulary a :class:`ConceptResolver` can ask for."""

    def __init__(self, concepts: Iterable[VocabularyConcept], maps_to: Mapping[int, Iterable[int]]) -> None:
        self._by_code: dict[tuple[str, str], list[VocabularyConcept]] = {}
        for c in concepts:
            self._by_code.setdefault((c.vocabulary_id, c.concept_code), []).append(c)
        self._maps_to = {k: sorted(set(v)) for k, v in maps_to.items()}
        for candidates in self._by_code.values():
            # Codes can repeat within a vocabulary (MI-CDM's DICOM vocabulary lists 'CT' both as a
            # PS3.16 value and as a PS3.3 modality); the usable one is the mapped, valid, oldest id.
            candidates.sort(
                key=lambda c: (not (c.standard or c.concept_id in self._maps_to), not c.valid, c.concept_id)
            )

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_code.values())

    def lookup(self, vocabulary_id: str, concept_code: str) -> VocabularyConcept | None:
        """The best concept with this code in this vocabulary (codes compare exactly), or ``None``."""
        candidates = self._by_code.get((vocabulary_id, concept_code))
        return candidates[0] if candidates else None

    def standard_id(self, concept: VocabularyConcept) -> int:
        """The concept itself when standard and valid, else its ``Maps to`` target, else ``0``."""
        if concept.standard and concept.valid:
            return concept.concept_id
        targets = self._maps_to.get(concept.concept_id)
        return targets[0] if targets else NO_MATCHING_CONCEPT

    @classmethod
    def load(cls, directory: str | Path, codes: Mapping[str, Iterable[str]] | None = None) -> Vocabulary:
        """Stream an Athena download's ``CONCEPT.csv`` and ``CONCEPT_RELATIONSHIP.csv`` (tab-separated).

        Kept: every DICOM concept, every SNOMED ``Spec Anatomic Site`` concept, and the concepts whose
        code is listed in ``codes`` (``{vocabulary_id: codes}``); then the valid ``Maps to`` rows
        leaving a kept concept. Cached per folder, file size/mtime and ``codes``.
        """
        folder = Path(directory)
        concept_file, relationship_file = (
            _athena_file(folder, "CONCEPT.csv"),
            _athena_file(folder, "CONCEPT_RELATIONSHIP.csv"),
        )
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (concept_file, relationship_file))
        wanted = frozenset((v, c) for v, cs in (codes or {}).items() for c in cs)
        return _load_cached(stamp, wanted)


def _athena_file(folder: Path, name: str) -> Path:
    if not folder.is_dir():
        raise ValueError(f"OMOP vocabulary folder {folder} does not exist")
    for candidate in folder.iterdir():
        if candidate.name.lower() == name.lower():
            return candidate
    raise ValueError(f"OMOP vocabulary folder {folder} has no {name} (Athena download expected)")


def _columns(path: Path, header: str, wanted: tuple[str, ...]) -> list[int]:
    names = [h.strip().lower() for h in header.rstrip("\r\n").split("\t")]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"{path}: not an Athena tab-separated file, missing column(s) {missing}")
    return [names.index(w) for w in wanted]


@lru_cache(maxsize=4)
def _load_cached(stamp: tuple[tuple[str, int, int], ...], wanted: frozenset[tuple[str, str]]) -> Vocabulary:
    concept_path, relationship_path = Path(stamp[0][0]), Path(stamp[1][0])
    vocabularies = {DICOM_VOCABULARY, SNOMED_VOCABULARY} | {v for v, _ in wanted}
    # Substring tests run in C and skip most of a 5M-line file before any split.
    markers = tuple(f"\t{v}\t" for v in vocabularies)
    concepts: list[VocabularyConcept] = []
    kept_ids: set[str] = set()
    # Athena files are tab-separated without quoting; names may hold quotes, so no csv module here.
    with open(concept_path, encoding="utf-8", newline="") as fh:
        cid, dom, voc, cls_, std, code, inv = _columns(concept_path, fh.readline(), CONCEPT_COLUMNS)
        width = max(cid, dom, voc, cls_, std, code, inv) + 1
        for line in fh:
            if not any(m in line for m in markers):
                continue
            f = line.rstrip("\r\n").split("\t")
            if len(f) < width:
                continue
            vocabulary_id, concept_code = f[voc], f[code]
            keep = (
                vocabulary_id == DICOM_VOCABULARY
                or (vocabulary_id == SNOMED_VOCABULARY and f[dom] == SPEC_ANATOMIC_SITE)
                or (vocabulary_id, concept_code) in wanted
            )
            if not keep or not f[cid].strip().lstrip("-").isdigit():
                continue
            concepts.append(
                VocabularyConcept(
                    int(f[cid]), vocabulary_id, concept_code, f[dom], f[cls_], f[std].strip() == "S", not f[inv].strip()
                )
            )
            kept_ids.add(f[cid].strip())
    maps_to: dict[int, list[int]] = {}
    with open(relationship_path, encoding="utf-8", newline="") as fh:
        c1, c2, rel, inv = _columns(relationship_path, fh.readline(), RELATIONSHIP_COLUMNS)
        width = max(c1, c2, rel, inv) + 1
        for line in fh:
            if "Maps to" not in line:
                continue
            f = line.rstrip("\r\n").split("\t")
            if len(f) < width or f[rel] != "Maps to" or f[inv].strip() or f[c1].strip() not in kept_ids:
                continue
            maps_to.setdefault(int(f[c1]), []).append(int(f[c2]))
    return Vocabulary(concepts, maps_to)


class ConceptResolver:
    """Resolves DICOM modality and body part values to OMOP concept ids (see module docstring)."""

    def __init__(
        self,
        modality_map: Mapping[str, ModalityRow],
        body_part_map: Mapping[str, BodyPartRow],
        vocabulary: Vocabulary | None = None,
    ) -> None:
        self.modality_map = dict(modality_map)
        self.body_part_map = dict(body_part_map)
        self.vocabulary = vocabulary
        self._body_part_by_snomed: dict[str, BodyPartRow] = {}
        for row in self.body_part_map.values():
            if row.snomed_code and row.concept_id:
                self._body_part_by_snomed.setdefault(row.snomed_code, row)

    @classmethod
    def from_settings(cls, modality_map: str, body_part_map: str, vocabulary_dir: str = "") -> ConceptResolver:
        """Build from the settings' map paths (``Settings.modality_concept_map``, ``body_part_concept_map``)
        and optional Athena folder (``Settings.omop_vocabulary_dir``)."""
        modalities = read_modality_map(modality_map)
        body_parts = read_body_part_map(body_part_map)
        vocabulary = None
        if vocabulary_dir:
            codes: dict[str, set[str]] = {
                SNOMED_VOCABULARY: {r.snomed_code for r in body_parts.values() if r.snomed_code}
            }
            for r in modalities.values():
                if r.vocabulary_id and r.concept_code:
                    codes.setdefault(r.vocabulary_id, set()).add(r.concept_code)
            vocabulary = Vocabulary.load(vocabulary_dir, codes)
        return cls(modalities, body_parts, vocabulary)

    def modality(self, code: str | None) -> tuple[int, int]:
        """Modality (0008,0060) → ``(modality_concept_id, modality_source_concept_id)``.

        The source concept is the vocabulary concept standing for the code (MI-CDM: DICOM vocabulary,
        ``concept_code`` = the defined term), ``0`` without one; the concept id is its standard
        ``Maps to`` target, else the map's ``concept_id``, else ``0``.
        """
        key = normalise_code(code)
        if key is None:
            return NO_MATCHING_CONCEPT, NO_MATCHING_CONCEPT
        row = self.modality_map.get(key)
        source_id, standard_id = NO_MATCHING_CONCEPT, NO_MATCHING_CONCEPT
        if self.vocabulary is not None:
            named = (row.vocabulary_id, row.concept_code) if row and row.vocabulary_id and row.concept_code else None
            concept = self.vocabulary.lookup(*named) if named else None
            if concept is None:
                concept = self.vocabulary.lookup(DICOM_VOCABULARY, key)
            if concept is not None:
                source_id, standard_id = concept.concept_id, self.vocabulary.standard_id(concept)
        if not standard_id and row is not None:
            standard_id = row.concept_id
        return standard_id, source_id

    def snomed_code(self, body_part: str | None) -> str | None:
        """Body Part Examined (0018,0015) → SNOMED CT code of PS3.16 Annex L Table L-1 via the map."""
        key = normalise_code(body_part)
        row = self.body_part_map.get(key) if key else None
        return (row.snomed_code or None) if row else None

    def anatomic_site(self, body_part: str | None, snomed_code: str | None) -> int:
        """Body site → ``anatomic_site_concept_id`` (standard SNOMED concept, domain Spec Anatomic Site).

        ``snomed_code`` (e.g. ImagingStudy ``series.bodySite.code``) wins over the code the map gives
        for ``body_part`` (Body Part Examined); ``0`` when neither resolves.
        """
        code = (snomed_code or "").strip() or self.snomed_code(body_part)
        if code and self.vocabulary is not None:
            concept = self.vocabulary.lookup(SNOMED_VOCABULARY, code)
            standard_id = self.vocabulary.standard_id(concept) if concept else NO_MATCHING_CONCEPT
            if standard_id:
                return standard_id
        key = normalise_code(body_part)
        row = self.body_part_map.get(key) if key else None
        if row is not None and row.concept_id and (not code or row.snomed_code in ("", code)):
            return row.concept_id
        by_code = self._body_part_by_snomed.get(code) if code else None
        return by_code.concept_id if by_code else NO_MATCHING_CONCEPT
