"""update_matched against delta-rs's own MERGE: same rows, fewer files touched.

The reference is delta-rs: the same update run as a ``MERGE`` with
:func:`~dicom_assets.lake.rewrite.sql_wins` must leave the same table.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from dicom_assets.lake import delta, rewrite, snapshots
from dicom_assets.steps import silver

SCHEMA = pa.schema([
    ("study", pa.string()), ("sop", pa.string()), ("modified", pa.timestamp("us", tz="UTC")),
    ("sha", pa.string()), ("path", pa.string()), ("created", pa.timestamp("us", tz="UTC")), ("payload", pa.string()),
])
KEYS = ["study", "sop"]
ORDER = (("modified", "descending"), ("sha", "descending"), ("path", "ascending"))
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _row(rnd: random.Random, study: str, sop: str, tag: str) -> dict:
    pick = lambda values: rnd.choice(values)  # noqa: E731 - few values, so ties and NULLs happen
    return {
        "study": study, "sop": sop,
        "modified": pick([None, T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]),
        "sha": pick([None, "aa", "bb", "cc"]), "path": pick([None, "/a", "/b", "/é"]),
        "created": T0 + timedelta(days=len(tag)), "payload": f"{tag}-{study}-{sop}",
    }


def _lake(uri: str, rnd: random.Random) -> list[dict]:
    rows = []
    for chunk in range(3):  # three appends, each spanning the whole key range
        part = [_row(rnd, f"1.2.{rnd.randrange(40)}", f"{chunk}.{i}", "old") for i in range(60)]
        delta.append(uri, pa.Table.from_pylist(part, schema=SCHEMA), SCHEMA, sort_by=KEYS, row_group_rows=16)
        rows += part
    return rows


def _sorted(uri: str) -> list[dict]:
    return sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: (r["study"], r["sop"]))


@pytest.mark.parametrize("seed", range(6))
def test_the_same_table_as_a_delta_rs_merge(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rows = _lake(a, random.Random(seed))
    _lake(b, random.Random(seed))
    chosen = rnd.sample(rows, 25)
    source = pa.Table.from_pylist([_row(rnd, r["study"], r["sop"], "newer") for r in chosen], schema=SCHEMA)
    keep = ["created"]
    delta.merge(a, source, SCHEMA, keys=KEYS, update_predicate=rewrite.sql_wins(ORDER),
                update_columns={f.name: f"s.`{f.name}`" for f in SCHEMA if f.name not in keep})
    n = rewrite.update_matched(b, SCHEMA, source, KEYS, rule=rewrite.by_order(ORDER), keep=keep, sort_by=KEYS, row_group_rows=16)
    assert _sorted(b) == _sorted(a)
    assert 0 < n < len(chosen) and n == sum(1 for r in _sorted(b) if r["payload"].startswith("newer"))


def test_silver_newer_is_the_merge_predicate_it_always_was() -> None:
    assert silver.NEWER == (
        "(s.sourceModifiedAt > t.sourceModifiedAt) OR "
        "(s.sourceModifiedAt = t.sourceModifiedAt AND s.contentSha256 > t.contentSha256) OR "
        "(s.sourceModifiedAt = t.sourceModifiedAt AND s.contentSha256 = t.contentSha256 AND s.originalPath < t.originalPath)"
    )


def _uniform(study: str, sops: range, modified: datetime, tag: str) -> pa.Table:
    return pa.Table.from_pylist([
        {"study": study, "sop": str(i), "modified": modified, "sha": "aa", "path": "/p", "created": T0, "payload": tag}
        for i in sops
    ], schema=SCHEMA)


def test_only_files_with_a_replaced_row_are_rewritten(tmp_path: Path) -> None:
    uri = str(tmp_path / "t")
    for study in ("1.1", "1.2", "1.3"):
        delta.append(uri, _uniform(study, range(50), T0, "old"), SCHEMA, sort_by=KEYS)
    before = set(DeltaTable(uri).file_uris())
    version = DeltaTable(uri).version()
    # Delivered again unchanged: nothing wins, nothing is committed.
    assert rewrite.update_matched(uri, SCHEMA, _uniform("1.2", range(10), T0, "again"), KEYS, rule=rewrite.by_order(ORDER)) == 0
    assert DeltaTable(uri).version() == version
    # Newer for one study: its file alone is replaced.
    n = rewrite.update_matched(uri, SCHEMA, _uniform("1.2", range(10), T0 + timedelta(hours=1), "new"), KEYS, rule=rewrite.by_order(ORDER), keep=["created"])
    after = set(DeltaTable(uri).file_uris())
    assert n == 10 and len(before - after) == 1 and len(after - before) == 1
    rows = DeltaTable(uri).to_pyarrow_table().to_pylist()
    assert len(rows) == 150 and sum(r["payload"] == "new" for r in rows) == 10


def test_a_failed_commit_leaves_no_file_and_a_lost_race_is_planned_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path / "t")
    delta.append(uri, _uniform("1.1", range(20), T0, "old"), SCHEMA)
    folder_files = lambda: {p.name for p in Path(uri).glob("*.parquet")}  # noqa: E731
    files = folder_files()
    newer = _uniform("1.1", range(5), T0 + timedelta(hours=1), "new")
    real = DeltaTable.create_write_transaction
    calls = {"n": 0}

    def broken(self: DeltaTable, *a: object, **k: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", broken)
    with pytest.raises(OSError):
        rewrite.update_matched(uri, SCHEMA, newer, KEYS, rule=rewrite.by_order(ORDER))
    assert folder_files() == files

    def conflict_once(self: DeltaTable, *a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise CommitFailedError("a concurrent commit")
        real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(DeltaTable, "create_write_transaction", conflict_once)
    monkeypatch.setattr(delta.time, "sleep", lambda s: None)
    assert rewrite.update_matched(uri, SCHEMA, newer, KEYS, rule=rewrite.by_order(ORDER)) == 5
    snapshots.latest(uri)
    assert sum(r["payload"] == "new" for r in DeltaTable(uri).to_pyarrow_table().to_pylist()) == 5
    assert len(folder_files() - files) == 1  # the first attempt's file was removed


def test_wins_treats_null_as_sql_does() -> None:
    assert rewrite.wins(ORDER, {"modified": T0, "sha": None, "path": "/a"}, {"modified": None, "sha": "a", "path": "/a"}) is False
    assert rewrite.wins(ORDER, {"modified": T0, "sha": "b", "path": None}, {"modified": T0, "sha": "a", "path": "/a"}) is True
    assert rewrite.wins(ORDER, {"modified": T0, "sha": "a", "path": "/a"}, {"modified": T0, "sha": "a", "path": "/a"}) is False


STUDY_SCHEMA = pa.schema([("id", pa.string()), ("lastUpdated", pa.timestamp("us", tz="UTC")), ("fhirContent", pa.large_string()),
                          ("msftCreatedDatetime", pa.timestamp("us", tz="UTC"))])


@pytest.mark.parametrize("seed", range(3))
def test_imagingstudy_rule_is_its_merge_predicate(tmp_path: Path, seed: int) -> None:
    from dicom_assets.steps.fhir_steps import NEWER_AND_CHANGED

    rnd = random.Random(seed)
    times = [None, T0, T0 + timedelta(seconds=1)]
    texts = [None, '{"a":1}', '{"a":2}']
    make = lambda i, tag: {"id": f"s{i}", "lastUpdated": rnd.choice(times), "fhirContent": rnd.choice(texts),  # noqa: E731
                           "msftCreatedDatetime": T0 + timedelta(days=len(tag))}
    old = pa.Table.from_pylist([make(i, "old") for i in range(40)], schema=STUDY_SCHEMA)
    source = pa.Table.from_pylist([make(i, "newer") for i in range(0, 40, 2)], schema=STUDY_SCHEMA)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for uri in (a, b):
        delta.append(uri, old.slice(0, 20), STUDY_SCHEMA)
        delta.append(uri, old.slice(20), STUDY_SCHEMA)
    delta.merge(a, source, STUDY_SCHEMA, keys=["id"], update_predicate="s.lastUpdated > t.lastUpdated AND s.fhirContent <> t.fhirContent",
                update_columns={"id": "s.`id`", "lastUpdated": "s.`lastUpdated`", "fhirContent": "s.`fhirContent`"})
    n = rewrite.update_matched(b, STUDY_SCHEMA, source, ["id"], rule=NEWER_AND_CHANGED, keep=["msftCreatedDatetime"])
    rows = lambda uri: sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: r["id"])  # noqa: E731
    assert rows(b) == rows(a) and n > 0


GOLD_SCHEMA = pa.schema([("id", pa.int64()), ("person_id", pa.int64()), ("day", pa.date32()), ("uid", pa.string()),
                         ("count", pa.int32()), ("msftModifiedDatetime", pa.timestamp("us", tz="UTC"))])


@pytest.mark.parametrize("seed", range(3))
def test_gold_changed_rule_is_its_merge_predicate(tmp_path: Path, seed: int) -> None:
    """Gold replaces a row when any column but msftModifiedDatetime IS DISTINCT FROM the new one."""
    from datetime import date

    from dicom_assets.steps import gold

    rnd = random.Random(seed)
    make = lambda i, tag: {"id": i, "person_id": rnd.choice([None, 1, 2]), "day": rnd.choice([None, date(2026, 1, 1)]),  # noqa: E731
                           "uid": rnd.choice([None, "1.2", "1.3"]), "count": rnd.choice([None, 0, 5]),
                           "msftModifiedDatetime": T0 + timedelta(days=len(tag))}
    old_rows = [make(i, "old") for i in range(40)]
    old = pa.Table.from_pylist(old_rows, schema=GOLD_SCHEMA)
    # Every other source row is the table's row again with a new time only: not a change.
    source = pa.Table.from_pylist([
        {**old_rows[i], "msftModifiedDatetime": T0 + timedelta(days=9)} if i % 4 == 0 else make(i, "newer")
        for i in range(0, 40, 2)
    ], schema=GOLD_SCHEMA)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for uri in (a, b):
        delta.append(uri, old.slice(0, 20), GOLD_SCHEMA)
        delta.append(uri, old.slice(20), GOLD_SCHEMA)
    sql = " OR ".join(f"(s.`{c}` IS DISTINCT FROM t.`{c}`)" for c in GOLD_SCHEMA.names if c != "msftModifiedDatetime")
    delta.merge(a, source, GOLD_SCHEMA, keys=["id"], update_predicate=sql)
    n = rewrite.update_matched(b, GOLD_SCHEMA, source, ["id"], rule=gold._changed_rule(GOLD_SCHEMA, ["msftModifiedDatetime"]))
    rows = lambda uri: sorted(DeltaTable(uri).to_pyarrow_table().to_pylist(), key=lambda r: r["id"])  # noqa: E731
    assert rows(b) == rows(a) and 0 < n < source.num_rows
