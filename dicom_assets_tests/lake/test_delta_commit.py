"""Part files with Delta statistics, and replacing one day of a table in one delta-rs commit.

Expected values come from the inputs themselves (pyarrow/Python min, max and
null counts of the rows written) and from the Delta protocol's statistics
format; table contents are read back with delta-rs and pyarrow.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from dicom_assets.lake import delta, delta_read, parts
from dicom_assets.lake import delta_commit as dc
from dicom_assets.lake.schemas import METASTORE_SCHEMA

T0 = datetime(2026, 1, 1, 8, 30, 15, 123456, tzinfo=UTC)
DAY1, DAY2, DAY3 = "2026/01/01", "2026/01/02", "2026/01/03"


def rows(day: str, n: int, tag: str) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "sopInstanceUid": f"1.2.826.0.1.3680043.8.498.{tag}.{i}",
                "studyInstanceUid": "1.2.3",
                "seriesNumber": i,
                "modalitiesInStudy": ["MR", "SR"],
                "metadata_string": json.dumps({"00080018": {"vr": "UI", "Value": [f"{tag}.{i}"]}}),
                "ingestDate": day,
                "createdDatetime": T0 + timedelta(microseconds=i),
            }
            for i in range(n)
        ],
        schema=METASTORE_SCHEMA,
    )


def content(uri: Path) -> list[tuple[str, str]]:
    t = delta_read.read(uri, METASTORE_SCHEMA)
    return sorted(zip(t.column("ingestDate").to_pylist(), t.column("sopInstanceUid").to_pylist(), strict=True))


def keys(day: str, n: int, tag: str) -> list[tuple[str, str]]:
    return [(day, f"1.2.826.0.1.3680043.8.498.{tag}.{i}") for i in range(n)]


# ---------------------------------------------------------------- write_part


def test_write_part_round_trips_and_names_a_unique_file_inside_the_table(tmp_path: Path) -> None:
    data = rows(DAY1, 5, "a")
    a1, a2 = dc.write_part(tmp_path, data), dc.write_part(tmp_path, data)
    assert a1.path != a2.path and a1.path.startswith("part-") and a1.path.endswith(".parquet")
    assert "/" not in a1.path
    back = pq.read_table(tmp_path / a1.path)
    assert back.equals(data)
    assert a1.size == (tmp_path / a1.path).stat().st_size
    assert a1.data_change is True and dict(a1.partition_values) == {}


def test_part_statistics_follow_the_delta_protocol(tmp_path: Path) -> None:
    data = rows(DAY1, 12, "b")
    stats = json.loads(dc.write_part(tmp_path, data).stats)
    assert stats["numRecords"] == 12
    uids = data.column("sopInstanceUid").to_pylist()
    assert stats["minValues"]["sopInstanceUid"] == min(uids)[: parts.STATS_STRING_PREFIX]
    assert stats["minValues"]["seriesNumber"] == 0 and stats["maxValues"]["seriesNumber"] == 11
    assert stats["minValues"]["ingestDate"] == stats["maxValues"]["ingestDate"] == DAY1
    # Timestamps at millisecond precision, widened so they stay bounds.
    assert stats["minValues"]["createdDatetime"] == "2026-01-01T08:30:15.123Z"
    assert stats["maxValues"]["createdDatetime"] == "2026-01-01T08:30:15.124Z"
    assert stats["nullCount"]["patientName"] == 12 and stats["nullCount"]["sopInstanceUid"] == 0
    # Documents and lists carry no extremes.
    assert "metadata_string" not in stats["minValues"] and "modalitiesInStudy" not in stats["minValues"]
    assert "patientName" not in stats["minValues"]  # all null: no bounds


def test_long_string_maxima_are_rounded_up_to_stay_upper_bounds(tmp_path: Path) -> None:
    long_uids = ["1.2.840.113619.2.5.1762583153.215519.978957063.78", "1.2.840.113619.2.5.1762583153.215519.978957063.99"]
    data = pa.Table.from_pylist([{"sopInstanceUid": u, "ingestDate": DAY1} for u in long_uids], schema=METASTORE_SCHEMA)
    stats = json.loads(dc.write_part(tmp_path, data).stats)
    lo, hi = stats["minValues"]["sopInstanceUid"], stats["maxValues"]["sopInstanceUid"]
    assert len(lo) == len(hi) == 32
    assert lo <= min(long_uids) and hi > max(long_uids)
    assert hi == "1.2.840.113619.2.5.1762583153.22"  # "...21" rounded up at the cut


def test_delta_rs_reads_our_statistics(tmp_path: Path) -> None:
    uri = tmp_path / "t"
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 3, "c"))], DAY1)
    actions = pa.table(DeltaTable(str(uri)).get_add_actions(flatten=True)).to_pylist()
    assert len(actions) == 1
    assert actions[0]["num_records"] == 3
    assert actions[0]["min.seriesNumber"] == 0 and actions[0]["max.seriesNumber"] == 2


# ---------------------------------------------------------------- commit_replace


def test_commit_replace_creates_an_absent_table(tmp_path: Path) -> None:
    uri = tmp_path / "absent"
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 4, "d"))], DAY1)
    assert content(uri) == keys(DAY1, 4, "d")
    assert DeltaTable(str(uri)).schema().to_arrow() is not None


def test_zero_adds_on_an_absent_table_gives_an_empty_table(tmp_path: Path) -> None:
    uri = tmp_path / "empty"
    dc.commit_replace(uri, METASTORE_SCHEMA, [], DAY1)
    assert delta.exists(uri) and content(uri) == []


def test_replace_is_one_commit_and_keeps_other_days(tmp_path: Path) -> None:
    uri = tmp_path / "t"
    # Earlier days written the way the local engine writes (delta-rs, no ingestDate statistics).
    delta.replace_where(uri, rows(DAY1, 3, "old"), METASTORE_SCHEMA, f"ingestDate = '{DAY1}'")
    delta.replace_where(uri, rows(DAY2, 2, "keep"), METASTORE_SCHEMA, f"ingestDate = '{DAY2}'")
    before = DeltaTable(str(uri)).version()
    adds = [dc.write_part(uri, rows(DAY1, 4, "new")), dc.write_part(uri, rows(DAY1, 1, "new2"))]
    dc.commit_replace(uri, METASTORE_SCHEMA, adds, DAY1)
    dt = DeltaTable(str(uri))
    assert dt.version() == before + 1
    assert content(uri) == sorted(keys(DAY1, 4, "new") + keys(DAY1, 1, "new2") + keys(DAY2, 2, "keep"))
    assert dt.history(1)[0]["replaceWhere"] == f"ingestDate = '{DAY1}'"
    # Idempotent: replacing again with the same rows gives the same content.
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 4, "new")), dc.write_part(uri, rows(DAY1, 1, "new2"))], DAY1)
    assert content(uri) == sorted(keys(DAY1, 4, "new") + keys(DAY1, 1, "new2") + keys(DAY2, 2, "keep"))


def test_a_commit_of_many_files_is_followed_by_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc, "CHECKPOINT_AFTER_ADDS", 3)
    uri = tmp_path / "t"
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 2, f"a{i}")) for i in range(2)], DAY1)
    assert not list((uri / "_delta_log").glob("*.checkpoint.parquet"))
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY2, 2, f"b{i}")) for i in range(3)], DAY2)
    version = DeltaTable(str(uri)).version()
    assert [p.name for p in (uri / "_delta_log").glob("*.checkpoint.parquet")] == [f"{version:020d}.checkpoint.parquet"]
    expected = sorted(k for i in range(2) for k in keys(DAY1, 2, f"a{i}")) + sorted(k for i in range(3) for k in keys(DAY2, 2, f"b{i}"))
    assert content(uri) == sorted(expected)
    # A reader that starts from the checkpoint alone (older JSON commits gone) sees the same table.
    for f in (uri / "_delta_log").glob("*.json"):
        if int(f.stem) <= version:
            f.unlink()
    assert sorted(zip(*(DeltaTable(str(uri)).to_pyarrow_table().column(c).to_pylist() for c in ("ingestDate", "sopInstanceUid")), strict=True)) == sorted(expected)


def test_zero_adds_delete_the_day_only(tmp_path: Path) -> None:
    uri = tmp_path / "t"
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 2, "x"))], DAY1)
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY2, 2, "y"))], DAY2)
    dc.commit_replace(uri, METASTORE_SCHEMA, [], DAY1)
    assert content(uri) == keys(DAY2, 2, "y")


def test_a_file_mixing_days_is_rewritten_without_the_day(tmp_path: Path) -> None:
    uri = tmp_path / "t"
    for day, tag in ((DAY1, "p"), (DAY2, "q"), (DAY3, "r")):
        dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(day, 3, tag))], day)
    DeltaTable(str(uri)).optimize.compact()  # one file now holds all three days
    assert len(DeltaTable(str(uri)).file_uris()) == 1
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY2, 1, "s"))], DAY2)
    assert content(uri) == sorted(keys(DAY1, 3, "p") + keys(DAY2, 1, "s") + keys(DAY3, 3, "r"))
    n_day2 = delta_read.read_day(uri, METASTORE_SCHEMA, DAY2).num_rows
    assert n_day2 == 1


def test_adds_holding_another_day_are_refused(tmp_path: Path) -> None:
    uri = tmp_path / "t"
    with pytest.raises(ValueError, match="ingestDate"):
        dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY2, 1, "z"))], DAY1)


def test_a_replacement_that_fails_deletes_its_parts_and_keeps_the_table(tmp_path: Path) -> None:
    """The caller's parts are referred to by nothing once the replacement failed (an engine's, the bronze day's)."""
    uri = tmp_path / "t"
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 2, "p"))], DAY1)
    before = sorted(p.name for p in dc.table_dir(uri).glob("*.parquet"))
    refused = dc.write_part(uri, rows(DAY2, 1, "z"))
    with pytest.raises(ValueError, match="ingestDate"):
        dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 1, "q")), refused], DAY1)
    assert sorted(p.name for p in dc.table_dir(uri).glob("*.parquet")) == before
    assert content(uri) == keys(DAY1, 2, "p")


