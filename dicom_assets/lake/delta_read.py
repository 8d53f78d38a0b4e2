"""Reads of Delta tables: files pruned by the log's statistics, then row groups by their footers.

A read with ``where`` first lets delta-rs skip the data files whose min/max
statistics rule them out; a file whose statistics show every row matching is
read whole, and any other only by its key columns first and then the matching
row groups (:mod:`dicom_assets.lake.rowgroups`). Writes and commits are in
:mod:`dicom_assets.lake.delta`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake.exceptions import TableNotFoundError

from dicom_assets.lake import rowgroups, snapshots
from dicom_assets.lake.fileops import shared_thread_pool
from dicom_assets.lake.schemas import conform

#: Values a ``where`` filter compares with: strings (UIDs, days) and integers (OMOP ids).
Scalar = str | int


def read(
    uri: str | Path,
    schema: pa.Schema | None = None,
    *,
    columns: Sequence[str] | None = None,
    where: Mapping[str, Scalar | Sequence[Scalar]] | None = None,
) -> pa.Table:
    """Read (part of) a table; an absent table reads as empty with ``schema``.

    ``where`` maps a column to a value or a list of values. delta-rs first
    skips files whose min/max statistics rule them out (a day's rows are read
    without scanning the whole table), then, per remaining file, only the
    ``where`` columns are read to find the matching rows, and the other
    columns only of the row groups that hold a match: the instances of one
    study are read from a 100,000-instance table without decoding the others'
    ``metadata_string``.
    """
    parts = [t for t in iter_read(uri, schema, columns=columns, where=where) if t.num_rows]
    if parts:
        return pa.concat_tables(parts)
    full = schema if schema is not None else pa.schema(snapshots.latest(uri).schema().to_arrow())
    return full.empty_table().select(list(columns)) if columns else full.empty_table()


def iter_read(
    uri: str | Path,
    schema: pa.Schema | None = None,
    *,
    columns: Sequence[str] | None = None,
    where: Mapping[str, Scalar | Sequence[Scalar]] | None = None,
    batch_rows: int | None = None,
) -> Iterator[pa.Table]:
    """:func:`read`, one table per data file, so a caller can bound its memory.

    With ``batch_rows``, tables of at most that many rows instead, each file
    streamed a batch at a time (:func:`rowgroups.iter_matching`): memory then
    holds one batch, not one file.
    """
    try:
        dt = snapshots.latest(uri)
    except TableNotFoundError:
        if schema is None:
            raise
        return
    full = pa.schema(dt.schema().to_arrow()) if schema is None else schema
    target = pa.schema([full.field(c) for c in columns]) if columns else full
    wanted = {c: [v] if isinstance(v, str | int) else list(v) for c, v in (where or {}).items()}
    prune = " AND ".join(
        f"`{c}` = {sql_literal(v[0])}" if len(v) == 1 else f"`{c}` IN ({', '.join(sql_literal(x) for x in v)})"
        for c, v in wanted.items()
    )
    # delta-rs's own dataset and its merge-written files use string_view, which
    # pyarrow cannot compare with string literals; reading each pruned file,
    # casting to the declared schema and filtering afterwards is exact and safe.
    files = dt.file_uris(file_pruning_predicate=prune) if prune else dt.file_uris()
    if not files:
        return
    sets = {c: pa.array(v, full.field(c).type) for c, v in wanted.items()}
    ordered = rowgroups.sorted_values(sets)
    if batch_rows:
        for f in files:
            yield from rowgroups.iter_matching(f, sets, full, target, ordered, batch_rows)
        return
    adds = pa.table(dt.get_add_actions(flatten=True))
    whole = _wholly_matching(adds, wanted, full) if wanted else set()

    def load(f: str) -> pa.Table | None:
        if not sets or os.path.basename(f) in whole:
            return conform(pq.read_table(f, columns=target.names), target)
        return rowgroups.matching_rows(f, sets, full, target, ordered)

    sizes = dict(zip((os.path.basename(unquote(p)) for p in adds.column("path").to_pylist()), adds.column("size_bytes").to_pylist(), strict=True))
    if len(files) > 1 and all(sizes.get(os.path.basename(f), READ_AHEAD_MAX_BYTES + 1) <= READ_AHEAD_MAX_BYTES for f in files):
        # Many small files (a day of extraction parts): pyarrow decodes
        # without the GIL, so a few read at once; order and memory stay bounded.
        pool = shared_thread_pool("delta-read", READ_AHEAD)
        ahead: deque[Future[pa.Table | None]] = deque()
        for f in files:
            ahead.append(pool.submit(load, f))
            if len(ahead) > READ_AHEAD:
                t = ahead.popleft().result()
                if t is not None:
                    yield t
        while ahead:
            t = ahead.popleft().result()
            if t is not None:
                yield t
        return
    for f in files:
        t = load(f)
        if t is not None:
            yield t


#: Data files up to this size are read :data:`READ_AHEAD` at a time by :func:`iter_read`.
READ_AHEAD_MAX_BYTES = 4 << 20
READ_AHEAD = 4


#: delta-rs cuts string statistics to this many characters; a value this long
#: might equal a truncated bound without equalling the rows.
_STATS_PREFIX = 32


def _wholly_matching(adds: pa.Table, wanted: Mapping[str, list[Any]], full: pa.Schema) -> set[str]:
    """Names of data files every row of which matches ``wanted``, by the log's statistics.

    A file qualifies when, for each column, its min equals its max, that value
    is wanted and it has no nulls (a day's extraction part files, for the
    ``ingestDate`` of that day). Such a file is read whole, without first
    reading its key columns to find the rows.
    """
    if any(isinstance(v, str) and len(v) >= _STATS_PREFIX for vals in wanted.values() for v in vals):
        return set()
    if adds.num_rows == 0 or any(f"min.{c}" not in adds.column_names for c in wanted):
        return set()
    ok = None
    for c, vals in wanted.items():
        typ = full.field(c).type
        lo, hi = adds.column(f"min.{c}").cast(typ), adds.column(f"max.{c}").cast(typ)
        nulls = adds.column(f"null_count.{c}") if f"null_count.{c}" in adds.column_names else pa.nulls(adds.num_rows, pa.int64())
        m = pc.and_(pc.and_(pc.equal(lo, hi), pc.is_in(lo, value_set=pa.array(vals, typ))), pc.equal(nulls, 0))
        ok = m if ok is None else pc.and_(ok, m)
    assert ok is not None
    hits = pc.fill_null(ok, False).to_pylist()
    return {os.path.basename(unquote(p)) for p, hit in zip(adds.column("path").to_pylist(), hits, strict=True) if hit}


def read_day(uri: str | Path, schema: pa.Schema, day: str, *, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of one partition day (``ingestDate``)."""
    return read(uri, schema, columns=columns, where={"ingestDate": day})


def read_in(uri: str | Path, schema: pa.Schema, column: str, values: Sequence[Scalar], *, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows whose ``column`` is one of ``values`` (e.g. every instance of the touched studies)."""
    if not values:
        empty = schema.empty_table()
        return empty.select(list(columns)) if columns else empty
    return read(uri, schema, columns=columns, where={column: list(values)})


def sql_literal(value: Scalar) -> str:
    """Quote ``value`` for a delta-rs SQL predicate (integers as numbers)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"unsupported literal {value!r}")
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"
