"""One batch of the local engine: read its files, write their rows as a Parquet part.

Pool helpers run :func:`run_batch`, so this module, and what it imports, is
what a helper loads while it starts: the reader, pyarrow and the part writer,
not delta-rs and not the pool (:mod:`dicom_assets.engines.helper`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa

from dicom_assets.dicom.budget import ReadLimits
from dicom_assets.dicom.extract import extract_batch_arrow
from dicom_assets.dicom.records import ExtractTask
from dicom_assets.lake import parts
from dicom_assets.lake.schemas import METASTORE_SCHEMA, conform

#: (part record or ``None`` when no row was read, failures, rows written).
BatchResult = tuple[dict[str, Any] | None, pa.Table, int]


def run_batch(
    tasks: list[ExtractTask],
    threshold: int,
    now: datetime,
    table_dir: str,
    limits: ReadLimits | None = None,
    defer_removal: bool = False,
) -> BatchResult:
    """Extract one batch and write its rows as a part file of the table at ``table_dir``.

    Returns the part's record (:func:`~dicom_assets.lake.parts.write_part_file`),
    the batch's failure records and the number of rows written. With
    ``defer_removal``, compressed originals are unlinked in the background
    (:func:`~dicom_assets.dicom.compress.settle_removals` waits for them).
    """
    rows, fails = extract_batch_arrow(
        tasks, bulk_data_threshold=threshold, now=now, limits=limits, defer_removal=defer_removal
    )
    rows = conform(rows, METASTORE_SCHEMA)
    if rows.num_rows == 0:
        return None, fails, 0
    return parts.write_part_file(table_dir, rows), fails, rows.num_rows
