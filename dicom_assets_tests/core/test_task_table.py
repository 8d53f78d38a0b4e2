"""A day's tasks as Arrow columns give back exactly the ExtractTask objects they were made of."""

from __future__ import annotations

from dataclasses import fields

import pytest

from dicom_assets.dicom.records import ExtractTask
from dicom_assets.dicom.task_table import TASK_SCHEMA, TaskTable


def _tasks(n: int) -> list[ExtractTask]:
    out = []
    for i in range(n):
        # A name that is not UTF-8 (byte 0xE9) as os.listdir gives it: with a lone surrogate.
        raw = f"/lake/Process/ns{i % 3}/2024/05/06/f{i}\udce9.dcm"
        compressed = i % 2 == 0
        out.append(
            ExtractTask(
                path=raw + ".zip" if compressed else raw,
                file_path=raw + ".zip",
                original_path=f"/lake/Ingest/ns{i % 3}/f{i}\udce9.dcm",
                source_system=f"ns{i % 3}",
                ingest_date="2024/05/06",
                source_modified_at=1_714_953_600.25 + i,
                member=f"f{i}\udce9.dcm" if compressed else None,
            )
        )
    return out


def test_the_schema_follows_the_task_fields() -> None:
    assert TASK_SCHEMA.names == [f.name for f in fields(ExtractTask)]


@pytest.mark.parametrize("chunk_rows", [1, 3, 8_192])
def test_tasks_come_back_equal_in_order(chunk_rows: int) -> None:
    tasks = _tasks(10)
    table = TaskTable.from_tasks(iter(tasks), chunk_rows=chunk_rows)  # an iterator, read in chunks
    assert len(table) == 10 and list(table) == tasks
    assert table[0] == tasks[0] and table[-1] == tasks[-1] and table[7] == tasks[7]
    assert table[2:5] == tasks[2:5] and table[8:50] == tasks[8:] and table[::4] == tasks[::4] and table[5:2] == []
    # the file names round-trip byte for byte
    assert table[1].path.encode("utf-8", "surrogateescape").endswith(b"f1\xe9.dcm")


def test_counts_and_bounds() -> None:
    table = TaskTable.from_tasks(_tasks(10))
    assert table.count_by("source_system") == {"ns0": 4, "ns1": 3, "ns2": 3}
    with pytest.raises(IndexError):
        table[10]
    with pytest.raises(IndexError):
        table[-11]
    empty = TaskTable.from_tasks([])
    assert len(empty) == 0 and not empty and list(empty) == [] and empty.count_by("source_system") == {}


def test_a_table_of_another_shape_is_refused() -> None:
    other = TaskTable.from_tasks(_tasks(2)).table.drop_columns(["member"])
    with pytest.raises(ValueError, match="schema"):
        TaskTable(other)
