"""Cluster data files of a Delta table by key: many overlapping files become one sorted run.

A table appended in chunks (silver's 100,000-instance day arrives as twenty
5,000-row chunks, each spanning the whole UID range) makes every later key
lookup open every chunk's file: the cost of one new study grew with the size
of the lake. :func:`merge_sorted` rewrites such files as one sorted run of
non-overlapping files, so a lookup finds its key in one file whatever the
number of rows.

The rows themselves do not change, so the commit's ``add`` and ``remove``
actions say ``dataChange: false`` (Delta's ``OPTIMIZE`` does the same), and
readers of the table's changes skip it. delta-rs's own
``optimize.z_order`` sorts through DataFusion and needed more than 600 MB of
memory pool for a 100,000-instance silver table (it failed there); this is a
streaming merge in bounded memory instead. Every input is sorted by the key
(silver's appends and rewrites are; an input that is not is read whole and
sorted first, it is one file), so a heap merge of the inputs' key streams
gives the order of the output rows, and each input's rows are then taken
front to back, a record batch at a time, and written a row group at a time.
Memory is one batch of keys and one of rows per input and one output row
group, not the table.

:func:`concatenate` does the same for many small files whose order does not
matter (a day of extraction parts): fewer, larger files, so fewer ``add``
actions for every later open of the table to replay.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake.transaction import AddAction, CommitProperties, RemoveAction

from dicom_assets.lake import delta, delta_commit, parts, rowgroups, snapshots
from dicom_assets.lake.arrow_memory import release_unused_memory
from dicom_assets.lake.fileops import crash_point
from dicom_assets.lake.schemas import conform

#: Rows per record batch read from an input. Arrow decodes a batch at a time:
#: with 2,048, twenty silver inputs held 379 MB of batches; with 128, 63 MB.
#: With 32 (and no dictionaries of per-instance values, parts.NO_DICTIONARY) a
#: silver input holds 2.6 MB instead of 5.4.
STREAM_BATCH_ROWS = 32
#: A file that would end inside a run of equal first-key values (one study)
#: grows by up to this factor to hold the whole run.
FILE_STRETCH = 2

Key = tuple[Any, ...]


@dataclass(frozen=True)
class ClusterResult:
    """What :func:`merge_sorted` or :func:`concatenate` did: files removed and added, rows moved (0 each: nothing)."""

    removed: int
    added: int
    rows: int


def _key_rows(t: pa.Table | pa.RecordBatch, key: Sequence[str]) -> list[Key]:
    """Each row's ``key`` values as a tuple that sorts as Arrow does, NULLs last."""
    cols = [[(1, "") if v is None else (0, v) for v in t.column(c).to_pylist()] for c in key]
    return list(zip(*cols, strict=True))


