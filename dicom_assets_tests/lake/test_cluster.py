"""cluster.merge_sorted: overlapping files become one sorted run, with the same rows.

Expected values come from the table read back by delta-rs before the merge,
never from the module under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from dicom_assets.lake import cluster, delta

SCHEMA = pa.schema([("study", pa.string()), ("sop", pa.string()), ("n", pa.int64()), ("payload", pa.string())])
KEY = ["study", "sop"]


def _rows(rnd: random.Random, chunk: int, n: int) -> list[dict]:
    return [
        {
            "study": rnd.choice([None, *(f"1.2.{s}" for s in range(30))]),
            "sop": rnd.choice([None, f"{chunk}.{i}"]),
            "n": i,
            "payload": "x" * rnd.randrange(200),
        }
        for i in range(n)
    ]


def _appended(uri: str, rnd: random.Random, chunks: int = 4, rows: int = 80) -> None:
    for chunk in range(chunks):  # each append spans the whole key range, as silver's rounds do
        t = pa.Table.from_pylist(_rows(rnd, chunk, rows), schema=SCHEMA)
        delta.append(uri, t, SCHEMA, sort_by=KEY, row_group_rows=16)


def _content(uri: str) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in DeltaTable(uri).to_pyarrow_table().to_pylist())


def _sort_key(r: dict) -> tuple:
    return tuple((1, "") if r[c] is None else (0, r[c]) for c in KEY)


def _files(uri: str) -> list[pa.Table]:
    dt = DeltaTable(uri)
    return [pq.read_table(f) for f in dt.file_uris()]


def _last_commit(uri: str) -> list[dict]:
    log = sorted((Path(uri) / "_delta_log").glob("*.json"))[-1]
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("seed", range(4))
def test_same_rows_one_sorted_run(tmp_path: Path, seed: int) -> None:
    uri = str(tmp_path / "t")
    _appended(uri, random.Random(seed))
    want = _content(uri)
    names = sorted(delta.live_files(uri))
    result = cluster.merge_sorted(uri, SCHEMA, names, KEY, file_rows=50, row_group_rows=16)
    assert _content(uri) == want
    assert result.removed == 4 and result.rows == 320 and result.added == len(delta.live_files(uri))
    assert not (delta.live_files(uri) & set(names))
    files = [f.to_pylist() for f in _files(uri)]
    for rows in files:  # each file sorted, and no study in two files
        assert [_sort_key(r) for r in rows] == sorted(_sort_key(r) for r in rows)
        assert 0 < len(rows) <= cluster.FILE_STRETCH * 50
    ranges = sorted((_sort_key(rows[0])[0], _sort_key(rows[-1])[0]) for rows in files)
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for f in DeltaTable(uri).file_uris():
        md = pq.ParquetFile(f).metadata
        assert all(md.row_group(i).num_rows <= 16 for i in range(md.num_row_groups))
    actions = _last_commit(uri)
    changes = [a[k]["dataChange"] for a in actions for k in ("add", "remove") if k in a]
    assert len(changes) == result.added + result.removed and not any(changes)


def test_an_input_out_of_order_is_sorted_first(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    rnd = random.Random(7)
    delta.ensure_table(uri, SCHEMA)
    for chunk in range(3):  # not sorted: as delta-rs wrote it
        write_deltalake(uri, pa.Table.from_pylist(_rows(rnd, chunk, 60), schema=SCHEMA), mode="append")
    want = _content(uri)
    cluster.merge_sorted(uri, SCHEMA, sorted(delta.live_files(uri)), KEY, file_rows=1000, row_group_rows=32)
    assert _content(uri) == want
    (rows,) = [f.to_pylist() for f in _files(uri)]
    assert [_sort_key(r) for r in rows] == sorted(_sort_key(r) for r in rows)


def test_nothing_to_do(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    _appended(uri, random.Random(1), chunks=2)
    names = sorted(delta.live_files(uri))
    version = DeltaTable(uri).version()
    assert cluster.merge_sorted(uri, SCHEMA, names[:1], KEY, file_rows=10, row_group_rows=4) == cluster.ClusterResult(0, 0, 0)
    assert cluster.merge_sorted(uri, SCHEMA, [names[0], "part-gone.parquet"], KEY, file_rows=10, row_group_rows=4).added == 0
    assert DeltaTable(uri).version() == version


def test_an_input_rewritten_meanwhile_commits_nothing_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path / "t")
    _appended(uri, random.Random(3), chunks=3)
    gather = cluster._gather
    raced = []

    def racing(*args: object) -> pa.Table:
        if not raced:  # another writer deletes rows while the merge runs
            delta.delete_where(uri, "n = 1")
            raced.append(True)
        return gather(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cluster, "_gather", racing)
    before_files = set(p.name for p in Path(uri).glob("*.parquet"))
    result = cluster.merge_sorted(uri, SCHEMA, sorted(delta.live_files(uri)), KEY, file_rows=40, row_group_rows=8)
    assert result == cluster.ClusterResult(0, 0, 0)
    assert not any(r["n"] == 1 for r in DeltaTable(uri).to_pyarrow_table().to_pylist())
    made = {p.name for p in Path(uri).glob("*.parquet")} - before_files
    assert made == delta.live_files(uri) - before_files  # only delete_where's rewrites, no orphaned output


def test_appends_are_compressed(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    _appended(uri, random.Random(2), chunks=1)
    (f,) = DeltaTable(uri).file_uris()
    md = pq.ParquetFile(f).metadata
    assert {md.row_group(0).column(i).compression for i in range(md.num_columns)} == {"SNAPPY"}


def test_concatenate_keeps_rows_and_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path / "t")
    rnd = random.Random(5)
    for chunk in range(9):  # small parts, as extraction writes them
        delta.append(uri, pa.Table.from_pylist(_rows(rnd, chunk, 7), schema=SCHEMA), SCHEMA)
    names = [Path(f).name for f in DeltaTable(uri).file_uris()]
    want = [json.dumps(r, sort_keys=True) for f in DeltaTable(uri).file_uris() for r in pq.read_table(f).to_pylist()]
    monkeypatch.setattr("dicom_assets.lake.delta_commit.CHECKPOINT_AFTER_ADDS", 10)
    result = cluster.concatenate(uri, SCHEMA, names, file_rows=20, row_group_rows=5)
    assert result == cluster.ClusterResult(removed=9, added=4, rows=63)
    outputs = [pq.ParquetFile(f) for f in DeltaTable(uri).file_uris()]
    assert sorted(f.metadata.num_rows for f in outputs) == [3, 20, 20, 20]
    assert all(f.metadata.row_group(i).num_rows <= 5 for f in outputs for i in range(f.metadata.num_row_groups))
    by_first = sorted(outputs, key=lambda f: -f.metadata.num_rows)  # the short file is the last
    got = [json.dumps(r, sort_keys=True) for f in by_first for r in f.read().to_pylist()]
    assert got == want
    assert not any(a[k]["dataChange"] for a in _last_commit(uri) for k in ("add", "remove") if k in a)
    assert (Path(uri) / "_delta_log" / "_last_checkpoint").exists()  # 13 actions >= 10
