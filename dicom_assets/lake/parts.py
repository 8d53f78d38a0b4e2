"""Parquet part files of a Delta table and their Delta statistics, written without delta-rs.

A process-pool helper or a Spark executor writes its batch with
:func:`write_part_file` straight into the table folder and returns the small
record it gives back; one coordinator turns the records into ``add`` actions
and commits them (:mod:`dicom_assets.lake.delta_commit`). This module imports
pyarrow and its Parquet writer only (not delta-rs, not ``pyarrow.compute``),
because a pool helper imports it while it starts, and start-up is paid in wall
time on every pool run (:mod:`dicom_assets.engines.helper`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

#: String statistics keep this many characters, as Delta Spark's default
#: ``dataSkippingStringPrefixLength``; longer maxima are rounded up.
STATS_STRING_PREFIX = 32

#: Columns whose min/max statistics delta-rs records, per table. By default it
#: stops at the first 32 columns, which misses ``ingestDate`` in the wide
#: metastore; day and UID filters then could not skip files.
STATS_COLUMNS: dict[str, str] = {
    "dicomimagingmetastore": "ingestDate,sourceSystem,studyInstanceUid,seriesInstanceUid,sopInstanceUid,filePath,contentSha256",
    "ImagingMetastore": "studyInstanceUid,seriesInstanceUid,sopInstanceUid,msftSourceSystem,ingestDate,imagingStudyId,sourceModifiedAt,contentSha256",
}


#: Columns written without dictionary encoding: a value per instance or per
#: file (UIDs of instances, paths, hashes, DICOM and FHIR JSON). Their
#: dictionary holds every value of the row group (up to 1 MB, then the writer
#: falls back to plain anyway), and a reader streaming the file keeps it
#: decoded: a silver file read 128 rows at a time held 5.4 MB, 3.4 MB without.
NO_DICTIONARY = frozenset(
    {"metadata_string", "sopInstanceUid", "contentSha256", "filePath", "originalPath", "msftFilePath", "fhirContent", "series_string"}
)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` written with dictionary encoding (all but :data:`NO_DICTIONARY`)."""
    return [n for n in schema.names if n not in NO_DICTIONARY]


#: Rows a Parquet writer takes at a time. A page is closed only between
#: batches, so with the writers' default (1,024) a page of DICOM JSON held
#: about 7 MB; at 128 rows it is near the 1 MB page size, and a reader that
#: streams rows (:mod:`dicom_assets.lake.cluster`) holds that much per file.
WRITE_BATCH_ROWS = 128


def write_part_file(table_dir: str | Path, table: pa.Table, *, row_group_rows: int | None = None) -> dict[str, Any]:
    """Write ``table`` as one Parquet file into the table folder; return its part record.

    The record holds what a Delta ``add`` action needs: ``path`` (relative to
    the folder), ``size``, ``modification_time`` (ms) and ``stats`` (JSON).
    The file is named ``part-<uuid4>.parquet`` (unique across writers and
    retries), fsynced before the record is returned, and described by Delta
    statistics (``numRecords``, ``minValues``/``maxValues``/``nullCount`` of the
    top-level primitive columns) so readers can skip it. It is invisible to
    readers until a commit adds it. ``row_group_rows`` cuts it into row groups
    of that many rows (one row group by default).
    """
    return write_part_pieces(table_dir, [table], table.schema, row_group_rows=row_group_rows)


def write_part_pieces(
    table_dir: str | Path, pieces: Iterable[pa.Table], schema: pa.Schema, *, row_group_rows: int | None = None
) -> dict[str, Any]:
    """:func:`write_part_file` of the rows of ``pieces`` (each with ``schema``), written as they come.

    Of the pieces only the columns whose extremes go into the statistics are
    kept until the file is closed (the others' nulls are counted as they
    pass), so a file far larger than memory allows can be written a row
    group at a time (:mod:`dicom_assets.lake.cluster`, the bronze
    ImagingStudy day).
    """
    folder = Path(table_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4()}.parquet"
    path = folder / name
    listed = stats_columns(folder)
    counted = [f for f in schema if _is_primitive(f.type) and (listed is None or f.name in listed)]
    extremes = [f.name for f in counted if _has_minmax(f.type)]
    # Of the other columns (an instance's or a resource's JSON) the statistics
    # hold a null count only, so pieces are not kept whole until the end.
    nulls_only = {f.name: 0 for f in counted if not _has_minmax(f.type)}
    kept: list[pa.Table] = []
    with open(path, "wb") as fh:
        with pq.ParquetWriter(
            fh, schema, compression="snappy", write_statistics=True, write_batch_size=WRITE_BATCH_ROWS,
            use_dictionary=dictionary_columns(schema),
        ) as writer:
            for piece in pieces:
                writer.write_table(piece, row_group_size=row_group_rows)
                kept.append(piece.select(extremes))
                for c in nulls_only:
                    nulls_only[c] += piece.column(c).null_count
        fh.flush()
        os.fsync(fh.fileno())
    st = path.stat()
    stats = part_stats(pa.concat_tables(kept) if kept else schema.empty_table().select(extremes), listed)
    stats["nullCount"] = {f.name: stats["nullCount"].get(f.name, nulls_only.get(f.name, 0)) for f in counted}
    return {
        "path": name,
        "size": int(st.st_size),
        "modification_time": int(st.st_mtime * 1000),
        "stats": json.dumps(stats, separators=(",", ":")),
    }


