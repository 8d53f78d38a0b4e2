"""The embedded engine: a ``spawn`` process pool over batches of files (SPEC §7).

delta-rs holds threads and locks that a forked child inherits in a broken
state, so the pool always uses the ``spawn`` start method (without re-importing
the parent's main module: :mod:`dicom_assets.engines.spawn`). Each worker writes
its batch's rows as one Parquet part file straight into the table folder and
returns only the small add-action record and its failures; the calling
process reads batches too (see :func:`iter_batches`) and commits every part
in one Delta transaction (the same path the Spark engine takes).
Memory is bounded by batch size times workers, not by the number of files,
and a lost commit race re-plans the commit without re-reading any file.

Every file is read within the settings' budget (``file_timeout_seconds``,
``max_file_bytes``; :mod:`dicom_assets.dicom.budget`); each pool task runs in
its worker's main thread, so the ``SIGALRM`` backstop of the time limit
applies there. Pool workers can also get an address-space limit
(``RLIMIT_AS``, see :func:`~dicom_assets.engines.helper.init_worker`): a file that still needs more memory
then fails with ``TooLarge`` instead of waking the kernel's OOM killer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from dicom_assets.config import Settings
from dicom_assets.dicom.budget import ReadLimits
from dicom_assets.dicom.extract import extract_batch_arrow
from dicom_assets.dicom.records import ExtractTask
from dicom_assets.engines.base import ExtractionOutcome, batches
from dicom_assets.engines.helper import init_worker
from dicom_assets.engines.spawn import LeanSpawnContext
from dicom_assets.lake import delta, delta_commit
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA

BatchResult = tuple[dict[str, Any] | None, pa.Table, int]

#: At most this many files are read without starting a pool (see :func:`iter_batches`).
INLINE_MAX_FILES = 192


def worker_address_space_bytes(settings: Settings) -> int:
    """The workers' ``RLIMIT_AS`` cap: ``settings.worker_memory_bytes`` when the settings have it, else none."""
    return int(getattr(settings, "worker_memory_bytes", 0) or 0)


def run_batch(
    tasks: list[ExtractTask], threshold: int, now: datetime, table_dir: str, limits: ReadLimits | None = None
) -> BatchResult:
    """Extract one batch and write its rows as a part file; returns (add record, failures, rows)."""
    rows, fails = extract_batch_arrow(tasks, bulk_data_threshold=threshold, now=now, limits=limits)
    rows = delta.conform(rows, METASTORE_SCHEMA)
    if rows.num_rows == 0:
        return None, fails, 0
    add = delta_commit.write_part(table_dir, rows)
    return delta_commit.add_action_to_record(add), fails, rows.num_rows


def iter_batches(
    tasks: Sequence[ExtractTask], settings: Settings, now: datetime, table_dir: str
) -> Iterator[BatchResult]:
    """Run every batch: in this process, helped by a spawn pool when there is more than one batch and worker.

    Up to :data:`INLINE_MAX_FILES` files (and no ``worker_memory_bytes`` cap
    asked for) are read in this process alone: a spawn helper takes about
    0.4 s to start (it imports the reader and pyarrow afresh,
    :mod:`~dicom_assets.engines.helper`), more than reading a small study
    on one core, and small days are the common incremental case.

    With ``n`` workers this process is one of them and the pool holds ``n - 1``:
    it reads batches itself while the helpers start and work, so their start-up
    overlaps useful work instead of leaving the cores idle. Under a
    ``worker_memory_bytes`` cap every batch goes to the capped pool workers.
    """
    groups = deque(batches(tasks, settings.batch_size))
    workers = min(settings.effective_workers(), len(groups))
    limits = ReadLimits.from_settings(settings)
    capped = bool(worker_address_space_bytes(settings))
    if len(tasks) <= INLINE_MAX_FILES and not capped:
        workers = 1

    def here(group: list[ExtractTask]) -> BatchResult:
        return run_batch(group, settings.bulk_data_threshold, now, table_dir, limits)

    if workers <= 1:
        while groups:
            yield here(groups.popleft())
        return
    helpers = workers if capped else workers - 1
    # Three batches per helper in flight: with two, a helper sat idle ~10% of the
    # time, as handing it the next batch waits for this process to finish its own.
    # The window also bounds memory.
    window = 3 * helpers
    groups = _split_tail(groups, window + workers, settings.batch_size // 4)
    pool = ProcessPoolExecutor(
        max_workers=helpers,
        mp_context=LeanSpawnContext(),
        initializer=init_worker,
        initargs=(worker_address_space_bytes(settings),),
    )
    finished = False
    try:
        pending: set[Future[BatchResult]] = set()
        while groups or pending:
            while groups and len(pending) < window:
                pending.add(pool.submit(run_batch, groups.popleft(), settings.bulk_data_threshold, now, table_dir, limits))
            if groups and not capped:
                yield here(groups.popleft())
                done = {f for f in pending if f.done()}
                pending -= done
            else:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
        finished = True
    finally:
        # Once every result is in, the helpers' exit (~0.1 s of interpreter
        # teardown) need not hold up the commit; on an error, wait for them.
        pool.shutdown(wait=not finished, cancel_futures=True)


def _split_tail(groups: deque[list[ExtractTask]], count: int, size: int) -> deque[list[ExtractTask]]:
    """The last ``count`` batches cut into batches of ``size``.

    Whoever finishes first at the end waits for the others' last batches;
    smaller batches there keep that wait short.
    """
    if size < 1 or len(groups) <= count:
        return groups
    head = list(groups)[:-count]
    tail = [t for g in list(groups)[-count:] for t in g]
    return deque(head + list(batches(tail, size)))


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
    delta.ensure_table(metastore_uri, METASTORE_SCHEMA)
    table_dir = str(delta_commit.table_dir(metastore_uri))
    adds = []
    failures: list[pa.Table] = []
    written = 0
    for rec, fails, n in iter_batches(tasks, settings, now, table_dir):
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
