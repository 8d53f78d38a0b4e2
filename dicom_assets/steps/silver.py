"""Silver step: merge the day's bronze rows into ``ImagingMetastore`` (SPEC §3.3)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dicom_assets.fhir.identity import imaging_study_id
from dicom_assets.lake import delta
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import METASTORE_SCHEMA, SILVER_METASTORE_SCHEMA

#: The instance key of SPEC §3.3.
INSTANCE_KEY = ("studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "msftSourceSystem")

#: The later file wins; on equal times the larger content hash, and for the
#: same bytes at the same time (one file dropped twice under two names) the
#: smaller original path, so the outcome, lineage included, does not depend on
#: the order in which files or days arrive. The same file dropped again at the
#: same place changes nothing.
NEWER = (
    "(s.sourceModifiedAt > t.sourceModifiedAt) OR "
    "(s.sourceModifiedAt = t.sourceModifiedAt AND s.contentSha256 > t.contentSha256) OR "
    "(s.sourceModifiedAt = t.sourceModifiedAt AND s.contentSha256 = t.contentSha256 AND s.originalPath < t.originalPath)"
)


@dataclass(frozen=True)
class SilverResult:
    bronze_rows: int
    instances: int
    inserted: int
    updated: int
    studies: list[tuple[str, str]]


def day_filter(day: str) -> pc.Expression:
    return pc.field("ingestDate") == day


def touched_studies(paths: LakePaths, day: str) -> list[tuple[str, str]]:
    """(namespace, StudyInstanceUID) of every study with a bronze row in ``day``."""
    t = delta.read_day(
        paths.table_uri("dicomimagingmetastore"), METASTORE_SCHEMA, day, columns=["sourceSystem", "studyInstanceUid"]
    )
    pairs = {(ns, uid) for ns, uid in zip(t.column("sourceSystem").to_pylist(), t.column("studyInstanceUid").to_pylist(), strict=False) if uid}
    return sorted(pairs)


def pick_latest(rows: pa.Table) -> pa.Table:
    """One row per instance key, chosen as :data:`NEWER` chooses: later ``sourceModifiedAt``,
    then larger ``contentSha256``, then smaller ``originalPath``."""
    if rows.num_rows == 0:
        return rows
    order = rows.sort_by(
        [
            ("sourceModifiedAt", "descending"),
            ("contentSha256", "descending"),
            ("originalPath", "ascending"),
            ("filePath", "ascending"),
        ]
    )
    keys = zip(*(order.column(c).to_pylist() for c in ("studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "sourceSystem")), strict=False)
    seen: set[tuple[Any, ...]] = set()
    keep: list[int] = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return order.take(pa.array(keep, pa.int64()))


def to_silver(bronze: pa.Table, now: datetime) -> pa.Table:
    """Bronze rows → silver rows with Fabric lineage columns and the study's FHIR id.

    Missing Study/Series UIDs become '' so the instance key is never NULL (a
    NULL never equals itself in a merge and would duplicate on every run).
    """
    n = bronze.num_rows
    cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    for f in SILVER_METASTORE_SCHEMA:
        if f.name in bronze.column_names:
            cols[f.name] = bronze.column(f.name)
    for k in ("studyInstanceUid", "seriesInstanceUid"):
        cols[k] = pc.fill_null(bronze.column(k), "")
    ns = bronze.column("sourceSystem").to_pylist()
    studies = cols["studyInstanceUid"].to_pylist()
    cols["imagingStudyId"] = pa.array(
        [imaging_study_id(a, b) if b else None for a, b in zip(ns, studies, strict=False)], pa.string()
    )
    ts = pa.array([now] * n, SILVER_METASTORE_SCHEMA.field("msftCreatedDatetime").type)
    cols["msftCreatedDatetime"] = ts
    cols["msftModifiedDatetime"] = ts
    cols["msftFilePath"] = bronze.column("filePath")
    cols["msftSourceSystem"] = bronze.column("sourceSystem")
    return delta.conform(pa.table(cols), SILVER_METASTORE_SCHEMA)


def merge_instances(paths: LakePaths, day: str, *, now: datetime | None = None) -> SilverResult:
    """Asset 3: dedupe the day's bronze rows and merge them into silver on the instance key."""
    now = now or datetime.now(UTC)
    bronze = delta.read_day(paths.table_uri("dicomimagingmetastore"), METASTORE_SCHEMA, day)
    latest = pick_latest(bronze)
    silver = to_silver(latest, now)
    update_cols = {f.name: f"s.`{f.name}`" for f in SILVER_METASTORE_SCHEMA if f.name != "msftCreatedDatetime"}
    metrics = delta.merge(
        paths.table_uri("ImagingMetastore"),
        silver,
        SILVER_METASTORE_SCHEMA,
        keys=INSTANCE_KEY,
        update_predicate=NEWER,
        update_columns=update_cols,
    )
    studies = sorted({(a, b) for a, b in zip(silver.column("msftSourceSystem").to_pylist(), silver.column("studyInstanceUid").to_pylist(), strict=False) if b})
    return SilverResult(
        bronze_rows=bronze.num_rows,
        instances=silver.num_rows,
        inserted=int(metrics.get("num_target_rows_inserted", 0)),
        updated=int(metrics.get("num_target_rows_updated", 0)),
        studies=studies,
    )


def study_instances(paths: LakePaths, studies: list[tuple[str, str]], columns: list[str] | None = None) -> pa.Table:
    """Every silver instance of the given studies (all days), for whole-study rebuilds."""
    uids = sorted({uid for _ns, uid in studies})
    t = delta.read_in(paths.table_uri("ImagingMetastore"), SILVER_METASTORE_SCHEMA, "studyInstanceUid", uids, columns=columns)
    wanted = set(studies)
    if t.num_rows == 0:
        return t
    mask = [(a, b) in wanted for a, b in zip(t.column("msftSourceSystem").to_pylist(), t.column("studyInstanceUid").to_pylist(), strict=False)]
    return t.filter(pa.array(mask))
