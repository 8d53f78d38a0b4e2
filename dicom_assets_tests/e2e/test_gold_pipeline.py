"""Gold on the small sample through the real pipeline: stable ids, keys, concepts (issue 4).

Expected patients/studies/series come from reading the written files with
plain pydicom; concept ids from the Athena-format fixture.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pydicom
import pytest

from dicom_assets.config import Settings
from dicom_assets.defs.partitions import today_key
from dicom_assets.lake import delta, delta_read
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import IDMAP_SCHEMA, IMAGE_OCCURRENCE_SCHEMA
from dicom_assets.runner import materialize_partition
from dicom_assets.sample import generate_sample
from dicom_assets.steps import gold
from dicom_assets_tests.core.test_omop_concepts import (
    DICOM_CT,
    SNOMED_CHEST,
    SNOMED_CT_PROCEDURE,
    write_athena_vocabulary,
)

pytestmark = pytest.mark.xdist_group("gold")


def _datasets(root: Path):
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        stack = [data]
        while stack:
            d = stack.pop()
            if d[:4] == b"PK\x03\x04":
                with zipfile.ZipFile(io.BytesIO(d)) as z:
                    stack.extend(z.read(n) for n in z.namelist())
                continue
            try:
                yield pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True)
            except Exception:
                continue


def _expected(ingest: Path) -> dict:
    series = {}
    patient_of_study = {}
    for ds in _datasets(ingest):
        series[(ds.StudyInstanceUID, ds.SeriesInstanceUID)] = (ds.Modality, ds.get("BodyPartExamined"))
        patient_of_study[ds.StudyInstanceUID] = ds.PatientID
    return {"series": series, "patient_of_study": patient_of_study}


def _table(lake: LakePaths, name: str) -> list[dict]:
    return delta_read.read(lake.table_uri(name)).to_pylist()


@pytest.fixture(scope="module")
def gold_lake(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gold")
    lake = LakePaths.of(root / "lake").ensure()
    vocab = write_athena_vocabulary(root / "vocab")
    generate_sample(lake.root, "small", seed=0)
    expected = _expected(lake.ingest_root)
    settings = Settings(lake=str(lake.root), settle_seconds=0, omop_vocabulary_dir=str(vocab))
    day = today_key()
    assert materialize_partition(settings, partition=day, progress=False)["success"]
    return {"lake": lake, "settings": settings, "day": day, "expected": expected, "root": root}


def test_one_row_per_series_with_keys_and_lineage(gold_lake: dict) -> None:
    lake = gold_lake["lake"]
    exp = gold_lake["expected"]
    io_rows = _table(lake, "image_occurrence")
    assert sorted((r["image_study_uid"], r["image_series_uid"]) for r in io_rows) == sorted(exp["series"])
    silver_ids = {r["studyInstanceUid"]: r["id"] for r in _table(lake, "silver_ImagingStudy")}
    procs = {r["procedure_occurrence_id"]: r for r in _table(lake, "procedure_occurrence")}
    for r in io_rows:
        assert r["msftSourceRecordId"] == silver_ids[r["image_study_uid"]]
        assert r["msftSourceTableName"] == "ImagingStudy"
        assert r["procedure_occurrence_id"] in procs
        assert procs[r["procedure_occurrence_id"]]["person_id"] == r["person_id"]
        assert r["modality_source_value"] == exp["series"][(r["image_study_uid"], r["image_series_uid"])][0]
        assert Path(r["local_path"]).is_dir()


def test_same_patient_in_two_studies_has_one_person_id(gold_lake: dict) -> None:
    lake = gold_lake["lake"]
    by_patient = defaultdict(set)
    person_of_study = {r["image_study_uid"]: r["person_id"] for r in _table(lake, "image_occurrence")}
    for study, patient in gold_lake["expected"]["patient_of_study"].items():
        by_patient[patient].add(person_of_study[study])
    assert all(len(ids) == 1 for ids in by_patient.values())
    assert len({next(iter(v)) for v in by_patient.values()}) == len(by_patient)
    assert any(sum(1 for p in gold_lake["expected"]["patient_of_study"].values() if p == k) > 1 for k in by_patient)


def test_vocabulary_fixture_gives_concept_ids(gold_lake: dict) -> None:
    lake = gold_lake["lake"]
    exp = gold_lake["expected"]["series"]
    rows = _table(lake, "image_occurrence")
    ct = [r for r in rows if r["modality_source_value"] == "CT"]
    assert ct and all(r["modality_concept_id"] == SNOMED_CT_PROCEDURE and r["modality_source_concept_id"] == DICOM_CT for r in ct)
    chest = [r for r in rows if exp[(r["image_study_uid"], r["image_series_uid"])][1] == "CHEST"]
    assert chest and all(r["anatomic_site_concept_id"] == SNOMED_CHEST for r in chest)


def test_partition_checks_find_duplicates_another_day_wrote(gold_lake: dict, tmp_path: Path) -> None:
    """The day-scoped gold checks read only the day's studies, yet a duplicate id or a second
    id for a key, written by a study no day of this partition touched, still fails them."""
    shutil.copytree(gold_lake["lake"].root, tmp_path / "lake")
    lake, day = LakePaths.of(tmp_path / "lake"), gold_lake["day"]
    checks = (gold.check_image_occurrence, gold.check_procedure_occurrence, gold.check_idmaps_stable)
    assert all(check(lake, day)[0] for check in checks)
    io = delta_read.read(lake.table_uri("image_occurrence"), IMAGE_OCCURRENCE_SCHEMA)
    mine = io.filter(pc.is_in(io.column("image_study_uid"), value_set=pa.array(sorted(gold_lake["expected"]["patient_of_study"]))))
    row = mine.slice(0, 1)
    other = row.set_column(row.schema.get_field_index("msftSourceRecordId"), "msftSourceRecordId", pa.array(["0" * 64]))
    delta.append(lake.table_uri("image_occurrence"), other, IMAGE_OCCURRENCE_SCHEMA)
    ok, facts = gold.check_image_occurrence(lake, day)
    assert not ok and facts["duplicate_ids"] == 1
    person_id = row.column("person_id")[0].as_py()
    persons = delta_read.read(lake.table_uri("_idmap_person"), IDMAP_SCHEMA)
    key = persons.filter(pc.equal(persons.column("id"), person_id)).column("key")[0].as_py()
    top = pc.max(persons.column("id")).as_py()
    second = pa.table({"key": [key], "id": [top + 1000], "createdDatetime": [datetime.now(UTC)]}, schema=IDMAP_SCHEMA)
    delta.append(lake.table_uri("_idmap_person"), second, IDMAP_SCHEMA)
    ok, facts = gold.check_idmaps_stable(lake, day)
    assert not ok and facts["person_conflicts"] == 1
    # The next id handed out comes after the largest in the map, whichever rows a lookup read.
    ids, new = gold.ensure_ids(lake, {"person": ["sample/person/a-new-key"]}, datetime.now(UTC))
    assert new["person"] == 1 and ids.person_id("sample/person/a-new-key") == top + 1001


def test_ids_survive_rematerialising_and_more_data(gold_lake: dict) -> None:
    lake, settings, day = gold_lake["lake"], gold_lake["settings"], gold_lake["day"]
    key = lambda r: (r["image_study_uid"], r["image_series_uid"])  # noqa: E731
    before = {key(r): (r["image_occurrence_id"], r["person_id"], r["procedure_occurrence_id"]) for r in _table(lake, "image_occurrence")}
    assert materialize_partition(settings, partition=day, progress=False)["success"]
    again = {key(r): (r["image_occurrence_id"], r["person_id"], r["procedure_occurrence_id"]) for r in _table(lake, "image_occurrence")}
    assert again == before
    # More data on another day (arrived yesterday): old ids unchanged, new series get new ids.
    generate_sample(lake.root, "small", seed=1)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    for p in lake.ingest_root.rglob("*"):
        os.utime(p, (yesterday.timestamp(), yesterday.timestamp()))
    assert materialize_partition(settings, partition=yesterday.strftime("%Y/%m/%d"), progress=False)["success"]
    after = {key(r): (r["image_occurrence_id"], r["person_id"], r["procedure_occurrence_id"]) for r in _table(lake, "image_occurrence")}
    assert {k: after[k] for k in before} == before
    assert len(after) > len(before)
    # New ids follow the largest one already held (SPEC §3.5: existing ids never move).
    assert min(after[k][0] for k in after if k not in before) > max(v[0] for v in before.values())
    ids = [v[0] for v in after.values()]
    assert len(ids) == len(set(ids))


def test_without_vocabulary_uncited_concepts_are_zero_with_source_kept(tmp_path: Path) -> None:
    lake = LakePaths.of(tmp_path / "lake").ensure()
    generate_sample(lake.root, "small", seed=2)
    assert materialize_partition(Settings(lake=str(lake.root), settle_seconds=0), progress=False)["success"]
    rows = _table(lake, "image_occurrence")
    # The shipped maps cite no concept for US/NM/OT modalities nor for any body part.
    uncited = [r for r in rows if r["modality_source_value"] in ("US", "NM", "OT")]
    assert uncited and all(r["modality_concept_id"] == 0 for r in uncited)
    assert all(r["anatomic_site_concept_id"] in (0, None) for r in rows)
    assert any(r["anatomic_site_source_value"] for r in rows)