class _Rows:
    """Record batches handed out as tables of any number of rows, front to back."""

    def __init__(self, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> None:
        self._batches, self._schema = batches, schema
        self._held: pa.Table | None = None

    def take(self, n: int) -> pa.Table:
        """The next ``n`` rows (conformed to the schema)."""
        pieces: list[pa.Table] = []
        while n > 0:
            if self._held is None or self._held.num_rows == 0:
                self._held = conform(pa.Table.from_batches([next(self._batches)]), self._schema)
                continue
            piece = self._held.slice(0, n)
            self._held = self._held.slice(piece.num_rows)
            pieces.append(piece)
            n -= piece.num_rows
        return pa.concat_tables(pieces) if pieces else self._schema.empty_table()


class _Input:
    """One input file read front to back: its keys for the merge, its rows for the output.

    A file whose rows are not in key order (none of the pipeline writes one)
    is read whole and sorted in memory; a sorted one is streamed
    :data:`STREAM_BATCH_ROWS` rows at a time, with ``pre_buffer`` off so that
    pages are read as batches are asked for, not the whole file up front.
    """

    def __init__(self, path: str, schema: pa.Schema, key: Sequence[str]) -> None:
        self._key = list(key)
        self._key_schema = pa.schema([schema.field(c) for c in key])
        md = rowgroups.footer(path)
        keys = _key_rows(conform(pq.ParquetFile(path, metadata=md).read(columns=self._key), self._key_schema), key)
        self._sorted_keys: list[Key] | None = None
        if all(keys[i] <= keys[i + 1] for i in range(len(keys) - 1)):
            del keys  # streamed again below: holding every input's keys would grow with the day
            self._path, self._md = path, md
            pf = self._reader()
            self._rows = _Rows(pf.iter_batches(batch_size=STREAM_BATCH_ROWS, columns=schema.names, use_threads=False), schema)
        else:
            order = sorted(range(len(keys)), key=keys.__getitem__)
            whole = conform(pq.ParquetFile(path, metadata=md).read(columns=schema.names), schema)
            self._sorted_keys = [keys[i] for i in order]
            self._rows = _Rows(iter(whole.take(pa.array(order, pa.int64())).to_batches(max_chunksize=STREAM_BATCH_ROWS)), schema)

    def _reader(self) -> pq.ParquetFile:
        return pq.ParquetFile(self._path, metadata=self._md, pre_buffer=False, buffer_size=16 << 10)

    def keys(self) -> Iterator[Key]:
        """The keys of the rows, in the order :meth:`take` hands the rows out."""
        if self._sorted_keys is not None:
            yield from self._sorted_keys
            return
        for batch in self._reader().iter_batches(batch_size=8 * STREAM_BATCH_ROWS, columns=self._key, use_threads=False):
            yield from _key_rows(conform(pa.Table.from_batches([batch]), self._key_schema), self._key)

    def take(self, n: int) -> pa.Table:
        """The next ``n`` rows."""
        return self._rows.take(n)


def merge_sorted(
    uri: str | Path,
    schema: pa.Schema,
    files: Sequence[str],
    key: Sequence[str],
    *,
    file_rows: int,
    row_group_rows: int,
) -> ClusterResult:
    """Rewrite the live data ``files`` (names as in the table folder) as one run sorted by ``key``.

    The output files hold about ``file_rows`` rows each, cut into row groups
    of ``row_group_rows``; a file is cut where the first key column changes
    (a study is not split across files) unless that would make it more than
    :data:`FILE_STRETCH` times ``file_rows``. Rows are copied unchanged; ties
    in ``key`` keep the order of ``files`` and of the rows within a file. One
    commit removes the inputs and adds the outputs; if an input is no longer
    live by then (another writer rewrote it), nothing is committed and the
    outputs are deleted. The caller holds the lake lock of the table's
    writers. Fewer than two files: nothing to do.
    """
    planned = _plan(uri, schema, files)
    if planned is None:
        return ClusterResult(0, 0, 0)
    names, paths = planned
    inputs = [_Input(p, schema, key) for p in paths]
    merged = heapq.merge(*(_tagged(inp.keys(), i) for i, inp in enumerate(inputs)))
    outputs = (_row_groups(inputs, sources, row_group_rows) for sources in _files(merged, file_rows))
    return _replace(uri, schema, names, outputs, row_group_rows)


def concatenate(
    uri: str | Path,
    schema: pa.Schema,
    files: Sequence[str],
    *,
    file_rows: int,
    row_group_rows: int,
) -> ClusterResult:
    """Rewrite the live data ``files`` as few files of ``file_rows`` rows, rows in the order given.

    For many small files whose order does not matter (a day of extraction
    parts, 64 rows each): the log then holds a few ``add`` actions instead of
    one per part, which every later open of the table replays. Inputs are
    read one after the other, a row group at a time. Commit and races as in
    :func:`merge_sorted`.
    """
    planned = _plan(uri, schema, files)
    if planned is None:
        return ClusterResult(0, 0, 0)
    names, paths = planned
    total = sum(rowgroups.footer(p).num_rows for p in paths)
    batches = (
        b for p in paths
        for b in pq.ParquetFile(p, metadata=rowgroups.footer(p)).iter_batches(batch_size=row_group_rows, columns=schema.names, use_threads=False)
    )
    rows = _Rows(batches, schema)
    per_file = max(1, file_rows // row_group_rows) * row_group_rows

    def groups(start: int) -> Iterator[pa.Table]:
        stop = min(start + per_file, total)
        return (rows.take(min(row_group_rows, stop - i)) for i in range(start, stop, row_group_rows))

    return _replace(uri, schema, names, (groups(start) for start in range(0, total, per_file)), row_group_rows)


def _plan(uri: str | Path, schema: pa.Schema, files: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """The distinct names of ``files`` and their paths; ``None`` when there are fewer than two or one is not live."""
    names = list(dict.fromkeys(os.path.basename(unquote(f)) for f in files))
    if len(names) < 2:
        return None
    folder = delta_commit.table_dir(uri)
    dt = snapshots.latest(str(uri))
    delta_commit.check_table(dt, schema)
    live = delta.files_by_name(dt)
    if any(n not in live for n in names):
        return None
    return names, [str(folder / unquote(live[n][0])) for n in names]


def _replace(
    uri: str | Path, schema: pa.Schema, names: Sequence[str], outputs: Iterator[Iterator[pa.Table]], row_group_rows: int
) -> ClusterResult:
    """Write each output file (its row groups, as they come), then swap them for ``names`` in one commit."""
    # What the caller freed (a day's extraction or merge rounds) goes back
    # first, so these buffers are not placed among it for good.
    release_unused_memory()
    folder = delta_commit.table_dir(uri)
    written: list[AddAction] = []
    total = 0
    try:
        for groups in outputs:
            rec = parts.write_part_pieces(folder, groups, schema, row_group_rows=row_group_rows)
            total += json.loads(rec["stats"])["numRecords"]
            written.append(_no_data_change(delta_commit.add_action_from_record(rec)))
        committed = _commit(uri, schema, folder, names, written)
    except BaseException:
        delta_commit.discard(uri, written)
        raise
    if not committed:
        return ClusterResult(0, 0, 0)
    if len(names) + len(written) >= delta_commit.CHECKPOINT_AFTER_ADDS:
        # As after a big commit (delta_commit): otherwise every open replays
        # the old checkpoint's adds and then this commit's removes.
        delta_commit.checkpoint(uri)
    return ClusterResult(removed=len(names), added=len(written), rows=total)


def _tagged(keys: Iterator[Key], i: int) -> Iterator[tuple[Key, int]]:
    return ((k, i) for k in keys)


def _files(merged: Iterator[tuple[Key, int]], file_rows: int) -> Iterator[list[int]]:
    """The input index of each row of each output file, in key order (see :func:`merge_sorted` for the cuts)."""
    sources: list[int] = []
    last: Any = None
    for k, i in merged:
        if len(sources) >= file_rows and (k[0] != last or len(sources) >= FILE_STRETCH * file_rows):
            yield sources
            sources = []
        sources.append(i)
        last = k[0]
    if sources:
        yield sources


def _row_groups(inputs: Sequence[_Input], sources: Sequence[int], row_group_rows: int) -> Iterator[pa.Table]:
    """The output file's rows (see :func:`_gather`), one row group at a time."""
    for i in range(0, len(sources), row_group_rows):
        yield _gather(inputs, sources[i : i + row_group_rows])


def _gather(inputs: Sequence[_Input], sources: Sequence[int]) -> pa.Table:
    """The next rows of ``inputs``, one for each entry of ``sources`` (an input's index), in that order."""
    src = np.asarray(sources, dtype=np.int64)
    counts = np.bincount(src, minlength=len(inputs))
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pieces = [inputs[i].take(int(n)) for i, n in enumerate(counts) if n]
    # Input i's rows sit at offset[i] onwards, in the order the merge takes them.
    rank = np.empty(len(src), dtype=np.int64)
    for i in np.flatnonzero(counts):
        at = np.flatnonzero(src == i)
        rank[at] = offset[i] + np.arange(len(at))
    return pa.concat_tables(pieces).take(pa.array(rank))


def _no_data_change(add: AddAction) -> AddAction:
    return AddAction(add.path, add.size, add.partition_values, add.modification_time, False, add.stats)


def _commit(uri: str | Path, schema: pa.Schema, folder: Path, names: Sequence[str], written: Sequence[AddAction]) -> bool:
    """Remove ``names`` and add ``written`` in one commit; ``False`` (outputs deleted) when an input has gone."""
    label = delta.table_label(folder)

    def attempt() -> None:
        dt = snapshots.latest(str(uri))
        live = delta.files_by_name(dt)
        if any(n not in live for n in names):
            raise _InputGone()
        now_ms = int(time.time() * 1000)
        removes = [RemoveAction(live[n][0], False, now_ms, live[n][1], {}) for n in names]
        dt.create_write_transaction(
            [*written, *removes], mode="append", schema=schema,
            commit_properties=CommitProperties(custom_metadata={"dicomAssetsOperation": "cluster"}),
        )

    crash_point(f"delta:before_commit:{label}")
    try:
        delta.with_commit_retry(attempt)
    except _InputGone:
        delta_commit.discard(uri, written)
        return False
    crash_point(f"delta:after_commit:{label}")
    return True


class _InputGone(Exception):
    """An input file was removed by another commit since the merge was planned."""
