"""Key lookups by row group: footer statistics narrow the read, and never hide a match.

Expected rows come from filtering the whole table with pyarrow, not from the
code under test.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, WriterProperties, write_deltalake

from dicom_assets.lake import delta_read, rowgroups

SCHEMA = pa.schema([("uid", pa.string()), ("n", pa.int64()), ("payload", pa.string())])


def _uids(count: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    # DICOM UIDs of the 2.25 (UUID-derived) root share a long prefix, as real ones do.
    return [f"2.25.{rnd.getrandbits(120)}" for _ in range(count)]


def _sorted_table(uids: list[str], start: int = 0) -> pa.Table:
    uids = sorted(uids)
    return pa.table({"uid": uids, "n": list(range(start, start + len(uids))), "payload": ["p" * 40] * len(uids)}, schema=SCHEMA)


def test_a_sorted_file_offers_only_the_row_group_of_the_key(tmp_path: Path) -> None:
    t = _sorted_table(_uids(1000, 1))
    path = str(tmp_path / "f.parquet")
    pq.write_table(t, path, row_group_size=100)
    md = pq.read_metadata(path)
    keys = t.column("uid").to_pylist()
    assert rowgroups.candidate_row_groups(md, {"uid": [keys[250]]}) == [2]
    assert rowgroups.candidate_row_groups(md, {"uid": sorted([keys[5], keys[999]])}) == [0, 9]
    assert rowgroups.candidate_row_groups(md, {"n": [420]}) == [4]
    assert rowgroups.candidate_row_groups(md, {"uid": ["9.9"]}) == []  # above every key
    assert rowgroups.candidate_row_groups(md, {"uid": [keys[250]], "n": [420]}) == []  # both must hold


@pytest.mark.parametrize("truncate", [None, 6, 12])
def test_cut_statistics_never_hide_a_row(tmp_path: Path, truncate: int | None) -> None:
    """parquet-rs cuts long string statistics; every lookup still equals a full scan."""
    uri = str(tmp_path / "t")
    props = WriterProperties(max_row_group_size=64, statistics_truncate_length=truncate)
    first, second = _uids(700, 2), _uids(300, 3)
    write_deltalake(uri, _sorted_table(first), mode="append", writer_properties=props)
    write_deltalake(uri, _sorted_table(second, start=700), mode="append", writer_properties=props)
    everything = DeltaTable(uri).to_pyarrow_table()
    rnd = random.Random(4)
    probes = [rnd.sample(first + second, 5) + _uids(3, 5) for _ in range(20)]
    probes += [[u[:-1]] for u in first[:5]] + [[u + "0"] for u in second[:5]]  # neighbours of real keys
    for wanted in probes:
        got = delta_read.read_in(uri, SCHEMA, "uid", wanted)
        expected = everything.filter(pc.is_in(everything.column("uid"), value_set=pa.array(wanted)))
        assert sorted(got.column("n").to_pylist()) == sorted(expected.column("n").to_pylist())


def test_a_lookup_reads_the_footer_of_a_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [str(tmp_path / f"f{i}.parquet") for i in range(3)]
    for i, path in enumerate(paths):
        pq.write_table(_sorted_table(_uids(300, 6 + i)), path, row_group_size=100)
    reads: list[str] = []
    real = pq.read_metadata
    monkeypatch.setattr(rowgroups.pq, "read_metadata", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    a = rowgroups.footer(paths[0])
    assert rowgroups.footer(paths[0]) is a and reads == [paths[0]]
    pq.write_table(_sorted_table(_uids(50, 9)), paths[0])  # rewritten by hand: a new footer
    assert rowgroups.footer(paths[0]).num_rows == 50
    # Past the byte budget the least recently used footers go, never the newest.
    monkeypatch.setattr(rowgroups, "FOOTER_BYTES", a.serialized_size + 1)
    reads.clear()
    for path in paths[1:]:
        rowgroups.footer(path)
    rowgroups.footer(paths[2])
    rowgroups.footer(paths[1])
    assert reads == [paths[1], paths[2], paths[1]]
    assert rowgroups._footer_bytes <= rowgroups.FOOTER_BYTES or len(rowgroups._footers) == 1


def test_may_hold_with_cut_bounds() -> None:
    # A maximum cut to a bare prefix ("2.25.5") still admits "2.25.5123".
    assert rowgroups._may_hold("2.25.4", "2.25.5", ["2.25.5123"])
    assert not rowgroups._may_hold("2.25.4", "2.25.5", ["2.25.6"])
    assert not rowgroups._may_hold("2.25.4", "2.25.5", ["2.25.3"])
    assert rowgroups._may_hold(b"a", b"c", ["b"])
    assert rowgroups._may_hold(10, 20, [5, 15]) and not rowgroups._may_hold(10, 20, [5, 25])
    assert rowgroups._may_hold(10, 20, ["15"])  # unlike types: kept, never guessed
