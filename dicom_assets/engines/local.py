"""The embedded engine: the calling process and a pool of helper processes over batches of files (SPEC §7).

delta-rs holds threads and locks that a forked child inherits in a broken
state, so every helper is a fresh interpreter (``fork``+``exec``, as the
``spawn`` start method does), which never imports the parent's main module
(:mod:`dicom_assets.engines.helper_pool`). Each helper writes its batch's rows
as one Parquet part file straight into the table folder and returns only the
small add-action record and its failures; the calling process reads batches
too and hands out the helpers' batches between its own (see
:func:`iter_batches`), then commits every part in one Delta transaction (the
same path the Spark engine takes). Memory is bounded by batch size times
workers, not by the number of files, and a lost commit race re-plans the
commit without re-reading any file.

Every file is read within the settings' budget (``file_timeout_seconds``,
``max_file_bytes``; :mod:`dicom_assets.dicom.budget`); each pool task runs in
its helper's main thread, so the ``SIGALRM`` backstop of the time limit
applies there. Helpers can also get an address-space limit
(``RLIMIT_AS``, see :func:`~dicom_assets.engines.helper.init_worker`): a file that still needs more memory
then fails with ``TooLarge`` instead of waking the kernel's OOM killer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import pyarrow as pa

from dicom_assets.config import Settings
from dicom_assets.dicom.budget import ReadLimits
from dicom_assets.dicom.compress import settle_removals
from dicom_assets.dicom.records import ExtractTask
from dicom_assets.engines.base import ExtractionOutcome, spans
from dicom_assets.engines.batch import BatchResult, run_batch
from dicom_assets.engines.helper import init_worker
from dicom_assets.engines.helper_pool import HelperPool
from dicom_assets.lake import delta, delta_commit
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA

log = logging.getLogger(__name__)

#: Environment defaults of pool helpers (a variable already set wins). numpy is
#: imported (by pyarrow and pydicom) but never computes here, and OpenBLAS's
#: thread pool, started on import, spun the other core for 0.06-0.16 s of CPU
#: while a helper started, taking that time from the reading of this process.
HELPER_ENV = {"OPENBLAS_NUM_THREADS": "1"}

#: At most this many files are read without starting helpers (see :func:`helpers_needed`).
INLINE_MAX_FILES = 192


def worker_address_space_bytes(settings: Settings) -> int:
    """The workers' ``RLIMIT_AS`` cap: ``settings.worker_memory_bytes`` when the settings have it, else none."""
    return int(getattr(settings, "worker_memory_bytes", 0) or 0)


