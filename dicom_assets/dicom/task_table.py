"""A day's extraction tasks held as Arrow columns (:class:`~dicom_assets.columnar.Rows`).

The engines take any sequence of :class:`ExtractTask`; they take this one a
batch at a time, so only the batches being read exist as objects.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from dicom_assets.columnar import CHUNK_ROWS, Rows
from dicom_assets.dicom.records import ExtractTask

#: One column per :class:`ExtractTask` field, in field order (text as bytes, see :class:`Rows`).
TASK_SCHEMA = pa.schema(
    [
        pa.field("path", pa.binary(), nullable=False),
        pa.field("file_path", pa.binary(), nullable=False),
        pa.field("original_path", pa.binary(), nullable=False),
        pa.field("source_system", pa.binary(), nullable=False),
        pa.field("ingest_date", pa.binary(), nullable=False),
        pa.field("source_modified_at", pa.float64(), nullable=False),
        pa.field("member", pa.binary()),
    ]
)


class TaskTable(Rows[ExtractTask]):
    """Extraction tasks as a :data:`TASK_SCHEMA` table; indexing and slicing give :class:`ExtractTask`."""

    def __init__(self, table: pa.Table | None = None, *, chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__(ExtractTask, TASK_SCHEMA, table, chunk_rows=chunk_rows)

    @classmethod
    def from_tasks(cls, tasks: Iterable[ExtractTask], *, chunk_rows: int = CHUNK_ROWS) -> TaskTable:
        """Columns of ``tasks``, taken ``chunk_rows`` at a time (an iterator is never held whole)."""
        out = cls(chunk_rows=chunk_rows)
        out.extend(tasks)
        return out
