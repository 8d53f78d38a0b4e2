"""Delta table I/O through delta-rs: every commit of the project goes through here.

Writes are idempotent by construction: a partition is *replaced* (overwrite with
a predicate, Delta's replaceWhere) and silver/gold tables are *merged* on their
keys, so re-running a step converges on the same rows. Concurrent writers to
the same table (two partitions materialising at once) can conflict at commit
time; delta-rs then raises ``CommitFailedError`` and we retry with backoff.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from dicom_assets.lake import rowgroups, snapshots
from dicom_assets.lake.fileops import crash_point, shared_thread_pool
from dicom_assets.lake.parts import NO_DICTIONARY, STATS_COLUMNS, WRITE_BATCH_ROWS
from dicom_assets.lake.schemas import conform

if TYPE_CHECKING:
    from dicom_assets.lake.rewrite import Rule

T = TypeVar("T")
#: Values a ``where`` filter compares with: strings (UIDs, days) and integers (OMOP ids).
Scalar = str | int

#: Retries of a conflicting commit; waits grow to about 10 s in total.
COMMIT_RETRIES = 12


def with_commit_retry(fn: Callable[[], T], *, retries: int = COMMIT_RETRIES) -> T:
    """Run ``fn`` (one Delta commit), retrying when another writer won the race."""
    delay = 0.05
    for attempt in range(retries + 1):
        try:
            return fn()
        except (CommitFailedError, DeltaError) as exc:
            if attempt == retries or not _is_conflict(exc):
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def _is_conflict(exc: Exception) -> bool:
    if isinstance(exc, CommitFailedError):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("conflict", "concurrent", "version already exists", "already exists"))


def table_label(uri: str | Path) -> str:
    """``<layer>.<table>`` of a lake table folder (``silver.ImagingStudy``), as the CLI names it."""
    p = Path(str(uri).removeprefix("file://"))
    return f"{p.parent.parent.name}.{p.name}"


def _commit(uri: str | Path, fn: Callable[[], T]) -> T:
    """One (retried) commit, between the crash points the kill-and-rerun tests stop at."""
    label = table_label(uri)
    crash_point(f"delta:before_commit:{label}")
    out = with_commit_retry(fn)
    crash_point(f"delta:after_commit:{label}")
    return out


def exists(uri: str | Path) -> bool:
    return DeltaTable.is_deltatable(str(uri))


def ensure_table(uri: str | Path, schema: pa.Schema) -> None:
    """Create an empty table with ``schema`` unless one exists."""
    if exists(uri):
        return
    Path(uri).mkdir(parents=True, exist_ok=True)
    stats = STATS_COLUMNS.get(Path(uri).name)
    config = {"delta.dataSkippingStatsColumns": stats} if stats else None

    def create() -> None:
        # Not an append of an empty table: delta-rs's first write in a process
        # sets up its query engine (~0.17 s of CPU), which a plain create
        # skips, and the local engine's commits never need it.
        if not exists(uri):
            DeltaTable.create(str(uri), schema, mode="ignore", configuration=config)

    try:
        with_commit_retry(create)
    except DeltaError:
        if not exists(uri):
            raise


def replace_where(uri: str | Path, data: pa.Table, schema: pa.Schema, predicate: str) -> None:
    """Atomically replace the rows matching ``predicate`` by ``data`` (replaceWhere).

    One commit removes the matched files and adds the new ones, so readers see
    either the old partition or the new one, and a re-run gives the same rows.
    """
    ensure_table(uri, schema)
    data = conform(data, schema)
    _commit(uri, lambda: write_deltalake(str(uri), data, mode="overwrite", predicate=predicate))


def append(
    uri: str | Path, data: pa.Table, schema: pa.Schema, *, sort_by: Sequence[str] = (), row_group_rows: int | None = None
) -> None:
    """Append ``data`` in one commit, optionally sorted and cut into row groups of ``row_group_rows``.

    Sorted small row groups let :func:`read` fetch the rows of a few keys
    (say, the instances of the touched studies) without decoding the rest.
    """
    ensure_table(uri, schema)
    data = conform(data, schema)
    if not data.num_rows:
        return
    if sort_by:
        order = pc.sort_indices(data, sort_keys=[(c, "ascending") for c in sort_by])
        # Rows that come sorted (silver's, from pick_latest) are not copied again.
        if not pc.all(pc.equal(order, pa.array(range(data.num_rows), order.type))).as_py():
            data = data.take(order)
    # Compression named: delta-rs writes uncompressed when given properties
    # without it (silver's JSON took 7x the bytes). Small write batches close
    # a wide column's pages near 1 MB, not after 1,024 rows (7 MB of JSON),
    # so a reader that streams a batch at a time holds one small page.
    props = WriterProperties(
        max_row_group_size=row_group_rows, compression="SNAPPY", write_batch_size=WRITE_BATCH_ROWS,
        column_properties={c: ColumnProperties(dictionary_enabled=False) for c in NO_DICTIONARY if c in schema.names},
    )
    _commit(uri, lambda: write_deltalake(str(uri), data, mode="append", writer_properties=props))


def merge(
    uri: str | Path,
    source: pa.Table,
    schema: pa.Schema,
    *,
    keys: Sequence[str],
    update_predicate: str | None = None,
    update_columns: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Upsert ``source`` into the table on ``keys``; returns delta-rs merge metrics.

    ``update_predicate`` (SQL over ``s.`` source and ``t.`` target) limits which
    matched rows are updated; ``update_columns`` updates only those target
    columns (e.g. to keep ``msftCreatedDatetime``). Unmatched rows are inserted.
    """
    ensure_table(uri, schema)
    source = conform(source, schema)
    if source.num_rows == 0:
        return {}
    on = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)

    def run() -> dict[str, Any]:
        dt = DeltaTable(str(uri))
        m = dt.merge(source, predicate=on, source_alias="s", target_alias="t")
        if update_columns is not None:
            m = m.when_matched_update(updates=update_columns, predicate=update_predicate)
        else:
            m = m.when_matched_update_all(predicate=update_predicate)
        return dict(m.when_not_matched_insert_all().execute())

    return _commit(uri, run)


