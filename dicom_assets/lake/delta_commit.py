"""Write Parquet part files anywhere, then replace one day of a Delta table in ONE commit.

Engines whose workers write their own output (Spark executors, a process
pool) cannot stream through a single ``write_deltalake`` call. They call
:func:`write_part` where the data is, ship the small :class:`AddAction`
records to one coordinator, and that coordinator calls :func:`commit_replace`,
which is Delta's ``replaceWhere <column> = <day>`` done by hand with delta-rs:

* delta-rs 1.6 ``create_write_transaction(mode="overwrite")`` replaces the whole
  table (the tables are not partitioned, so ``partition_filters`` cannot narrow
  it) and offers no predicate. So the commit is ``mode="append"`` carrying the
  new files' ``add`` actions plus a ``remove`` for every live file that holds
  only rows of that day. A file mixing days (only after an ``OPTIMIZE``) is
  rewritten without the day's rows in the same commit.
* Which day a file holds comes from its Delta statistics when the table
  collects them for the column; the metastore's ``ingestDate`` is past the
  default first-32-columns limit, so otherwise it comes from the Parquet
  footer (row-group statistics), and only if those are missing from reading
  that one column.
* Readers see the old day or the new day, never both. A concurrent commit that
  removed a file we remove makes delta-rs raise ``CommitFailedError``; the
  retry re-plans against the new snapshot (the part files are already
  written, so a retry costs a log read, not a re-extraction). Appends of other
  days commit side by side without conflict.

Only local-filesystem tables are supported (the lake is a folder, SPEC §2).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.transaction import AddAction, CommitProperties, RemoveAction

from dicom_assets.lake import delta
from dicom_assets.lake.fileops import crash_point

#: String statistics keep this many characters, as Delta Spark's default
#: ``dataSkippingStringPrefixLength``; longer maxima are rounded up.
STATS_STRING_PREFIX = 32

_ALL = "all"
_NONE = "none"
_MIXED = "mixed"


def table_dir(uri: str | Path) -> Path:
    """The local folder of a Delta table given as a path or ``file://`` URI."""
    text = str(uri)
    if text.startswith("file:"):
        return Path(unquote(urlparse(text).path))
    if "://" in text:
        raise ValueError(f"only local Delta tables are supported, got {text!r}")
    return Path(text)


def write_part(table_dir_: str | Path, table: pa.Table) -> AddAction:
    """Write ``table`` as one Parquet file into the table folder; return its ``add`` action.

    The file is named ``part-<uuid4>.parquet`` (unique across writers and
    retries), fsynced before the action is returned, and described by Delta
    statistics (``numRecords``, ``minValues``/``maxValues``/``nullCount`` of the
    top-level primitive columns) so readers can skip it. It is invisible to
    readers until a commit adds it.
    """
    folder = Path(table_dir_)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4()}.parquet"
    path = folder / name
    with open(path, "wb") as fh:
        pq.write_table(table, fh, compression="snappy", write_statistics=True)
        fh.flush()
        os.fsync(fh.fileno())
    st = path.stat()
    return AddAction(
        path=name,
        size=st.st_size,
        partition_values={},
        modification_time=int(st.st_mtime * 1000),
        data_change=True,
        stats=json.dumps(part_stats(table, stats_columns(folder)), separators=(",", ":")),
    )


def stats_columns(folder: Path) -> list[str] | None:
    """The columns whose statistics the table at ``folder`` collects (``None``: all primitive ones)."""
    listed = delta.STATS_COLUMNS.get(folder.name)
    return listed.split(",") if listed else None


def add_action_to_record(add: AddAction) -> dict[str, Any]:
    """A plain dict for shipping an :class:`AddAction` between processes."""
    return {
        "path": add.path,
        "size": int(add.size),
        "modification_time": int(add.modification_time),
        "stats": add.stats,
    }


def add_action_from_record(rec: dict[str, Any]) -> AddAction:
    """Inverse of :func:`add_action_to_record` (unpartitioned tables only)."""
    return AddAction(
        path=str(rec["path"]),
        size=int(rec["size"]),
        partition_values={},
        modification_time=int(rec["modification_time"]),
        data_change=True,
        stats=str(rec["stats"]),
    )


