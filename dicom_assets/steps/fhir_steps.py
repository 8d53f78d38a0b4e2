"""FHIR steps (SPEC §3.4): ImagingStudy NDJSON files, bronze rows and silver rows."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa

from dicom_assets.fhir import mapping, ndjson, validate
from dicom_assets.fhir.flatten import bronze_row, flatten_imaging_study
from dicom_assets.lake import delta, delta_commit, delta_read, parts, rewrite
from dicom_assets.lake.arrow_memory import release_unused_memory
from dicom_assets.lake.locks import lake_lock
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import BRONZE_IMAGINGSTUDY_SCHEMA, SILVER_IMAGINGSTUDY_SCHEMA
from dicom_assets.steps.silver import study_instances, touched_studies

MAX_PER_FILE = 1000
#: Studies whose silver instances are held in memory at once.
STUDIES_PER_READ = 200


@dataclass(frozen=True)
class NdjsonResult:
    resources: int
    files: list[str]
    namespaces: dict[str, int]
    errors: dict[str, str]


def iter_resources(
    paths: LakePaths, studies: list[tuple[str, str]], errors: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """ImagingStudy resources of ``studies`` (one namespace), rebuilt from *all* their silver
    instances, validated, in StudyInstanceUID order; failures go to ``errors`` by study UID.

    ``meta.lastUpdated`` is the newest ``msftModifiedDatetime`` among the
    study's instances, so a rebuild with unchanged instances is identical. A
    study that cannot be mapped or fails validation is reported (strict
    writer: nothing invalid is written) without holding back the others.
    Studies are read :data:`STUDIES_PER_READ` at a time and each resource is
    written out before the next group is read, so memory holds one group
    whatever the day's size. UID order matches silver's sort order: a group's
    instances sit in a few neighbouring row groups (in hash order, every
    group touched nearly every row group: 16 GB read for a 100,000-file day).
    """
    ordered = sorted(studies)
    for start in range(0, len(ordered), STUDIES_PER_READ):
        group = ordered[start : start + STUDIES_PER_READ]
        rows_of: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        # The last group's rows (Python strings of DICOM JSON, ~7 KB each, on
        # the heap whatever the mmap threshold) were freed between longer-lived
        # blocks; handed back, the 100,000-instance day's step peaked at
        # 496 MiB instead of 535 (alone in one process; +0.4 s).
        release_unused_memory()
        for row in study_instances(paths, group).to_pylist():
            rows_of[(row["msftSourceSystem"], row["studyInstanceUid"])].append(row)
        for ns, uid in group:
            rows = rows_of.get((ns, uid))
            if not rows:
                continue
            try:
                last = max(r["msftModifiedDatetime"] for r in rows)
                res = mapping.build_imaging_study(rows, namespace=ns, last_updated=last)
                validate.validate_imaging_study(res, namespace=ns)
            except ValueError as exc:
                errors[uid] = str(exc)[:300]  # messages name UIDs and fields, never values
                continue
            yield res


def write_ndjson_files(paths: LakePaths, day: str) -> NdjsonResult:
    """Asset 4: rewrite the day's NDJSON files (≤ 1000 resources each), per namespace.

    Every study the day touched is rebuilt (:func:`iter_resources`) and
    streamed into its namespace's files.
    """
    by_ns: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ns, uid in touched_studies(paths, day):
        by_ns[ns].append((ns, uid))
    errors: dict[str, str] = {}
    counts: dict[str, int] = {}
    files: list[str] = []
    # Namespaces that had files but no longer have resources must be emptied too.
    root = paths.ndjson_root()
    existing_ns = {p.name for p in root.iterdir()} if root.exists() else set()
    for ns in sorted(existing_ns | set(by_ns)):
        folder = paths.ndjson_dir(ns, day)
        if ns not in by_ns and not folder.exists():
            continue
        counted = _Counted(iter_resources(paths, by_ns.get(ns, []), errors))
        written = ndjson.write_ndjson(counted, folder, max_per_file=MAX_PER_FILE)
        files.extend(str(p) for p in written)
        if counted.n:
            counts[ns] = counted.n
    return NdjsonResult(resources=sum(counts.values()), files=files, namespaces=counts, errors=errors)


class _Counted:
    """An iterator that counts what passes through it."""

    def __init__(self, items: Iterator[dict[str, Any]]) -> None:
        self.items, self.n = items, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in self.items:
            self.n += 1
            yield item


def ndjson_files_for_day(paths: LakePaths, day: str) -> list[tuple[str, Path]]:
    root = paths.ndjson_root()
    if not root.exists():
        return []
    out: list[tuple[str, Path]] = []
    for ns_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        folder = paths.ndjson_dir(ns_dir.name, day)
        if folder.exists():
            out.extend((ns_dir.name, f) for f in sorted(folder.glob("*.ndjson")))
    return out


def load_bronze(paths: LakePaths, day: str, *, now: datetime | None = None) -> int:
    """Asset 5: replace the day's bronze ``ImagingStudy`` rows with the day's NDJSON lines.

    The lines are parsed and written one NDJSON file (at most
    :data:`MAX_PER_FILE` resources) at a time, as the row groups of one part
    file, which then replaces the day in one commit
    (:func:`~dicom_assets.lake.delta_commit.commit_replace`, which removes
    the part if the commit fails): memory holds one NDJSON file's resources
    whatever the day's size.
    """
    now = now or datetime.now(UTC)
    uri = paths.table_uri("bronze_ImagingStudy")
    loaded = 0

    def pieces() -> Iterator[pa.Table]:
        nonlocal loaded
        for ns, f in ndjson_files_for_day(paths, day):
            with open(f, encoding="utf-8") as fh:
                rows = [
                    bronze_row(json.loads(line), source_system=ns, file_path=str(f), created=now, ingest_date=day)
                    for line in fh
                    if line.strip()
                ]
            if rows:
                loaded += len(rows)
                yield pa.Table.from_pylist(rows, schema=BRONZE_IMAGINGSTUDY_SCHEMA)

    folder = delta_commit.table_dir(uri)
    stream = pieces()
    first = next(stream, None)
    adds = [] if first is None else [
        delta_commit.add_action_from_record(parts.write_part_pieces(folder, chain([first], stream), BRONZE_IMAGINGSTUDY_SCHEMA))
    ]
    delta_commit.commit_replace(uri, BRONZE_IMAGINGSTUDY_SCHEMA, adds, day)
    return loaded


def _newer_and_changed(s: Mapping[str, Any], t: Mapping[str, Any]) -> bool:
    # As SQL's ``s.lastUpdated > t.lastUpdated AND s.fhirContent <> t.fhirContent``: NULL never compares.
    if None in (s["lastUpdated"], t["lastUpdated"], s["fhirContent"], t["fhirContent"]):
        return False
    return bool(s["lastUpdated"] > t["lastUpdated"] and s["fhirContent"] != t["fhirContent"])


#: A silver ImagingStudy row is replaced only by a newer ``meta.lastUpdated`` with other content.
NEWER_AND_CHANGED = rewrite.Rule(("lastUpdated", "fhirContent"), _newer_and_changed)


@dataclass(frozen=True)
class SilverStudyResult:
    studies: int
    inserted: int
    updated: int


#: Bronze resources flattened and merged per round of :func:`merge_silver`.
#: A silver row of a 100-instance study is ~80 kB in Arrow (its series and
#: instances three times: nested, as JSON, in the resource), so the
#: 100,000-instance day merged at once took ~390 MB; rounds bound that.
STUDIES_PER_ROUND = 500


#: Silver ImagingStudy's merge key. The id alone identifies a resource, and it is
#: derived from the study (``imaging_study_id(namespace, StudyInstanceUID)``), so
#: adding the UID matches the same rows; leading with it lets a lookup skip every
#: file whose UID range (a round of a day, in UID order) cannot hold the study.
#: By ``id`` alone, a new study opened every round file of every big day (all nine
#: of the 100,000-instance day in the benchmark), as ids are hashes.
SILVER_STUDY_KEY = ("studyInstanceUid", "id")


def merge_silver(paths: LakePaths, day: str, *, now: datetime | None = None) -> SilverStudyResult:
    """Asset 6: flatten the day's bronze resources and merge into silver on ``id`` (:data:`SILVER_STUDY_KEY`).

    A row is updated only when the incoming ``meta.lastUpdated`` is newer and
    the content differs, so ``msftModifiedDatetime`` moves only on real change
    and ``msftCreatedDatetime`` is never overwritten. The day is merged
    :data:`STUDIES_PER_ROUND` resources at a time, each round one
    :func:`~dicom_assets.lake.delta.upsert` (a day of more studies leaves
    one silver file per round, each a range of StudyInstanceUIDs, as the
    bronze rows come in that order). A day holds one resource per study and
    namespace, so the rounds end where one merge of the whole day would.
    """
    now = now or datetime.now(UTC)
    studies = inserted = updated = 0
    bronze_uri = paths.table_uri("bronze_ImagingStudy")
    for bronze in delta_read.iter_read(bronze_uri, BRONZE_IMAGINGSTUDY_SCHEMA, where={"ingestDate": day}, batch_rows=STUDIES_PER_ROUND):
        # Parsed resources are ~10x their JSON in Python objects: parse and
        # flatten STUDIES_PER_READ at a time, so only the Arrow tables grow.
        pieces = [SILVER_IMAGINGSTUDY_SCHEMA.empty_table()]
        for batch in bronze.to_batches(max_chunksize=STUDIES_PER_READ):
            rows = [
                flatten_imaging_study(
                    json.loads(b["fhirContent"]), source_system=b["sourceSystem"], file_path=b["filePath"], created=now, modified=now
                )
                for b in batch.to_pylist()
            ]
            pieces.append(pa.Table.from_pylist(rows, schema=SILVER_IMAGINGSTUDY_SCHEMA))
        del bronze
        table = pa.concat_tables(pieces)
        del pieces
        if table.column("studyInstanceUid").null_count:
            raise ValueError("an ImagingStudy resource without a StudyInstanceUID identifier cannot be merged into silver")
        metrics = delta.upsert(
            paths.table_uri("silver_ImagingStudy"),
            table,
            SILVER_IMAGINGSTUDY_SCHEMA,
            keys=SILVER_STUDY_KEY,
            lock=lambda: lake_lock(paths.state_dir, "silver_imagingstudy"),
            update_rule=NEWER_AND_CHANGED,
            keep_columns=["msftCreatedDatetime"],
        )
        studies += table.num_rows
        inserted += int(metrics.get("num_target_rows_inserted", 0))
        updated += int(metrics.get("num_target_rows_updated", 0))
    return SilverStudyResult(studies=studies, inserted=inserted, updated=updated)
