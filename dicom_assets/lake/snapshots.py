"""The latest snapshot of a Delta table, kept per process and brought up to date instead of reloaded.

Opening a ``DeltaTable`` replays its whole log: one add action per data file
(a 100,000-instance day of extraction parts is ~1,600 of them, ~1.8 MB of JSON,
~50 ms). A run opens the metastore a dozen times (every step asks which
studies the day touched), so one new study on a big lake read 99 MB, most of it
the same log again and again. Here a table is opened once per thread and then
``update_incremental()`` reads only the commits made since (~1 ms when there
are none), so every read sees the latest version, as a fresh open would.

A table deleted and made again at the same path starts its log anew; the
identity of its first log file (inode and modification time) tells a cached
snapshot of the old table from the new one. Only local paths are cached.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

#: Tables cached per thread (a lake has a dozen).
MAX_TABLES = 32

_local = threading.local()


def _first_log_file(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(path, "_delta_log", f"{0:020d}.json"))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def latest(uri: str | Path) -> DeltaTable:
    """The table at ``uri`` at its latest version; raises ``TableNotFoundError`` like ``DeltaTable``.

    The object is shared by later calls in this thread: use it for reads and to
    plan a commit (a commit that loses a race is planned again on the next
    call's newer version), and do not move it to another version
    (``load_as_version``).
    """
    path = str(uri)
    if "://" in path and not path.startswith("file://"):
        return DeltaTable(path)
    cache: OrderedDict[str, tuple[tuple[int, int] | None, DeltaTable]] = getattr(_local, "tables", None) or OrderedDict()
    _local.tables = cache
    ident = _first_log_file(path.removeprefix("file://"))
    hit = cache.get(path)
    if hit is not None and ident is not None and hit[0] == ident:
        dt = hit[1]
        try:
            dt.update_incremental()
        except TableNotFoundError:
            cache.pop(path, None)
            raise
        cache.move_to_end(path)
        return dt
    cache.pop(path, None)
    dt = DeltaTable(path)
    if ident is not None:
        cache[path] = (ident, dt)
        while len(cache) > MAX_TABLES:
            cache.popitem(last=False)
    return dt

