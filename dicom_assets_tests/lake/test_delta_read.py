"""delta.read with ``where``: file pruning, then key columns, then only the matching row groups."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, WriterProperties, write_deltalake

from dicom_assets.lake import delta

SCHEMA = pa.schema([("study", pa.string()), ("day", pa.string()), ("payload", pa.string()), ("n", pa.int64())])


def _rows(n: int, offset: int = 0) -> pa.Table:
    return pa.table(
        {
            "study": [None if i % 11 == 0 else f"s{i % 13}" for i in range(offset, offset + n)],
            "day": [f"d{i % 3}" for i in range(offset, offset + n)],
            "payload": ["x" * 50] * n,
            "n": list(range(offset, offset + n)),
        },
        schema=SCHEMA,
    )


@pytest.fixture
def table(tmp_path: Path) -> Path:
    uri = tmp_path / "t"
    props = WriterProperties(max_row_group_size=100)
    write_deltalake(str(uri), _rows(1000), mode="append", writer_properties=props)
    write_deltalake(str(uri), _rows(250, offset=1000), mode="append", writer_properties=props)
    return uri


def _expected(study: set[str], day: str | None = None) -> list[int]:
    every = _rows(1250).to_pylist()
    return sorted(r["n"] for r in every if r["study"] in study and (day is None or r["day"] == day))


def test_files_have_many_row_groups(table: Path) -> None:
    files = DeltaTable(str(table)).file_uris()
    assert len(files) == 2 and all(pq.ParquetFile(f).num_row_groups > 1 for f in files)


def test_where_selects_exactly_the_matching_rows(table: Path) -> None:
    got = delta.read(table, SCHEMA, where={"study": ["s1", "s5"], "day": "d2"})
    assert sorted(got.column("n").to_pylist()) == _expected({"s1", "s5"}, "d2")
    assert got.schema == SCHEMA


def test_columns_and_a_single_value(table: Path) -> None:
    got = delta.read(table, SCHEMA, columns=["n"], where={"study": "s12"})
    assert got.column_names == ["n"] and sorted(got.column("n").to_pylist()) == _expected({"s12"})


def test_nulls_and_absent_values_never_match(table: Path) -> None:
    assert delta.read(table, SCHEMA, where={"study": ["nope"]}).num_rows == 0
    everything = delta.read(table, SCHEMA)
    assert everything.num_rows == 1250


def test_iter_read_yields_one_table_per_file(table: Path) -> None:
    parts = list(delta.iter_read(table, SCHEMA, columns=["n"], where={"day": "d0"}))
    assert len(parts) == 2 and sum(p.num_rows for p in parts) == len([i for i in range(1250) if i % 3 == 0])


def test_an_absent_table_reads_empty(tmp_path: Path) -> None:
    got = delta.read(tmp_path / "none", SCHEMA, columns=["study"], where={"study": "s1"})
    assert got.num_rows == 0 and got.column_names == ["study"]
    assert list(delta.iter_read(tmp_path / "none", SCHEMA)) == []
