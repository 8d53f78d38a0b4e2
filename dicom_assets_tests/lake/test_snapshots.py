"""A cached table snapshot always reads as a fresh ``DeltaTable`` would: new commits, a remade table, no table."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from dicom_assets.lake import delta, delta_read, snapshots


def _rows(dt: DeltaTable) -> list[int]:
    return sorted(dt.to_pyarrow_table().column("n").to_pylist())


def test_a_cached_snapshot_sees_commits_made_after_it_was_opened(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"n": [1]}))
    first = snapshots.latest(uri)
    assert _rows(first) == [1]
    write_deltalake(uri, pa.table({"n": [2]}), mode="append")  # another writer, another object
    again = snapshots.latest(uri)
    assert again is first and again.version() == 1 and _rows(again) == [1, 2]
    assert delta.count(uri) == 2 and delta_read.read(uri).num_rows == 2


def test_a_table_removed_and_made_again_at_the_same_path_is_read_anew(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"n": [1]}))
    for n in (2, 3):
        write_deltalake(uri, pa.table({"n": [n]}), mode="append")
    assert _rows(snapshots.latest(uri)) == [1, 2, 3]
    shutil.rmtree(uri)
    write_deltalake(uri, pa.table({"n": [9]}))  # version 0 again, lower than the cached 2
    assert _rows(snapshots.latest(uri)) == [9]
    assert delta_read.read(uri).column("n").to_pylist() == [9]


def test_a_removed_table_is_not_found(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"n": [1]}))
    assert _rows(snapshots.latest(uri)) == [1]
    shutil.rmtree(uri)
    with pytest.raises(TableNotFoundError):
        snapshots.latest(uri)
    assert delta_read.read(uri, pa.schema([("n", pa.int64())])).num_rows == 0


def test_each_thread_has_its_own_snapshot(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    write_deltalake(uri, pa.table({"n": [1]}))
    here = snapshots.latest(uri)
    there: list[DeltaTable] = []
    t = threading.Thread(target=lambda: there.append(snapshots.latest(uri)))
    t.start()
    t.join()
    assert there[0] is not here and _rows(there[0]) == [1]