def helpers_needed(tasks: Sequence[ExtractTask], settings: Settings) -> int:
    """How many pool helpers reading ``tasks`` takes; 0: this process reads them alone.

    Up to :data:`INLINE_MAX_FILES` files (and no ``worker_memory_bytes`` cap
    asked for) are read in this process alone: a helper takes about 0.3 s to
    start (a fresh interpreter importing the reader and pyarrow,
    :mod:`~dicom_assets.engines.helper`), more than reading a small study on
    one core, and small days are the common incremental case.

    With ``n`` workers this process is one of them and the pool holds ``n - 1``
    helpers; under a ``worker_memory_bytes`` cap all ``n`` are capped helpers.
    """
    workers = min(settings.effective_workers(), -(-len(tasks) // max(1, settings.batch_size)))
    capped = bool(worker_address_space_bytes(settings))
    if workers <= 1 or (len(tasks) <= INLINE_MAX_FILES and not capped):
        return 0
    return workers if capped else workers - 1


@contextmanager
def helper_pool(tasks: Sequence[ExtractTask], settings: Settings) -> Iterator[HelperPool | None]:
    """The helpers reading ``tasks`` takes (:func:`helpers_needed`), started now; ``None`` if none.

    On leaving the block normally the helpers are told to stop and not waited
    for (their interpreter teardown, ~0.1 s, need not hold up the commit); on
    an error the block waits until each has finished its current batch.
    """
    helpers = helpers_needed(tasks, settings)
    if not helpers:
        yield None
        return
    pool = HelperPool(helpers, init_worker, (worker_address_space_bytes(settings),), env_defaults=HELPER_ENV)
    finished = False
    try:
        yield pool
        finished = True
    finally:
        pool.close(wait=not finished)


def iter_batches(
    tasks: Sequence[ExtractTask], settings: Settings, now: datetime, table_dir: str, pool: HelperPool | None = None
) -> Iterator[BatchResult]:
    """Run every batch: in this process, helped by ``pool`` if given (see :func:`helper_pool`).

    This process reads batches itself while the helpers start and work, so
    their start-up overlaps useful work instead of leaving the cores idle;
    under a ``worker_memory_bytes`` cap every batch goes to the capped helpers.

    Each process unlinks the originals of the files it compressed in the
    background, while it reads on
    (:func:`~dicom_assets.dicom.compress.settle_removals`); once the last
    batch is out, this waits until every process has done so, so a run that
    went through leaves only the ZIPs. A run that fails (or is abandoned)
    still waits for this process's removals, so none is left to a later run
    of the process; their errors are logged, as the run's own is raised.
    """
    try:
        yield from _run_batches(tasks, settings, now, table_dir, pool)
    except BaseException:
        try:
            settle_removals()
        except OSError as exc:
            log.warning("extraction failed; removing a compressed original failed too: %s", exc.strerror or exc)
        raise
    settle_removals()
    if pool is not None:
        pool.call_each(settle_removals)


def _run_batches(
    tasks: Sequence[ExtractTask], settings: Settings, now: datetime, table_dir: str, pool: HelperPool | None
) -> Iterator[BatchResult]:
    # Batches are index ranges until they are read: a day's tasks may be a
    # TaskTable, whose ExtractTask objects exist only for the batches at hand.
    groups = deque(spans(0, len(tasks), settings.batch_size))
    limits = ReadLimits.from_settings(settings)
    capped = bool(worker_address_space_bytes(settings))

    def take(span: tuple[int, int]) -> list[ExtractTask]:
        return list(tasks[span[0] : span[1]])

    def here(span: tuple[int, int]) -> BatchResult:
        return run_batch(take(span), settings.bulk_data_threshold, now, table_dir, limits, True)

    if pool is None:
        while groups:
            yield here(groups.popleft())
        return
    # Five batches per helper in flight once helpers are working: a helper's
    # finished batches count until this process collects them after its own
    # batch, and with three a helper still waited for work ~3% of the time (with
    # two, ~10%). Results are a few KiB each. Until the first result, two per
    # helper: a batch sent cannot be taken back, and while helpers start (~0.3 s)
    # this process may read what would otherwise wait in their sockets.
    steady, starting = 5 * pool.size, 2 * pool.size
    workers = pool.size if capped else pool.size + 1
    groups = _split_tail(groups, steady + workers, settings.batch_size // 4)
    returned = 0
    while groups or pool.in_flight:
        window = steady if returned else starting
        if not capped:
            # Near the end, hand out no more than this process still has to read
            # itself, so that neither side ends up waiting for the other's queue.
            window = min(window, (len(groups) - 1) * pool.size)
        while groups and pool.in_flight < window:
            pool.submit(run_batch, take(groups.popleft()), settings.bulk_data_threshold, now, table_dir, limits, True)
        if groups and not capped:
            yield here(groups.popleft())
            arrived = list(pool.collect(block=False))
        else:
            arrived = list(pool.collect(block=True))
        returned += len(arrived)
        yield from arrived


def _split_tail(groups: deque[tuple[int, int]], count: int, size: int) -> deque[tuple[int, int]]:
    """The last ``count`` batches (all, if there are fewer) cut into batches of ``size``.

    Whoever finishes first at the end waits for the others' last batches;
    smaller batches there keep that wait short, and give a job of few batches
    enough of them to share.
    """
    if size < 1 or not groups:
        return groups
    count = min(count, len(groups))
    head = list(groups)[: len(groups) - count]
    tail_start = groups[len(groups) - count][0]
    return deque(head + list(spans(tail_start, groups[-1][1], size)))


def run_extraction(
    tasks: Sequence[ExtractTask],
    settings: Settings,
    *,
    metastore_uri: str,
    day: str,
    now: datetime | None = None,
) -> ExtractionOutcome:
    """Extract every task and replace the ``day`` rows of the metastore in one commit."""
    start = time.perf_counter()
    now = now or datetime.now(UTC)
    table_dir = str(delta_commit.table_dir(metastore_uri))
    adds = []
    failures: list[pa.Table] = []
    written = 0
    # Helpers first: they start while this process makes the table (on a fresh
    # lake, delta-rs's first write in a process takes ~0.25 s).
    with helper_pool(tasks, settings) as pool:
        delta.ensure_table(metastore_uri, METASTORE_SCHEMA)
        for rec, fails, n in iter_batches(tasks, settings, now, table_dir, pool):
            if rec is not None:
                adds.append(delta_commit.add_action_from_record(rec))
            failures.append(fails)
            written += n
    extracted = time.perf_counter()
    delta_commit.commit_replace(metastore_uri, METASTORE_SCHEMA, adds, day)
    fail_table = pa.concat_tables([delta.conform(f, FAILURES_SCHEMA) for f in failures]) if failures else FAILURES_SCHEMA.empty_table()
    return ExtractionOutcome(
        rows_written=written,
        failures=fail_table,
        engine="local",
        seconds=time.perf_counter() - start,
        details={"extract_seconds": extracted - start, "commit_seconds": time.perf_counter() - extracted, "parts": len(adds)},
    )
