"""What every extraction engine returns, so assets don't care which one ran."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from dicom_assets.dicom.records import ExtractTask


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


def batches(tasks: Sequence[ExtractTask], size: int) -> Iterator[list[ExtractTask]]:
    """Split tasks into batches of ``size`` (files per worker call, never one process per file)."""
    size = max(1, size)
    for i in range(0, len(tasks), size):
        yield list(tasks[i : i + size])
