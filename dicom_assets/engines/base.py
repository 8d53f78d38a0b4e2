"""What every extraction engine returns, so assets don't care which one ran."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class ExtractionOutcome:
    """Result of extracting one partition into the bronze metastore.

    ``rows_written`` rows now stand in the metastore for the partition;
    ``failures`` has FAILURES_SCHEMA, one row per file that could not be read.
    """

    rows_written: int
    failures: pa.Table
    engine: str
    seconds: float = 0.0
    details: dict[str, float] = field(default_factory=dict)


def spans(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    """Index ranges ``(i, j)`` of ``size`` items covering ``start:stop``: the batches of tasks one worker call reads.

    A batch is many files, never one process per file; the tasks themselves
    are taken from their sequence only when the batch is read.
    """
    size = max(1, size)
    for i in range(start, stop, size):
        yield i, min(i + size, stop)
