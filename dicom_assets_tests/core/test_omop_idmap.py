"""Stable OMOP ids: persisted ids never change, new keys get max + 1 in sorted order (SPEC §3.5)."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_assets.lake.schemas import IDMAP_SCHEMA
from dicom_assets.omop.idmap import (
    IdLookup,
    anonymous_person_key,
    assign_ids,
    find_conflicts,
    id_rows,
    person_key,
    series_key,
    study_key,
)


def test_new_keys_get_consecutive_ids_in_sorted_order() -> None:
    assert assign_ids({}, ["b", "a", "c", "a"]) == {"a": 1, "b": 2, "c": 3}


def test_existing_ids_are_kept_and_new_ones_start_after_the_maximum() -> None:
    existing = {"x": 5, "y": 2}
    assert assign_ids(existing, ["x", "a", "y"]) == {"a": 6}
    assert existing == {"x": 5, "y": 2}


def test_assigning_the_same_keys_twice_gives_nothing_new() -> None:
    keys = ["s1", "s2"]
    first = assign_ids({}, keys)
    assert assign_ids(first, keys) == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.text(alphabet="abcdef/.", min_size=1, max_size=4), max_size=6), max_size=6))
def test_ids_never_change_and_stay_unique(batches: list[list[str]]) -> None:
    persisted: dict[str, int] = {}
    for batch in batches:
        before = dict(persisted)
        new = assign_ids(persisted, batch)
        assert set(new).isdisjoint(before)
        assert sorted(new.values()) == list(range(max(before.values(), default=0) + 1, len(before) + len(new) + 1))
        persisted.update(new)
        assert {k: persisted[k] for k in before} == before
        assert len(set(persisted.values())) == len(persisted)
        assert set(batch) <= set(persisted)


def test_concurrent_writers_are_detected_and_a_retry_resolves() -> None:
    snapshot = {"a": 1}
    writer_a = assign_ids(snapshot, ["b"])  # both writers read the same snapshot …
    writer_b = assign_ids(snapshot, ["c", "b"])
    assert writer_a == {"b": 2} and writer_b == {"b": 2, "c": 3}
    committed = {**snapshot, **writer_a}  # … A commits first
    assert find_conflicts(committed, writer_b) == []  # b→2 agrees with A; c→3 is free
    late = assign_ids(snapshot, ["d"])  # a writer proposing d→2 loses to A's b→2
    assert find_conflicts(committed, late) == ["d"]
    retry = assign_ids(committed, ["d"])
    assert retry == {"d": 3} and find_conflicts(committed, retry) == []
    assert find_conflicts({}, {"x": 1, "y": 1}) == ["x", "y"]
    assert find_conflicts({"x": 1}, {"x": 2}) == ["x"]


def test_key_builders_are_unambiguous() -> None:
    assert series_key("hospital", "1.2.3", "1.2.3.4") == "hospital/1.2.3/1.2.3.4"
    assert study_key("hospital", "1.2.3") == "hospital/1.2.3"
    assert series_key("a/b", "1", "2") != series_key("a", "b/1", "2")
    assert study_key("ns", "1.2") != study_key("other", "1.2")
    with pytest.raises(ValueError, match="study_uid"):
        study_key("ns", " ")


def test_person_key_hides_the_patient_id_and_respects_the_issuer() -> None:
    key = person_key("ns", "HOSPITAL_A", "PAT-0001")
    assert "PAT-0001" not in key and key.startswith("ns/person/sha256:")
    assert key == person_key("ns", "HOSPITAL_A ", "PAT-0001  ")  # LO padding is not identity
    assert key != person_key("ns", "HOSPITAL_B", "PAT-0001")
    assert key != person_key("ns", None, "PAT-0001")
    assert key != person_key("other", "HOSPITAL_A", "PAT-0001")
    assert anonymous_person_key("ns", "1.2.3") != anonymous_person_key("ns", "1.2.4")
    with pytest.raises(ValueError, match="patient_id"):
        person_key("ns", None, "")


def test_id_rows_fit_the_idmap_schema() -> None:
    created = datetime(2024, 5, 1, 12, tzinfo=UTC)
    rows = id_rows({"b": 2, "a": 1}, created)
    assert [r["key"] for r in rows] == ["a", "b"]
    table = pa.Table.from_pylist(rows, schema=IDMAP_SCHEMA)
    assert table.column("id").to_pylist() == [1, 2]


def test_lookup_names_the_missing_key() -> None:
    ids = IdLookup(image_occurrence={"k": 1})
    assert ids.image_occurrence_id("k") == 1
    with pytest.raises(ValueError, match="person_id assigned for key 'p'"):
        ids.person_id("p")
