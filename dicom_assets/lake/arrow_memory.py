"""Arrow's allocator for the lake's processes: the C library's ``malloc``, not the bundled mimalloc.

Measured: mimalloc keeps the pages freed by Parquet reads and Delta merges (the
silver merge of a 100,000-instance day alone peaked at 757 MiB, 606 MiB with the
system allocator; the fabric sample's run at 758-827 MiB in five runs, 690-799
MiB in five with it) and was no faster (the extraction engine over the corpus
x8: 6.09 s and 6.08 s against 6.00 s and 5.98 s). Arrow's own ``ARROW_DEFAULT_MEMORY_POOL``,
when a user sets it, still decides. The package sets it as soon as it is
imported (``dicom_assets/__init__.py``), before pyarrow starts: Parquet's
decoding takes its buffers from the pool Arrow chose at its start, so a pool
set later (:func:`use_system_allocator`, for a process that imported pyarrow
first) covers only what pyarrow allocates from Python.

Dagster processes also keep glibc's mmap threshold fixed
(:func:`fix_mmap_threshold`), so that large buffers, once freed, do not stay
in the heap. Between the steps of a run in one process, :func:`release_unused_memory`
hands the heap a step freed back to the system (measured on a 30,000-instance
day: the steps after the silver merge started at 567-581 MiB instead of
638-710 MiB).

delta-rs allocates through a jemalloc of its own, which neither of these
reaches; the package configures it before deltalake loads (``_RJEM_MALLOC_CONF``
in ``dicom_assets/__init__.py``).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import pyarrow as pa

#: Arrow's environment variable naming its default pool (``system``, ``mimalloc``, ``jemalloc``).
ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def use_system_allocator() -> None:
    """Make the system allocator Arrow's default pool unless ``ARROW_DEFAULT_MEMORY_POOL`` is set.

    For a process that imported pyarrow before this package (the package sets
    the variable itself otherwise): buffers already allocated keep their pool,
    and so do Parquet's decoding buffers; children started later inherit the
    choice through the environment (:func:`backend_name` tells what is in use).
    """
    if not os.environ.get(ARROW_POOL_VARIABLE):
        os.environ[ARROW_POOL_VARIABLE] = "system"
        pa.set_memory_pool(pa.system_memory_pool())


#: ``mallopt`` parameter number of glibc's mmap threshold (``M_MMAP_THRESHOLD`` in malloc.h).
_M_MMAP_THRESHOLD = -3
#: Blocks from this size on get pages of their own, given back when freed (glibc's starting value).
MMAP_THRESHOLD = 128 * 1024
#: Environment variables by which a user tunes glibc's malloc; any of them set: left alone.
_MALLOC_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at :data:`MMAP_THRESHOLD`; ``True`` when set.

    glibc raises the threshold to the size of each mmapped block freed (up to
    32 MiB), so after the first Parquet row group of DICOM JSON was freed,
    every page and batch buffer below that size came from the heap, was
    freed between longer-lived blocks and stayed in the process.
    Measured on the 100,000-instance day run in one process: peak 1,043 MiB
    (silver's merge and clustering reading twenty files at once), 843 MiB
    with the threshold fixed; the run took 106 s instead of 96 s (every big
    buffer is mapped afresh). Left alone when the user tunes malloc through
    its environment variables (``MALLOC_MMAP_THRESHOLD_`` …, ``GLIBC_TUNABLES``),
    or off glibc.
    """
    if any(v in os.environ for v in _MALLOC_TUNING) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def backend_name() -> str:
    """The backend of Arrow's default pool in this process (``system``, ``mimalloc``, ``jemalloc``)."""
    return str(pa.default_memory_pool().backend_name)


def release_unused_memory() -> None:
    """Hand memory freed by the last step back to the operating system.

    A Dagster run executed in one process (``dicom-assets run``, the
    benchmark) keeps the heap of each step: glibc holds freed blocks in the
    arenas of the threads delta-rs and Arrow ran on, so the process stayed at
    a step's peak for the rest of the run. ``malloc_trim`` returns them (it
    walks every arena); elsewhere this asks only Arrow's pool.
    """
    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@cache
def _glibc() -> Any:
    # The symbols already loaded into this process: no library search (which
    # runs ldconfig) at import time, where pool helpers would pay for it.
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None
