"""Delta table I/O through delta-rs: every commit of the project goes through here.

Writes are idempotent by construction: a partition is *replaced* (overwrite with
a predicate, Delta's replaceWhere) and silver/gold tables are *merged* on their
keys, so re-running a step converges on the same rows. Concurrent writers to
the same table (two partitions materialising at once) can conflict at commit
time; delta-rs then raises ``CommitFailedError`` and we retry with backoff.
Reads are in :mod:`dicom_assets.lake.delta_read`, commits of part files
written elsewhere in :mod:`dicom_assets.lake.delta_commit`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from dicom_assets.lake import delta_read, snapshots
from dicom_assets.lake.fileops import crash_point
from dicom_assets.lake.parts import NO_DICTIONARY, STATS_COLUMNS, WRITE_BATCH_ROWS
from dicom_assets.lake.schemas import conform

if TYPE_CHECKING:
    from dicom_assets.lake.rewrite import Rule

T = TypeVar("T")

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

    Sorted small row groups let :func:`~dicom_assets.lake.delta_read.read` fetch the rows of a few keys
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
        held = delta_read.read_in(uri, schema, first, lookup, columns=list(keys))
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
