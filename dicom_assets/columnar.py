"""Many small frozen records held as Arrow columns; the record objects are made on access.

A day of 100,000 files listed as Python objects (paths, lineage, one record
per file) held ~80 MB of small blocks while a step ran. Whatever else the run
allocated and kept meanwhile (modules imported on first use, caches, Delta log
state) landed between them, so when the list was freed CPython's allocator
could not give its arenas back: the process stayed ~50-100 MB higher for the
rest of the run, and the later steps' peaks sat on that floor. As columns, the
same records take a few large buffers that are freed whole, about a third of
the size; only the records at hand exist as objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields
from functools import cache
from typing import Any, Generic, TypeVar, overload

import pyarrow as pa

T = TypeVar("T")

#: Records turned into columns at a time (and made into objects at a time when iterated).
CHUNK_ROWS = 8_192


@cache
def warm_conversion() -> None:
    """Load what Arrow's first conversion from Python objects imports (pandas, when installed).

    :class:`Rows` calls it when made, before its records (or the listing they
    come from) are held, so those modules' objects are not allocated among
    them and do not pin their memory after they are freed.
    """
    pa.array([b"warm"], type=pa.binary())


def _encode(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8", "surrogateescape")


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


class Rows(Sequence[T], Generic[T]):
    """Records of the frozen dataclass ``row_type`` kept as a ``schema`` table.

    ``schema`` has one field per dataclass field, in order. Text goes in
    ``binary`` fields (UTF-8 with ``surrogateescape``): a file name need not be
    UTF-8, and a record must name the file exactly as the operating system
    does. Appended records wait as objects until :data:`CHUNK_ROWS` of them
    are turned into a batch of columns.
    """

    def __init__(self, row_type: type[T], schema: pa.Schema, table: pa.Table | None = None, *, chunk_rows: int = CHUNK_ROWS) -> None:
        names = [f.name for f in fields(row_type)]  # type: ignore[arg-type]  # a dataclass, checked here
        if names != schema.names:
            raise ValueError(f"schema fields {schema.names} do not follow {row_type.__name__}'s fields {names}")
        if table is not None and not table.schema.equals(schema):
            raise ValueError(f"table has schema {table.schema}, expected {schema}")
        warm_conversion()
        self.row_type, self.schema = row_type, schema
        self._text = [f.type == pa.binary() for f in schema]
        self._chunk_rows = max(1, chunk_rows)
        self._batches: list[pa.RecordBatch] = table.to_batches() if table is not None else []
        self._done = table.num_rows if table is not None else 0
        self._pending: list[T] = []
        self._table: pa.Table | None = table

    def append(self, row: T) -> None:
        self._pending.append(row)
        if len(self._pending) >= self._chunk_rows:
            self._flush()

    def extend(self, rows: Iterable[T]) -> None:
        for row in rows:
            self.append(row)

    def _flush(self) -> None:
        if not self._pending:
            return
        columns = [
            pa.array([_encode(getattr(r, f.name)) if text else getattr(r, f.name) for r in self._pending], type=f.type)
            for f, text in zip(self.schema, self._text, strict=True)
        ]
        self._batches.append(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._done += len(self._pending)
        self._pending = []
        self._table = None

    @property
    def table(self) -> pa.Table:
        """Every record so far, as columns."""
        self._flush()
        if self._table is None:
            self._table = pa.Table.from_batches(self._batches, schema=self.schema)
        return self._table

    def __len__(self) -> int:
        return self._done + len(self._pending)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._rows(self.table.slice(start, max(0, stop - start)))
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} records")
        return self._rows(self.table.slice(i, 1))[0]

    def __iter__(self) -> Iterator[T]:
        table = self.table
        for start in range(0, table.num_rows, CHUNK_ROWS):
            yield from self._rows(table.slice(start, CHUNK_ROWS))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"Rows[{self.row_type.__name__}]({len(self)} records)"

    def _rows(self, part: pa.Table) -> list[T]:
        columns: list[list[Any]] = [
            [_decode(v) for v in part.column(i).to_pylist()] if text else part.column(i).to_pylist()
            for i, text in enumerate(self._text)
        ]
        return [self.row_type(*values) for values in zip(*columns, strict=True)]

    def count_by(self, name: str) -> dict[Any, int]:
        """How many records have each value of field ``name`` (e.g. ``source_system``)."""
        counts = self.table.column(name).value_counts()
        values = counts.field("values").to_pylist()
        if self.schema.field(name).type == pa.binary():
            values = [_decode(v) for v in values]
        return dict(zip(values, counts.field("counts").to_pylist(), strict=True))
