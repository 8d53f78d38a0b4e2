"""Records kept as Arrow columns behave as the list of records they were made from."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pytest

from dicom_assets.columnar import Rows


@dataclass(frozen=True)
class Rec:
    name: str
    size: int
    mtime: float
    sha: str | None


SCHEMA = pa.schema(
    [
        pa.field("name", pa.binary(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime", pa.float64(), nullable=False),
        pa.field("sha", pa.binary()),
    ]
)


def _recs(n: int, start: int = 0) -> list[Rec]:
    # Names as os.listdir gives a name that is not UTF-8: with lone surrogates.
    return [Rec(f"f{i}\udcff.dcm", i * 1000, 0.5 + i, None if i % 3 else f"{i:064x}") for i in range(start, start + n)]


def test_appended_records_read_back_as_the_list_between_appends() -> None:
    rows: Rows[Rec] = Rows(Rec, SCHEMA, chunk_rows=2)
    assert rows == [] and len(rows) == 0 and not rows
    rows.extend(_recs(3))
    assert rows[2] == _recs(3)[2] and rows[-3] == _recs(3)[0] and len(rows) == 3
    rows.extend(_recs(2, start=3))  # after a read: the cached table must not hide new records
    rows.append(_recs(1, start=5)[0])
    want = _recs(6)
    assert rows == want and list(rows) == want and rows[1:4] == want[1:4] and rows[::2] == want[::2]
    assert rows != want[:5] and rows != [*want[:5], Rec("other", 0, 0.0, None)]
    assert rows.table.num_rows == 6 and rows.table.column("name")[0].as_py() == b"f0\xff.dcm"
    assert rows.count_by("sha") == {want[0].sha: 1, None: 4, want[3].sha: 1}
    with pytest.raises(IndexError):
        rows[6]


def test_a_table_round_trips_and_a_wrong_shape_is_refused() -> None:
    rows: Rows[Rec] = Rows(Rec, SCHEMA)
    rows.extend(_recs(4))
    again: Rows[Rec] = Rows(Rec, SCHEMA, rows.table)
    assert again == _recs(4)
    with pytest.raises(ValueError, match="expected"):
        Rows(Rec, SCHEMA, rows.table.drop_columns(["sha"]))
    with pytest.raises(ValueError, match="do not follow"):
        Rows(Rec, pa.schema([f for f in SCHEMA if f.name != "sha"]))