def stats_columns(folder: Path) -> list[str] | None:
    """The columns whose statistics the table at ``folder`` collects (``None``: all primitive ones)."""
    listed = STATS_COLUMNS.get(folder.name)
    return listed.split(",") if listed else None


def part_stats(table: pa.Table, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """Delta file statistics of ``table`` (PROTOCOL.md "Per-file Statistics").

    ``columns`` limits them to those columns, as a table's
    ``delta.dataSkippingStatsColumns`` asks writers to: on the wide metastore,
    statistics of every column made each ``add`` action about 4 kB, so the
    log of a 100,000-file day was 6.5 MB, read whenever the table is opened.
    Large strings (``metadata_string``) and lists only get a null count when
    primitive: their extremes are useless for skipping and costly to store.
    Timestamps are written at millisecond precision, minimum floored and
    maximum rounded up, so the bounds stay true bounds. NaN is left out of
    float extremes (an all-NaN column has none), as Arrow's ``min_max`` does.
    """
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    keep = set(columns) if columns is not None else None
    for field in table.schema:
        typ = field.type
        if not _is_primitive(typ) or (keep is not None and field.name not in keep):
            continue
        col = table.column(field.name)
        nulls[field.name] = int(col.null_count)
        if col.null_count == len(col) or not _has_minmax(typ):
            continue
        extremes = _min_max(col)
        if extremes is None:
            continue
        lo, hi = extremes
        lo_s, hi_s = _stat_value(typ, lo, upper=False), _stat_value(typ, hi, upper=True)
        if lo_s is not None:
            mins[field.name] = lo_s
        if hi_s is not None:
            maxs[field.name] = hi_s
    return {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}


def _min_max(col: pa.ChunkedArray) -> tuple[Any, Any] | None:
    # Python's order of str is code-point order, which is the UTF-8 byte order
    # Arrow and Parquet use; batches are small, so this costs less than
    # importing pyarrow.compute in a starting helper.
    values = [v for v in col.to_pylist() if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return min(values), max(values)


def _is_primitive(typ: pa.DataType) -> bool:
    return not (bool(pa.types.is_nested(typ)) or bool(pa.types.is_dictionary(typ)))


def _has_minmax(typ: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(typ)
        or pa.types.is_integer(typ)
        or pa.types.is_floating(typ)
        or pa.types.is_timestamp(typ)
        or pa.types.is_date(typ)
    )


def _stat_value(typ: pa.DataType, value: Any, *, upper: bool) -> Any:
    if pa.types.is_string(typ):
        text = str(value)
        if len(text) <= STATS_STRING_PREFIX:
            return text
        prefix = text[:STATS_STRING_PREFIX]
        return _round_up(prefix) if upper else prefix
    if pa.types.is_floating(typ):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if pa.types.is_timestamp(typ):
        return _ts_stat(value, upper=upper, utc=typ.tz is not None)
    if pa.types.is_date(typ):
        return value.isoformat()
    return int(value)


def _round_up(prefix: str) -> str | None:
    """Smallest string above every string starting with ``prefix`` (None if there is none)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code == 0xD800:
            code = 0xE000  # skip surrogates: not valid in UTF-8
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def _ts_stat(value: _dt.datetime, *, upper: bool, utc: bool) -> str:
    if upper and value.microsecond % 1000:
        value = value + _dt.timedelta(microseconds=1000 - value.microsecond % 1000)
    value = value.replace(microsecond=value.microsecond - value.microsecond % 1000)
    if value.tzinfo is not None:
        value = value.astimezone(_dt.UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}" + ("Z" if utc else "")


