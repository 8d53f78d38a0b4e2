"""Write Parquet part files anywhere, then replace one day of a Delta table in ONE commit.

Engines whose workers write their own output (Spark executors, a process
pool) cannot stream through a single ``write_deltalake`` call. They call
:func:`~dicom_assets.lake.parts.write_part_file` (or :func:`write_part`) where
the data is, ship the small part records to one coordinator, and that coordinator calls :func:`commit_replace`,
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
* A commit adding :data:`CHECKPOINT_AFTER_ADDS` files or more (a big day of
  extraction parts) is followed by a Delta checkpoint. Opening the table
  otherwise replays every JSON commit since the last checkpoint, which delta-rs
  writes only every 100 commits: 3.6 MB read at 100,000 instances in one day,
  1.4 MB from the checkpoint.
* Readers see the old day or the new day, never both. A concurrent commit that
  removed a file we remove makes delta-rs raise ``CommitFailedError``; the
  retry re-plans against the new snapshot (the part files are already
  written, so a retry costs a log read, not a re-extraction). Appends of other
  days commit side by side without conflict.

Only local-filesystem tables are supported (the lake is a folder, SPEC §2).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction

from dicom_assets.lake import delta, delta_read, parts, snapshots
from dicom_assets.lake.fileops import crash_point

log = logging.getLogger(__name__)

#: A commit adding at least this many files is followed by a checkpoint.
CHECKPOINT_AFTER_ADDS = 1000

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
    """:func:`~dicom_assets.lake.parts.write_part_file` with its record as an ``add`` action."""
    return add_action_from_record(parts.write_part_file(table_dir_, table))


def add_action_from_record(rec: dict[str, Any]) -> AddAction:
    """The ``add`` action of a part record (:func:`~dicom_assets.lake.parts.write_part_file`; unpartitioned tables only)."""
    return AddAction(
        path=str(rec["path"]),
        size=int(rec["size"]),
        partition_values={},
        modification_time=int(rec["modification_time"]),
        data_change=True,
        stats=str(rec["stats"]),
    )


def discard(uri: str | Path, adds: Sequence[AddAction]) -> None:
    """Delete the part files of ``adds`` that the table does not hold: after a failed commit.

    An exception can also come after delta-rs wrote the commit (an interrupt
    on its way out), so a part is deleted only when the table's latest
    version does not list it. When that version cannot be read, the parts
    stay: an orphan file is harmless, a committed one deleted is not.
    """
    if not adds:
        return
    try:
        live = delta.files_by_name(snapshots.latest(str(uri)))
    except TableNotFoundError:
        live = {}
    except Exception:  # noqa: BLE001 - see above: keep the parts
        log.warning("could not tell which parts of a failed commit to %s landed; left them", delta.table_label(uri))
        return
    folder = table_dir(uri)
    for add in adds:
        if os.path.basename(unquote(add.path)) not in live:
            (folder / unquote(add.path)).unlink(missing_ok=True)


def remove_action(path: str, size: int, now_ms: int) -> RemoveAction:
    """The ``remove`` action of a live data file (``path`` as the log's ``add`` has it), a data change."""
    return RemoveAction(path, True, now_ms, size, {})


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
    When the replacement fails for good, the parts of ``adds`` that did not
    land are deleted (:func:`discard`): nothing else refers to them.
    """
    try:
        _commit_replace(str(uri), schema, adds, day, column, retries)
    except BaseException:
        discard(uri, adds)
        raise


def _commit_replace(uri_s: str, schema: pa.Schema, adds: Sequence[AddAction], day: str, column: str, retries: int) -> None:
    folder = table_dir(uri_s)
    for add in adds:
        if _day_state(folder / unquote(add.path), add.stats, column, day) != _ALL:
            raise ValueError(f"part {add.path} holds rows whose {column} is not {day!r}")
    delta.ensure_table(uri_s, schema)
    predicate = f"{column} = {delta_read.sql_literal(day)}"

    def attempt() -> None:
        # The cached snapshot, brought up to date: a fresh open replays the
        # whole log (~1.8 MB for a 100,000-instance day); a lost race re-plans
        # on the newer version all the same.
        dt = snapshots.latest(uri_s)
        check_table(dt, schema)
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
            discard(uri_s, rewritten)
            raise

    label = delta.table_label(folder)
    crash_point(f"delta:before_commit:{label}")
    delta.with_commit_retry(attempt, retries=retries)
    crash_point(f"delta:after_commit:{label}")
    if len(adds) >= CHECKPOINT_AFTER_ADDS:
        checkpoint(uri_s)


def checkpoint(uri: str | Path) -> None:
    """Write a Delta checkpoint of the table's latest version; a failure is logged, not raised.

    The checkpoint only makes later opens cheaper: the commits it sums up stay
    in the log, and delta-rs writes it (as it writes commits) under a temporary
    name and renames it, so a killed process leaves no torn checkpoint.
    """
    try:
        snapshots.latest(str(uri)).create_checkpoint()
    except Exception as exc:  # noqa: BLE001 - the commit is done; readers replay the JSON log instead
        log.warning("Delta checkpoint of %s failed: %s", delta.table_label(uri), exc)


def check_table(dt: DeltaTable, schema: pa.Schema) -> None:
    """Raise unless ``dt`` is a table whose files can be added and removed by hand with ``schema``."""
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
    now_ms = int(time.time() * 1000)
    removes: list[RemoveAction] = []
    rewritten: list[AddAction] = []
    for row, state in _day_states(dt, folder, column, day):
        if state == _NONE:
            continue
        removes.append(remove_action(row["path"], int(row["size_bytes"]), now_ms))
        if state == _MIXED:
            path = folder / unquote(row["path"])
            kept = pq.read_table(path)
            mask = pc.fill_null(pc.not_equal(kept.column(column), pa.scalar(day)), True)
            rewritten.append(write_part(folder, delta.conform(kept.filter(mask), schema)))
    return removes, rewritten


def day_files(uri: str | Path, day: str, *, column: str = "ingestDate") -> list[str]:
    """Names of the live data files whose every row has ``column = day`` (a day's parts), in log order."""
    try:
        dt = snapshots.latest(str(uri))
    except TableNotFoundError:
        return []
    folder = table_dir(uri)
    return [os.path.basename(unquote(row["path"])) for row, state in _day_states(dt, folder, column, day) if state == _ALL]


def _day_states(dt: DeltaTable, folder: Path, column: str, day: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Each live file's add action (flattened) and whether its ``column`` is ``day`` on all, none or some rows."""
    files = pa.table(dt.get_add_actions(flatten=True))
    if files.num_rows == 0:
        return
    names = set(files.column_names)
    lo_col, hi_col, nc_col = f"min.{column}", f"max.{column}", f"null_count.{column}"
    for row in files.to_pylist():
        stats = None
        if lo_col in names and hi_col in names:
            stats = {
                "numRecords": row.get("num_records"),
                "minValues": {column: row.get(lo_col)},
                "maxValues": {column: row.get(hi_col)},
                "nullCount": {column: row.get(nc_col)} if nc_col in names else {},
            }
        yield row, _day_state(folder / unquote(row["path"]), json.dumps(stats) if stats else None, column, day)


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
    "add_action_from_record",
    "commit_replace",
    "table_dir",
    "write_part",
]
