"""Part statistics computed without pyarrow.compute agree with Arrow's own ``min_max``."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from dicom_assets.lake import parts

COLUMNS = {
    # Code-point order must be UTF-8 byte order: ASCII, Latin-1, CJK and astral characters mixed.
    "text": pa.array(["zeta", "Ärger", "émile", "山田", "\U0001f600 smile", None, "Zulu", "abc"], pa.string()),
    "whole": pa.array([5, -3, None, 12, 0, 7, -3, 2], pa.int64()),
    "real": pa.array([1.5, float("nan"), -2.25, None, 3.0, float("nan"), 0.0, 1.0], pa.float64()),
    "day": pa.array([date(2024, 1, 2), None, date(2023, 12, 31), date(2024, 1, 1), None, None, None, date(2024, 1, 2)], pa.date32()),
    "when": pa.array([datetime(2024, 1, 1, 10, tzinfo=UTC), None, datetime(2023, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)] + [None] * 5, pa.timestamp("us", tz="UTC")),
}


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_extremes_match_arrow(name: str) -> None:
    col = pa.chunked_array([COLUMNS[name][:3], COLUMNS[name][3:]])
    mm = pc.min_max(col)
    assert parts._min_max(col) == (mm["min"].as_py(), mm["max"].as_py())


def test_nan_and_null_only_columns_have_no_extremes() -> None:
    assert parts._min_max(pa.chunked_array([pa.array([float("nan"), None], pa.float64())])) is None
    assert parts._min_max(pa.chunked_array([pa.array([None, None], pa.string())])) is None


def test_part_statistics_of_every_kind_of_column() -> None:
    table = pa.table(COLUMNS)
    stats = parts.part_stats(table)
    assert stats["numRecords"] == 8
    assert stats["minValues"]["text"] == "Zulu" and stats["maxValues"]["text"] == "\U0001f600 smile"
    assert (stats["minValues"]["whole"], stats["maxValues"]["whole"]) == (-3, 12)
    assert (stats["minValues"]["real"], stats["maxValues"]["real"]) == (-2.25, 3.0)
    assert (stats["minValues"]["day"], stats["maxValues"]["day"]) == ("2023-12-31", "2024-01-02")
    assert stats["minValues"]["when"] == "2023-05-06T07:08:09.123Z" and stats["maxValues"]["when"] == "2024-01-01T10:00:00.000Z"
    assert stats["nullCount"] == {"text": 1, "whole": 1, "real": 1, "day": 4, "when": 6}
    assert not any(isinstance(v, float) and math.isnan(v) for v in stats["minValues"].values())


def test_streamed_part_statistics_cover_every_piece_as_delta_rs_counts_them(tmp_path: Path) -> None:
    """A part written piece by piece (each piece dropped once written) carries the statistics
    delta-rs writes for the same rows in one go: every piece's rows, nulls and extremes."""
    n = 30
    table = pa.table(
        {
            "id": [f"id{(i * 7) % n:03d}" for i in range(n)],
            "n": [None if i % 4 == 0 else i - 10 for i in range(n)],
            "json": pa.array([None if i % 3 == 0 else json.dumps({"k": i}) for i in range(n)], pa.large_string()),
            "tags": pa.array([[f"t{i}"] if i % 5 else None for i in range(n)], pa.list_(pa.string())),
        }
    )
    rec = parts.write_part_pieces(tmp_path / "ours", (table.slice(i, 7) for i in range(0, n, 7)), table.schema)
    ours = json.loads(rec["stats"])
    assert pq.ParquetFile(tmp_path / "ours" / rec["path"]).read().equals(table)
    write_deltalake(str(tmp_path / "theirs"), table)
    (theirs,) = pa.table(DeltaTable(str(tmp_path / "theirs")).get_add_actions(flatten=True)).to_pylist()
    assert ours["numRecords"] == theirs["num_records"] == n
    assert ours["nullCount"] == {c: theirs[f"null_count.{c}"] for c in ("id", "n", "json")} == {"id": 0, "n": 8, "json": 10}
    assert ours["minValues"] == {c: theirs[f"min.{c}"] for c in ("id", "n")} == {"id": "id000", "n": -9}
    assert ours["maxValues"] == {c: theirs[f"max.{c}"] for c in ("id", "n")} == {"id": "id029", "n": 19}


def test_per_instance_columns_are_written_without_a_dictionary(tmp_path: Path) -> None:
    """Both writers (ours and delta-rs's appends) leave dictionaries to the columns that repeat."""
    from dicom_assets.lake import delta
    from dicom_assets.lake.schemas import SILVER_METASTORE_SCHEMA

    rows = pa.Table.from_pylist(
        [{"studyInstanceUid": "1.2.3", "sopInstanceUid": f"1.2.3.{i}", "metadata_string": json.dumps({"i": i}), "msftSourceSystem": "ns"}
         for i in range(50)],
        schema=SILVER_METASTORE_SCHEMA,
    )
    rec = parts.write_part_file(tmp_path / "ours", rows)
    delta.append(tmp_path / "theirs", rows, SILVER_METASTORE_SCHEMA, row_group_rows=20)
    (theirs,) = DeltaTable(str(tmp_path / "theirs")).file_uris()
    for path in (str(tmp_path / "ours" / rec["path"]), theirs):
        rg = pq.read_metadata(path).row_group(0)
        encodings = {rg.column(j).path_in_schema: rg.column(j).encodings for j in range(rg.num_columns)}
        assert not any("DICTIONARY" in e for c in ("sopInstanceUid", "metadata_string") for e in encodings[c]), path
        assert any("DICTIONARY" in e for e in encodings["studyInstanceUid"]), path
    assert pq.read_table(theirs).sort_by("sopInstanceUid").equals(rows.sort_by("sopInstanceUid"))