def upsert(
    uri: str | Path,
    source: pa.Table,
    schema: pa.Schema,
    *,
    keys: Sequence[str],
    lock: Callable[[], AbstractContextManager[Any]],
    update_predicate: str | None = None,
    update_columns: dict[str, str] | None = None,
    sort_by: Sequence[str] = (),
    row_group_rows: int | None = None,
    update_rule: Rule | None = None,
    keep_columns: Sequence[str] = (),
) -> dict[str, int]:
    """:func:`merge` that appends the rows whose key the table does not hold yet.

    The keys of ``source`` are looked up first (key columns only, files and
    row groups pruned on ``keys[0]``): new keys are appended, which costs the
    same on a table of any size. Rows with a known key go through a Delta
    merge (a scan of every file that may hold them), or, given an
    ``update_rule`` (a :class:`dicom_assets.lake.rewrite.Rule`), replace the
    rows they win over by it (``keep_columns`` kept) in a rewrite of only the
    files that hold such a row (:func:`dicom_assets.lake.rewrite.update_matched`). ``lock`` (a lake
    lock) is held from the lookup to the last commit: Delta appends never
    conflict, so without it two runs could both append the same new key.
    Returns ``num_target_rows_inserted`` and ``num_target_rows_updated``.
    """
    ensure_table(uri, schema)
    source = conform(source, schema)
    out = {"num_target_rows_inserted": 0, "num_target_rows_updated": 0}
    if source.num_rows == 0:
        return out
    first = keys[0]
    with lock():
        lookup = pc.unique(source.column(first)).drop_null().to_pylist()
        held = read_in(uri, schema, first, lookup, columns=list(keys))
        known = set(zip(*(held.column(k).to_pylist() for k in keys), strict=True))
        source_keys = zip(*(source.column(k).to_pylist() for k in keys), strict=True)
        flags = [k not in known for k in source_keys]
        if all(flags) or not any(flags):  # a whole new day, or a re-run: no copy of the rows
            fresh, seen = (source, source.slice(0, 0)) if all(flags) else (source.slice(0, 0), source)
        else:
            is_new = pa.array(flags, pa.bool_())
            fresh, seen = source.filter(is_new), source.filter(pc.invert(is_new))
        if fresh.num_rows:
            append(uri, fresh, schema, sort_by=sort_by, row_group_rows=row_group_rows)
            out["num_target_rows_inserted"] += fresh.num_rows
        if seen.num_rows and update_rule is not None:
            # Imported here: rewrite builds on this module.
            from dicom_assets.lake import rewrite

            out["num_target_rows_updated"] += rewrite.update_matched(
                uri, schema, seen, keys, rule=update_rule, keep=keep_columns, sort_by=sort_by, row_group_rows=row_group_rows
            )
        elif seen.num_rows:
            metrics = merge(uri, seen, schema, keys=keys, update_predicate=update_predicate, update_columns=update_columns)
            out["num_target_rows_inserted"] += int(metrics.get("num_target_rows_inserted", 0))
            out["num_target_rows_updated"] += int(metrics.get("num_target_rows_updated", 0))
    return out