def part_stats(table: pa.Table, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """Delta file statistics of ``table`` (PROTOCOL.md "Per-file Statistics").

    ``columns`` limits them to those columns, as a table's
    ``delta.dataSkippingStatsColumns`` asks writers to: on the wide metastore,
    statistics of every column made each ``add`` action about 4 kB, so the
    log of a 100,000-file day was 6.5 MB, read whenever the table is opened.
    Large strings (``metadata_string``) and lists only get a null count when
    primitive: their extremes are useless for skipping and costly to store.
    Timestamps are written at millisecond precision, minimum floored and
    maximum rounded up, so the bounds stay true bounds.
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
        mm = pc.min_max(col)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if lo is None or hi is None:
            continue
        lo_s, hi_s = _stat_value(typ, lo, upper=False), _stat_value(typ, hi, upper=True)
        if lo_s is not None:
            mins[field.name] = lo_s
        if hi_s is not None:
            maxs[field.name] = hi_s
    return {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}


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


def commit_replace(
    uri: str | Path,
    schema: pa.Schema,
    adds: Sequence[AddAction],
    day: str,
    *,
    column: str = "ingestDate",
    retries: int = delta.COMMIT_RETRIES,
) -> None:
    """Replace every row with ``column = day`` by the rows of ``adds``, in one commit.

    ``adds`` are files already written into the table folder (:func:`write_part`)
    whose rows all have ``column = day``; an empty list deletes the day. The
    table is created with ``schema`` when absent and must otherwise have that
    schema. Conflicting commits are retried (:func:`delta.with_commit_retry`).
    """
    uri_s = str(uri)
    folder = table_dir(uri_s)
    for add in adds:
        if _day_state(folder / unquote(add.path), add.stats, column, day) != _ALL:
            raise ValueError(f"part {add.path} holds rows whose {column} is not {day!r}")
    delta.ensure_table(uri_s, schema)
    predicate = f"{column} = {delta.sql_literal(day)}"

    def attempt() -> None:
        dt = DeltaTable(uri_s)
        _check_table(dt, schema)
        removes, rewritten = _plan_removal(dt, folder, schema, column, day)
        actions: list[AddAction | RemoveAction] = [*adds, *rewritten, *removes]
        if not actions:
            return
        try:
            dt.create_write_transaction(
                actions,
                mode="append",
                schema=schema,
                commit_properties=CommitProperties(custom_metadata={"replaceWhere": predicate}),
            )
        except BaseException:
            for add in rewritten:
                (folder / add.path).unlink(missing_ok=True)
            raise

    label = delta.table_label(folder)
    crash_point(f"delta:before_commit:{label}")
    delta.with_commit_retry(attempt, retries=retries)
    crash_point(f"delta:after_commit:{label}")


def _check_table(dt: DeltaTable, schema: pa.Schema) -> None:
    meta = dt.metadata()
    if meta.partition_columns:
        raise NotImplementedError(f"partitioned tables are not supported ({meta.partition_columns})")
    if (meta.configuration or {}).get("delta.columnMapping.mode", "none") != "none":
        raise NotImplementedError("tables with column mapping are not supported")
    if "deletionVectors" in (dt.protocol().reader_features or []):
        raise NotImplementedError("tables with deletion vectors are not supported")
    if dt.schema() != DeltaSchema.from_arrow(schema):
        raise ValueError("the table's schema differs from the schema of the files to add")


def _plan_removal(
    dt: DeltaTable, folder: Path, schema: pa.Schema, column: str, day: str
) -> tuple[list[RemoveAction], list[AddAction]]:
    """``remove`` actions for the day's files, plus rewritten parts of mixed files."""
    files = pa.table(dt.get_add_actions(flatten=True))
    if files.num_rows == 0:
        return [], []
    names = set(files.column_names)
    lo_col, hi_col, nc_col = f"min.{column}", f"max.{column}", f"null_count.{column}"
    now_ms = int(time.time() * 1000)
    removes: list[RemoveAction] = []
    rewritten: list[AddAction] = []
    for row in files.to_pylist():
        path = folder / unquote(row["path"])
        stats = None
        if lo_col in names and hi_col in names:
            stats = {
                "numRecords": row.get("num_records"),
                "minValues": {column: row.get(lo_col)},
                "maxValues": {column: row.get(hi_col)},
                "nullCount": {column: row.get(nc_col)} if nc_col in names else {},
            }
        state = _day_state(path, json.dumps(stats) if stats else None, column, day)
        if state == _NONE:
            continue
        removes.append(RemoveAction(row["path"], True, now_ms, int(row["size_bytes"]), {}))
        if state == _MIXED:
            kept = pq.read_table(path)
            mask = pc.fill_null(pc.not_equal(kept.column(column), pa.scalar(day)), True)
            rewritten.append(write_part(folder, delta.conform(kept.filter(mask), schema)))
    return removes, rewritten


def _day_state(path: Path, stats_json: str | None, column: str, day: str) -> str:
    """Whether the file's ``column`` is ``day`` on all, none or some of its rows."""
    state = _state_from_stats(stats_json, column, day)
    if state is None:
        state = _state_from_footer(path, column, day)
    if state is None:
        values = pq.read_table(path, columns=[column]).column(column)
        hits = int(pc.sum(pc.equal(values, pa.scalar(day))).as_py() or 0)
        state = _NONE if hits == 0 else _ALL if hits == len(values) else _MIXED
    return state


def _state_from_stats(stats_json: str | None, column: str, day: str) -> str | None:
    if not stats_json:
        return None
    stats = json.loads(stats_json)
    n = stats.get("numRecords")
    nulls = (stats.get("nullCount") or {}).get(column)
    if n is not None and nulls is not None and nulls == n:
        return _NONE
    lo = (stats.get("minValues") or {}).get(column)
    hi = (stats.get("maxValues") or {}).get(column)
    if lo is None or hi is None:
        return None
    # Truncated bounds stay bounds, and a truncated value never equals the
    # full ``day``: both tests below hold for any writer's truncation.
    if day < lo or day > hi:
        return _NONE
    if lo == hi == day and nulls == 0:
        return _ALL
    return None


def _state_from_footer(path: Path, column: str, day: str) -> str | None:
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if column not in names:
        return _NONE  # column added after this file was written: all null
    idx = names.index(column)
    seen: set[str] = set()
    for g in range(meta.num_row_groups):
        cc = meta.row_group(g).column(idx)
        rows = meta.row_group(g).num_rows
        st = cc.statistics
        if rows == 0:
            continue
        if st is None or not st.has_null_count:
            return None
        if st.null_count == rows:
            seen.add(_NONE)
            continue
        if not st.has_min_max:
            return None
        lo, hi = _text(st.min), _text(st.max)
        if day < lo or day > hi:
            seen.add(_NONE)
        elif lo == hi == day and st.null_count == 0:
            seen.add(_ALL)
        else:
            return None
    if not seen or seen == {_NONE}:
        return _NONE
    return _ALL if seen == {_ALL} else _MIXED


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


__all__ = [
    "STATS_STRING_PREFIX",
    "add_action_from_record",
    "add_action_to_record",
    "commit_replace",
    "part_stats",
    "table_dir",
    "write_part",
]
