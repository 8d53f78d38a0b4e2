"""delta.read with ``where``: file pruning, then key columns, then only the matching row groups."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, WriterProperties, write_deltalake

from dicom_assets.lake import delta, delta_read, rowgroups

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
    got = delta_read.read(table, SCHEMA, where={"study": ["s1", "s5"], "day": "d2"})
    assert sorted(got.column("n").to_pylist()) == _expected({"s1", "s5"}, "d2")
    assert got.schema == SCHEMA


def test_columns_and_a_single_value(table: Path) -> None:
    got = delta_read.read(table, SCHEMA, columns=["n"], where={"study": "s12"})
    assert got.column_names == ["n"] and sorted(got.column("n").to_pylist()) == _expected({"s12"})


def test_nulls_and_absent_values_never_match(table: Path) -> None:
    assert delta_read.read(table, SCHEMA, where={"study": ["nope"]}).num_rows == 0
    everything = delta_read.read(table, SCHEMA)
    assert everything.num_rows == 1250


def test_iter_read_yields_one_table_per_file(table: Path) -> None:
    parts = list(delta_read.iter_read(table, SCHEMA, columns=["n"], where={"day": "d0"}))
    assert len(parts) == 2 and sum(p.num_rows for p in parts) == len([i for i in range(1250) if i % 3 == 0])


@pytest.mark.parametrize("where", [None, {"day": "d0"}, {"study": ["s1", "s5"], "day": "d2"}])
def test_iter_read_in_batches_streams_the_same_rows(table: Path, where: dict[str, object] | None) -> None:
    batches = list(delta_read.iter_read(table, SCHEMA, columns=["n", "payload"], where=where, batch_rows=37))  # type: ignore[arg-type]
    assert all(0 < b.num_rows <= 37 for b in batches) and all(b.column_names == ["n", "payload"] for b in batches)
    got = [n for b in batches for n in b.column("n").to_pylist()]
    if where is None:
        assert sorted(got) == list(range(1250))
    elif "study" in where:
        assert sorted(got) == _expected({"s1", "s5"}, "d2")
    else:
        assert sorted(got) == [i for i in range(1250) if i % 3 == 0]


def test_an_absent_table_reads_empty(tmp_path: Path) -> None:
    got = delta_read.read(tmp_path / "none", SCHEMA, columns=["study"], where={"study": "s1"})
    assert got.num_rows == 0 and got.column_names == ["study"]
    assert list(delta_read.iter_read(tmp_path / "none", SCHEMA)) == []


def test_integer_keys_select_and_prune(table: Path) -> None:
    got = delta_read.read(table, SCHEMA, columns=["n"], where={"n": [3, 1100, 99999]})
    assert sorted(got.column("n").to_pylist()) == [3, 1100]
    assert delta_read.read(table, SCHEMA, where={"n": 7}).column("study").to_pylist() == ["s7"]


def test_count_comes_from_the_log_and_matches_a_scan(table: Path) -> None:
    assert delta.count(table) == 1250 == DeltaTable(str(table)).to_pyarrow_dataset().count_rows()
    assert delta.count(table.parent / "absent") == 0


# ---- upsert: new keys appended, known keys merged -------------------------------------------------

UP = pa.schema([("k", pa.string()), ("v", pa.int64()), ("t", pa.int64())])


def _up(rows: list[tuple[str, int, int]]) -> pa.Table:
    return pa.Table.from_pylist([{"k": k, "v": v, "t": t} for k, v, t in rows], schema=UP)


def test_upsert_appends_new_keys_and_merges_known_ones(tmp_path: Path) -> None:
    import contextlib
    import threading

    uri = tmp_path / "u"
    held = threading.Lock()
    calls: list[bool] = []

    @contextlib.contextmanager
    def lock():  # type: ignore[no-untyped-def]
        with held:
            calls.append(True)
            yield

    first = delta.upsert(uri, _up([("a", 1, 1), ("b", 2, 1)]), UP, keys=["k"], lock=lock, update_predicate="s.t > t.t")
    assert first == {"num_target_rows_inserted": 2, "num_target_rows_updated": 0}
    ops = [c["operation"] for c in DeltaTable(str(uri)).history()]
    assert "MERGE" not in ops  # nothing known yet: a plain append
    second = delta.upsert(
        uri, _up([("a", 10, 2), ("b", 20, 0), ("c", 3, 1)]), UP, keys=["k"], lock=lock, update_predicate="s.t > t.t"
    )
    assert second == {"num_target_rows_inserted": 1, "num_target_rows_updated": 1}
    got = {r["k"]: r["v"] for r in delta_read.read(uri, UP).to_pylist()}
    assert got == {"a": 10, "b": 2, "c": 3}  # b's update was older: kept
    assert len(calls) == 2


def test_upsert_ends_like_one_merge_whatever_the_split(tmp_path: Path) -> None:
    rows = [(f"k{i % 17}", i, i % 5) for i in range(120)]
    split = tmp_path / "split"
    pred = "s.t > t.t OR (s.t = t.t AND s.v > t.v)"
    for i in range(0, 120, 7):
        delta.upsert(split, _up(rows[i : i + 7]), UP, keys=["k"], lock=_nolock, update_predicate=pred)
    best: dict[str, tuple[int, int]] = {}
    for k, v, t in rows:
        if k not in best or (t, v) > (best[k][1], best[k][0]):
            best[k] = (v, t)
    got = {r["k"]: (r["v"], r["t"]) for r in delta_read.read(split, UP).to_pylist()}
    assert got == best and delta.count(split) == 17


def _nolock():  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.nullcontext()


def test_files_whose_statistics_show_every_row_matching_are_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with one day (min = max) is read whole; a mixed one by its keys; results are exact either way."""
    uri = tmp_path / "days"
    one_day = pa.table({"study": ["a", "b", None], "day": ["d1"] * 3, "payload": ["p"] * 3, "n": [0, 1, 2]}, schema=SCHEMA)
    mixed = pa.table({"study": ["a", "b"], "day": ["d1", "d2"], "payload": ["p"] * 2, "n": [3, 4]}, schema=SCHEMA)
    long_uid = "1.2.826.0.1.3680043.8.498." + "1" * 40
    long_values = pa.table({"study": [long_uid, long_uid + "9"], "day": ["d3"] * 2, "payload": ["p"] * 2, "n": [5, 6]}, schema=SCHEMA)
    for t in (one_day, mixed, long_values):
        write_deltalake(str(uri), t, mode="append")
    keyed: list[str] = []
    real = rowgroups.matching_rows

    def spy(f: str, *a: object) -> object:
        keyed.append(f)
        return real(f, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(rowgroups, "matching_rows", spy)
    got = delta_read.read(uri, SCHEMA, where={"day": "d1"})
    assert sorted(got.column("n").to_pylist()) == [0, 1, 2, 3]
    assert len(keyed) == 1  # only the mixed file needed its keys read (the others are pruned or whole)
    keyed.clear()
    # A value as long as delta-rs's truncated string statistics is never trusted to min = max.
    got = delta_read.read(uri, SCHEMA, where={"study": long_uid})
    assert got.column("n").to_pylist() == [5] and len(keyed) == 1