def test_a_table_with_another_schema_is_refused(tmp_path: Path) -> None:
    uri = tmp_path / "t"
    write_deltalake(str(uri), pa.table({"ingestDate": [DAY1]}))
    with pytest.raises(ValueError, match="schema"):
        dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 1, "z"))], DAY1)


def test_a_lost_commit_race_is_retried_against_the_new_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = tmp_path / "t"
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 2, "first"))], DAY1)
    original = DeltaTable.create_write_transaction
    calls: list[int] = []

    def racing(self: DeltaTable, actions: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(len(actions))
        if len(calls) == 1:
            # Another writer replaces the same day between our snapshot and our commit.
            other = DeltaTable(str(uri))
            monkeypatch.setattr(DeltaTable, "create_write_transaction", original)
            dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 5, "rival"))], DAY1)
            monkeypatch.setattr(DeltaTable, "create_write_transaction", racing)
            del other
        original(self, actions, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", racing)
    dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(DAY1, 3, "mine"))], DAY1)
    assert len(calls) == 2  # conflict detected, then re-planned
    assert content(uri) == keys(DAY1, 3, "mine")  # the rival's rows of the day were replaced too


def test_concurrent_writers_of_different_days_both_land(tmp_path: Path) -> None:
    uri = tmp_path / "t"
    delta.ensure_table(uri, METASTORE_SCHEMA)
    errors: list[BaseException] = []

    def write(day: str, tag: str) -> None:
        try:
            for _ in range(3):
                dc.commit_replace(uri, METASTORE_SCHEMA, [dc.write_part(uri, rows(day, 2, tag))], day)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(d, t)) for d, t in ((DAY1, "u"), (DAY2, "v"), (DAY3, "w"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert content(uri) == sorted(keys(DAY1, 2, "u") + keys(DAY2, 2, "v") + keys(DAY3, 2, "w"))


def test_part_records_ship_as_json_and_become_add_actions(tmp_path: Path) -> None:
    rec = parts.write_part_file(tmp_path, rows(DAY1, 1, "rt"))
    assert json.loads(json.dumps(rec)) == rec
    back = dc.add_action_from_record(rec)
    assert (back.path, back.size, back.modification_time, back.stats) == (rec["path"], rec["size"], rec["modification_time"], rec["stats"])


def test_only_local_tables(tmp_path: Path) -> None:
    assert dc.table_dir(f"file://{tmp_path}/t") == tmp_path / "t"
    with pytest.raises(ValueError):
        dc.table_dir("s3://bucket/t")


def test_discard_deletes_only_parts_the_table_does_not_hold(tmp_path: Path) -> None:
    """After a failed commit: a part that landed anyway stays (the table needs it), the others go."""
    uri = tmp_path / "t"
    landed = dc.write_part(uri, rows(DAY1, 2, "landed"))
    dc.commit_replace(uri, METASTORE_SCHEMA, [landed], DAY1)
    stray = dc.write_part(uri, rows(DAY1, 2, "stray"))
    dc.discard(uri, [landed, stray])
    assert (uri / landed.path).exists() and not (uri / stray.path).exists()
    assert delta_read.read(uri, METASTORE_SCHEMA).num_rows == 2
    # No table at all: nothing can have landed.
    orphan = dc.write_part(tmp_path / "absent", rows(DAY1, 1, "orphan"))
    dc.discard(tmp_path / "absent", [orphan])
    assert not (tmp_path / "absent" / orphan.path).exists()
