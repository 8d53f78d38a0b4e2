"""The rows of a Parquet data file that hold wanted key values, read by row group.

A key lookup (the instances of a few studies, the id-map rows of a few keys)
first lets delta-rs skip data files by the log's per-file statistics. A file
that survives is sorted by its key (silver appends are) or small, so its
footer's per-row-group statistics narrow the lookup further: only the key
columns of the row groups whose min/max range holds a wanted value are read,
and the other columns only of the row groups that really match.

Delta data files never change once written, so their footers (about 50 kB
each on the wide silver metastore, most of what a lookup that finds nothing
reads) are kept per process (:func:`footer`, up to :data:`FOOTER_BYTES`): the
steps of one run look up the same files again and again.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dicom_assets.lake.schemas import conform

#: Serialized bytes of the footers kept per process. A parsed footer takes
#: about ten times its serialized size in memory (35 silver footers of 1.4 MB:
#: 13 MB), so this bounds the cache near 20 MB, room for every footer of a
#: 100,000-instance silver metastore (1.2 MB).
FOOTER_BYTES = 2 << 20

_footers: OrderedDict[tuple[str, int, int], pq.FileMetaData] = OrderedDict()
_footer_bytes = 0
_footer_lock = threading.Lock()


def footer(path: str) -> pq.FileMetaData:
    """The Parquet footer of data file ``path``, read once per process while the file is unchanged.

    Least recently used footers are dropped past :data:`FOOTER_BYTES`.
    """
    global _footer_bytes
    st = os.stat(path)
    # Size and mtime make a file rewritten in place (never done by Delta, but by hand) a new entry.
    key = (path, st.st_size, st.st_mtime_ns)
    with _footer_lock:
        md = _footers.get(key)
        if md is not None:
            _footers.move_to_end(key)
            return md
    md = pq.read_metadata(path)
    with _footer_lock:
        if key not in _footers:
            _footers[key] = md
            _footer_bytes += md.serialized_size
            while _footer_bytes > FOOTER_BYTES and len(_footers) > 1:
                _old, dropped = _footers.popitem(last=False)
                _footer_bytes -= dropped.serialized_size
    return md


def _may_hold(lo: Any, hi: Any, values: Sequence[Any]) -> bool:
    """Whether a row group with statistics ``lo``..``hi`` may hold one of the sorted ``values``.

    Writers may cut long strings in statistics (parquet-rs does, and pyarrow
    does not say whether a bound is exact): a cut minimum is a prefix of the
    true one, so ``value >= lo`` still never rules a match out; a cut maximum
    may be a bare prefix, so a value is kept when its first ``len(hi)``
    characters are not above ``hi``. Both tests grow with the value, so the
    first value not below ``lo`` decides.
    """
    if isinstance(lo, bytes) or isinstance(hi, bytes):
        try:
            lo = lo.decode() if isinstance(lo, bytes) else lo
            hi = hi.decode() if isinstance(hi, bytes) else hi
        except UnicodeDecodeError:
            return True
    if not values or type(lo) is not type(values[0]) or type(hi) is not type(values[0]):
        return True
    i = bisect_left(values, lo)
    if i == len(values):
        return False
    v = values[i]
    return v[: len(hi)] <= hi if isinstance(v, str) else bool(v <= hi)


def candidate_row_groups(md: pq.FileMetaData, wanted: Mapping[str, Sequence[Any]]) -> list[int]:
    """Row groups of ``md`` whose statistics allow a row with a wanted value in every ``wanted`` column.

    ``wanted`` maps a top-level column to its sorted values; a row group
    without statistics for a column is kept.
    """
    if md.num_row_groups == 0:
        return []
    first = md.row_group(0)
    index = {first.column(j).path_in_schema: j for j in range(first.num_columns)}
    out = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        keep = True
        for col, values in wanted.items():
            j = index.get(col)
            stats = rg.column(j).statistics if j is not None else None
            if stats is not None and stats.has_min_max and not _may_hold(stats.min, stats.max, values):
                keep = False
                break
        if keep:
            out.append(g)
    return out


def sorted_values(sets: Mapping[str, pa.Array]) -> dict[str, list[Any]]:
    """The wanted values of each column, NULLs left out, sorted as :func:`candidate_row_groups` takes them."""
    return {c: sorted(v for v in values.to_pylist() if v is not None) for c, values in sets.items()}


def matching_rows(
    path: str, sets: Mapping[str, pa.Array], full: pa.Schema, target: pa.Schema,
    ordered: Mapping[str, Sequence[Any]] | None = None,
) -> pa.Table | None:
    """The rows of data file ``path`` whose ``sets`` columns hold wanted values (``None``: none do).

    Only the key columns of the candidate row groups are read first; the
    other ``target`` columns only of the row groups that hold a match.
    ``ordered`` is :func:`sorted_values` of ``sets``, given by a caller that
    looks up the same values in many files.
    """
    md = footer(path)
    groups = candidate_row_groups(md, ordered if ordered is not None else sorted_values(sets))
    if not groups:
        return None
    pf = pq.ParquetFile(path, metadata=md)
    keys = conform(pf.read_row_groups(groups, columns=list(sets)), pa.schema([full.field(c) for c in sets]))
    mask = None
    for c, values in sets.items():
        m = pc.is_in(keys.column(c), value_set=values)
        mask = m if mask is None else pc.and_(mask, m)
    assert mask is not None
    hits = pc.fill_null(mask, False).combine_chunks()
    if not pc.any(hits).as_py():
        return None
    chosen, offset, masks = [], 0, []
    for g in groups:
        n = md.row_group(g).num_rows
        piece = hits.slice(offset, n)
        if pc.any(piece).as_py():
            chosen.append(g)
            masks.append(piece)
        offset += n
    data = conform(pf.read_row_groups(chosen, columns=target.names), target)
    return data.filter(pa.concat_arrays(masks))


def iter_matching(
    path: str, sets: Mapping[str, pa.Array], full: pa.Schema, target: pa.Schema,
    ordered: Mapping[str, Sequence[Any]], batch_rows: int,
) -> Iterator[pa.Table]:
    """:func:`matching_rows` of ``path`` (every row when ``sets`` is empty), at most ``batch_rows`` at a time.

    The candidate row groups are streamed, so memory holds one batch of the
    file, whatever its size; batches without a matching row are not yielded.
    """
    md = footer(path)
    groups = candidate_row_groups(md, ordered) if sets else list(range(md.num_row_groups))
    if not groups:
        return
    names = list(dict.fromkeys([*target.names, *sets]))
    read_schema = pa.schema([full.field(c) for c in names])
    pf = pq.ParquetFile(path, metadata=md)
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=names, use_threads=False):
        t = conform(pa.Table.from_batches([batch]), read_schema)
        for c, values in sets.items():
            t = t.filter(pc.fill_null(pc.is_in(t.column(c), value_set=values), False))
        if t.num_rows:
            yield t.select(target.names)