def delete_where(uri: str | Path, predicate: str) -> None:
    if exists(uri):
        with_commit_retry(lambda: DeltaTable(str(uri)).delete(predicate))


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


def live_files(uri: str | Path) -> set[str]:
    """Names of the table's live data files (as in its folder); empty when there is no table."""
    try:
        dt = snapshots.latest(uri)
    except TableNotFoundError:
        return set()
    return set(files_by_name(dt))


def files_by_name(dt: DeltaTable) -> dict[str, tuple[str, int]]:
    """The live data files of ``dt`` by name: (path as the log's ``add`` has it, size in bytes)."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    return {
        os.path.basename(unquote(p)): (p, int(n))
        for p, n in zip(adds.column("path").to_pylist(), adds.column("size_bytes").to_pylist(), strict=True)
    }


def count(uri: str | Path) -> int:
    """Rows in the table, from the log's per-file ``numRecords`` (no data file is opened).

    Files written without statistics are counted by reading their footers.
    """
    try:
        dt = snapshots.latest(uri)
    except TableNotFoundError:
        return 0
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return 0
    n = adds.column("num_records") if "num_records" in adds.column_names else pa.nulls(adds.num_rows, pa.int64())
    if n.null_count == 0:
        return int(pc.sum(n).as_py())
    return int(dt.to_pyarrow_dataset().count_rows())


def column_max(uri: str | Path, column: str) -> int | None:
    """Largest value of integer ``column`` (``None``: no rows, or no table), from the log's statistics.

    Only files whose ``add`` action has no maximum for the column (written
    without statistics) are opened, and then only that column: the next OMOP
    id costs the same on an id map of any size.
    """
    try:
        dt = snapshots.latest(uri)
    except TableNotFoundError:
        return None
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return None
    rows = adds.column("num_records") if "num_records" in adds.column_names else pa.nulls(adds.num_rows, pa.int64())
    highs = adds.column(f"max.{column}") if f"max.{column}" in adds.column_names else pa.nulls(adds.num_rows, pa.int64())
    best: int | None = None
    blind: list[str] = []
    for path, n, hi in zip(adds.column("path").to_pylist(), rows.to_pylist(), highs.to_pylist(), strict=True):
        if hi is not None:
            best = int(hi) if best is None else max(best, int(hi))
        elif n != 0:  # an empty file has no statistics and no rows
            blind.append(path)
    if blind:
        by_name = {os.path.basename(unquote(f)): f for f in dt.file_uris()}
        for path in blind:
            values = pq.read_table(by_name[os.path.basename(unquote(path))], columns=[column]).column(0)
            hi = pc.max(values).as_py()
            if hi is not None:
                best = int(hi) if best is None else max(best, int(hi))
    return best


def sql_literal(value: Scalar) -> str:
    """Quote ``value`` for a delta-rs SQL predicate (integers as numbers)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"unsupported literal {value!r}")
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"
