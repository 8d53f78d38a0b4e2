"""Re-materialisations, backfills and duplicate drops end where one single-day run ends (SPEC §3.3, §4, §6).

Files are dropped into Ingest with their mtime set inside the day they
"arrive" (organise takes, for partition D, the Ingest files modified by the
end of D). Hypothesis draws an interleaving of drops and partition runs:
days out of order (backfills), the same day again (re-materialisation), the
same bytes dropped again under another name (duplicates). The end state of
silver and gold must equal a run where every drop is in Ingest at once and
one partition takes them all.

Compared after normalisation (see :mod:`dicom_assets_tests.e2e.lakestate`
for the wall-clock columns, epoch prefixes and lake root):

* ``ingestDate`` and the ``yyyy/mm/dd`` folder in paths are dropped /
  normalised: they say which partition took a file, which is what differs.
* gold ids are compared through their id-map keys: ids are handed out as
  ``max + 1`` in arrival order and never change afterwards (SPEC §3.5), so the
  id a series gets depends on what arrived before it; the key it maps is fixed.
* ``image_occurrence.local_path`` is the common folder of the series' files
  in Process; a series that arrived over two days lives under two day
  folders, so its common folder is legitimately higher up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pydicom
import pytest
from deltalake import DeltaTable
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_assets.config import Settings
from dicom_assets.lake import delta_read
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import TABLE_SCHEMAS
from dicom_assets.runner import materialize_partition
from dicom_assets.steps import bronze as bronze_steps
from dicom_assets.steps import fhir_steps, reconcile
from dicom_assets.steps import gold as gold_steps
from dicom_assets.steps import silver as silver_steps
from dicom_assets_tests.e2e import lakestate

pytestmark = pytest.mark.xdist_group("order_properties")

TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
#: Three arrival days before today (backfills are runs of these in any order).
DAYS = [(TODAY - timedelta(days=k)).strftime("%Y/%m/%d") for k in (3, 2, 1)]
DAY_FOLDER = re.compile(r"/\d{4}/\d{2}/\d{2}/")
NS = "clinic"

PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"]
MULTI_STUDY = generate_uid(entropy_srcs=["dicom_assets order test study"])
MULTI_SERIES = [generate_uid(entropy_srcs=["dicom_assets order test series", str(s)]) for s in range(2)]


def _multi_series_files(folder: Path) -> list[Path]:
    """One CT study, two series of two instances each, written with plain pydicom."""
    out = []
    for s, series_uid in enumerate(MULTI_SERIES):
        for i in range(2):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.StudyInstanceUID = MULTI_STUDY
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = s + 1
            ds.InstanceNumber = i + 1
            ds.SOPInstanceUID = generate_uid(entropy_srcs=["dicom_assets order test sop", str(s), str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            p = folder / f"study_s{s}_i{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            out.append(p)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("order_sources")
    files = []
    for name in PYDICOM_FILES:
        dst = folder / name
        shutil.copyfile(get_testdata_file(name), dst)
        files.append(dst)
    return files + _multi_series_files(folder)


@pytest.fixture(autouse=True)
def _ephemeral_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def _day_start(day: str) -> float:
    return datetime.strptime(day, "%Y/%m/%d").replace(tzinfo=UTC).timestamp()


def drop(lake: Path, src: Path, copy: int, day: str, second: int) -> None:
    """Put ``src`` in Ingest as copy ``copy`` (its own folder), modified at ``second`` into ``day``."""
    dst = LakePaths.of(lake).ingest_root / NS / f"copy{copy}" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    t = _day_start(day) + 3600 + second
    os.utime(dst, (t, t))


def run(lake: Path, day: str, *, batch_size: int = 16) -> None:
    s = Settings(lake=str(lake), settle_seconds=0, workers=1, batch_size=batch_size)
    assert materialize_partition(s, partition=day, progress=False, raise_on_error=True)["success"]


def _id_keys(paths: LakePaths) -> dict[str, dict[int, str]]:
    out = {}
    for kind in ("image_occurrence", "person", "procedure_occurrence"):
        t = delta_read.read(paths.table_uri(f"_idmap_{kind}"), TABLE_SCHEMAS[f"_idmap_{kind}"])
        out[kind] = dict(zip(t.column("id").to_pylist(), t.column("key").to_pylist(), strict=False))
    return out


def order_free_tables(lake: Path) -> dict[str, list[str]]:
    """Silver and gold rows with arrival-dependent values normalised (see module doc)."""
    paths = LakePaths.of(lake)
    root = str(paths.root)
    ids = _id_keys(paths)
    id_columns = {
        "image_occurrence_id": "image_occurrence",
        "person_id": "person",
        "procedure_occurrence_id": "procedure_occurrence",
    }
    out: dict[str, list[str]] = {}
    for name in ("ImagingMetastore", "silver_ImagingStudy", "image_occurrence", "procedure_occurrence"):
        rows = []
        for row in delta_read.read(paths.table_uri(name), TABLE_SCHEMAS[name]).to_pylist():
            row = {k: v for k, v in row.items() if k not in lakestate.WALL_CLOCK_COLUMNS | {"ingestDate", "local_path"}}
            if name in ("image_occurrence", "procedure_occurrence"):
                for col, kind in id_columns.items():
                    if col in row:
                        row[col] = ids[kind][row[col]]
            if isinstance(row.get("fhirContent"), str):
                row["fhirContent"] = lakestate._without_last_updated(json.loads(row["fhirContent"]))
            text = json.dumps(lakestate._norm(row, root), sort_keys=True, default=str)
            rows.append(DAY_FOLDER.sub("/<day>/", text))
        out[name] = sorted(rows)
    return out


# ----------------------------------------------------------------------------- the property

Drop = tuple[int, int, int]  # (source index, copy number, day index)


@st.composite
def histories(draw: st.DrawFn, n_sources: int) -> tuple[list[Drop], list[tuple[str, Any]]]:
    """Drops (every source once, some again as duplicates) interleaved with partition runs."""
    first_days = draw(st.lists(st.integers(0, len(DAYS) - 1), min_size=n_sources, max_size=n_sources))
    drops: list[Drop] = [(i, 0, d) for i, d in enumerate(first_days)]
    dups = draw(st.lists(st.tuples(st.integers(0, n_sources - 1), st.integers(0, len(DAYS) - 1)), max_size=3))
    drops += [(i, k + 1, d) for k, (i, d) in enumerate(dups)]
    runs = draw(st.lists(st.integers(0, len(DAYS) - 1), min_size=1, max_size=4))
    ops: list[tuple[str, Any]] = [("drop", x) for x in drops] + [("run", d) for d in runs]
    return drops, draw(st.permutations(ops))


def _finish(lake: Path) -> None:
    """Run the day of every file still in Ingest, so everything dropped gets processed."""
    left = [p for p in LakePaths.of(lake).ingest_root.rglob("*") if p.is_file()]
    days = sorted({datetime.fromtimestamp(p.stat().st_mtime, UTC).strftime("%Y/%m/%d") for p in left})
    for day in days:
        run(lake, day)


@settings(
    max_examples=int(os.environ.get("ORDER_EXAMPLES", "3")),
    deadline=None,
    derandomize=True,
    # Each example is several pipeline runs: report the failing one as drawn, do not shrink for minutes.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_history_ends_like_one_single_day_run(data: st.DataObject, sources: list[Path], tmp_path_factory) -> None:
    drops, ops = data.draw(histories(len(sources)))
    work = tmp_path_factory.mktemp("order")
    lake, reference = work / "lake", work / "reference"
    for kind, arg in ops:
        if kind == "drop":
            i, copy, d = arg
            drop(lake, sources[i], copy, DAYS[d], second=i)
        else:
            run(lake, DAYS[arg])
    _finish(lake)
    for i, copy, d in drops:
        drop(reference, sources[i], copy, DAYS[d], second=i)
    run(reference, DAYS[-1])
    got, want = order_free_tables(lake), order_free_tables(reference)
    for name in want:
        assert got[name] == want[name], f"{name} differs after {ops}"
    shutil.rmtree(work, ignore_errors=True)


def test_same_bytes_dropped_under_two_names_keep_one_lineage_whatever_the_order(sources: list[Path], tmp_path: Path) -> None:
    """Equal time and content: the smaller original path wins, whichever copy arrived first."""
    ct = sources[0]
    late_first = tmp_path / "late_first"
    drop(late_first, ct, 1, DAYS[0], second=0)
    run(late_first, DAYS[0])
    drop(late_first, ct, 0, DAYS[0], second=0)
    run(late_first, DAYS[0])
    together = tmp_path / "together"
    drop(together, ct, 0, DAYS[0], second=0)
    drop(together, ct, 1, DAYS[0], second=0)
    run(together, DAYS[0])
    got, want = order_free_tables(late_first), order_free_tables(together)
    assert got == want
    assert "/copy0/" in want["ImagingMetastore"][0] and "/copy1/" not in want["ImagingMetastore"][0]


@pytest.mark.parametrize("cluster_rounds", [32, 2])
def test_a_day_merged_file_by_file_equals_one_merge(
    sources: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster_rounds: int
) -> None:
    """Silver merges a big day in chunks and gold maps it in rounds of studies; with one data file
    per chunk (duplicates land in other chunks, some newer, some older) and one study per round
    the tables equal those of a single merge of the day, also when silver clusters every two rounds.
    The same for the FHIR steps: one resource per silver ImagingStudy round (one per bronze row
    group: one per NDJSON file) and per group of the study check."""
    monkeypatch.setattr(silver_steps, "CLUSTER_ROUNDS", cluster_rounds)
    monkeypatch.setattr(fhir_steps, "MAX_PER_FILE", 1)  # in both lakes: it names the files, msftFilePath
    lakes, checks = {}, {}
    for name, chunk in (("one_merge", 10**9), ("chunked", 1)):
        monkeypatch.setattr(gold_steps, "STUDIES_PER_ROUND", chunk)
        monkeypatch.setattr(fhir_steps, "STUDIES_PER_ROUND", chunk)
        monkeypatch.setattr(reconcile, "STUDIES_PER_CHECK", chunk)
        lake = tmp_path / name
        for i, src in enumerate(sources):
            drop(lake, src, 0, DAYS[0], second=i)
        for i, src in enumerate(sources[:4]):
            drop(lake, src, 1, DAYS[0], second=100 + i)  # the same instances again, later: these win
            drop(lake, src, 2, DAYS[0], second=i)  # and the same bytes, same time, larger path: these lose
        monkeypatch.setattr(silver_steps, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(silver_steps, "SILVER_FILE_ROWS", 2)
        run(lake, DAYS[0], batch_size=3)  # several bronze data files, so several silver rounds
        lakes[name] = order_free_tables(lake)
        checks[name] = reconcile.silver_studies_consistent(LakePaths.of(lake), DAYS[0])
    assert lakes["chunked"] == lakes["one_merge"]
    assert checks["chunked"] == checks["one_merge"] and checks["chunked"][0]
    # One silver ImagingStudy file per study; the day's bronze resources in one file, a row group per NDJSON file.
    chunked = LakePaths.of(tmp_path / "chunked")
    studies = checks["chunked"][1]["studies"]
    assert studies > 1 and len(DeltaTable(chunked.table_uri("silver_ImagingStudy")).file_uris()) == studies
    (bronze_file,) = DeltaTable(chunked.table_uri("bronze_ImagingStudy")).file_uris()
    assert pq.ParquetFile(bronze_file).metadata.num_row_groups == studies
    run(tmp_path / "chunked", DAYS[0])  # a re-run of the day in rounds changes nothing
    assert order_free_tables(tmp_path / "chunked") == lakes["chunked"]
    # The chunked day was clustered: each study's instances in one file, files in UID order.
    files = [pq.read_table(f, columns=["studyInstanceUid"]).column(0).to_pylist()
             for f in DeltaTable(LakePaths.of(tmp_path / "chunked").table_uri("ImagingMetastore")).file_uris()]
    assert len(files) > 1 and all(f == sorted(f) for f in files)
    spans = sorted((f[0], f[-1]) for f in files)
    if cluster_rounds > 2:  # every round in one run
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert sum("/copy1/" in r for r in lakes["one_merge"]["ImagingMetastore"]) == 4
    assert len(lakes["one_merge"]["procedure_occurrence"]) > 1  # more than one round of studies


def _one_instance_study(folder: Path, study_uid: str) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = study_uid + ".1.1"
    p = folder / f"{study_uid}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def test_a_new_study_looks_up_no_silver_imagingstudy_file_whose_uid_range_cannot_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silver ImagingStudy is merged a round of studies at a time, each round a StudyInstanceUID
    range. A later study's merge key lookup skips the files whose UID range cannot hold it; by
    the id alone (a SHA-256, SPEC §5.1) it opened every round file whose id range spans its id."""
    from dicom_assets.lake import rowgroups

    def study_id(uid: str) -> str:
        return hashlib.sha256(f"{NS}/ImagingStudy/{uid}".encode()).hexdigest()

    root = "1.2.826.0.1.3680043.8.498.4242"
    day_uids = [f"{root}.{k}" for k in range(10, 18)]  # two rounds of four: [.10-.13], [.14-.17]
    rounds = [sorted(study_id(u) for u in day_uids[:4]), sorted(study_id(u) for u in day_uids[4:])]
    # A new UID above both ranges whose id lies inside both rounds' id ranges.
    new_uid = next(u for u in (f"{root}.9{k}" for k in range(1000)) if all(r[0] < study_id(u) < r[-1] for r in rounds))
    folder = tmp_path / "src"
    folder.mkdir()
    monkeypatch.setattr(fhir_steps, "STUDIES_PER_ROUND", 4)
    lake = tmp_path / "lake"
    for i, uid in enumerate(day_uids):
        drop(lake, _one_instance_study(folder, uid), 0, DAYS[0], second=i)
    run(lake, DAYS[0])
    uri = LakePaths.of(lake).table_uri("silver_ImagingStudy")
    day_files = set(DeltaTable(uri).file_uris())
    assert len(day_files) == 2
    opened: list[str] = []
    footer = rowgroups.footer
    merge = fhir_steps.merge_silver

    def merge_recorded(*a: Any, **k: Any) -> Any:
        monkeypatch.setattr(rowgroups, "footer", lambda path: opened.append(path) or footer(path))
        try:
            return merge(*a, **k)
        finally:
            monkeypatch.setattr(rowgroups, "footer", footer)

    monkeypatch.setattr(fhir_steps, "merge_silver", merge_recorded)
    drop(lake, _one_instance_study(folder, new_uid), 0, DAYS[1], second=0)
    run(lake, DAYS[1])
    assert set(DeltaTable(uri).file_uris()) > day_files  # the new study landed in a file of its own
    assert not set(opened) & day_files


def test_a_compacted_day_has_the_same_tables(sources: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A day of many extraction parts is rewritten as a few files; every table, bronze included,
    holds what it holds without that, and a re-run of the compacted day changes nothing."""
    lakes, bronze = {}, {}
    for name, parts_limit in (("as_extracted", 10**9), ("compacted", 1)):
        monkeypatch.setattr(bronze_steps, "COMPACT_PARTS", parts_limit)
        monkeypatch.setattr(bronze_steps, "METASTORE_FILE_ROWS", 4)
        monkeypatch.setattr(bronze_steps, "METASTORE_ROW_GROUP_ROWS", 2)
        lake = tmp_path / name
        for i, src in enumerate(sources):
            drop(lake, src, 0, DAYS[0], second=i)
        run(lake, DAYS[0], batch_size=2)
        lakes[name] = order_free_tables(lake)
        uri = LakePaths.of(lake).table_uri("dicomimagingmetastore")
        t = delta_read.read(uri, TABLE_SCHEMAS["dicomimagingmetastore"])
        skip = lakestate.WALL_CLOCK_COLUMNS | {"ingestDate"}
        bronze[name] = sorted(json.dumps(lakestate._norm({k: v for k, v in r.items() if k not in skip}, str(lake)), sort_keys=True, default=str)
                              for r in t.to_pylist())
        bronze[name + "_files"] = len(DeltaTable(uri).file_uris())
    assert lakes["compacted"] == lakes["as_extracted"]
    assert bronze["compacted"] == bronze["as_extracted"]
    assert bronze["compacted_files"] < bronze["as_extracted_files"]
    before = order_free_tables(tmp_path / "compacted")
    run(tmp_path / "compacted", DAYS[0], batch_size=2)
    assert order_free_tables(tmp_path / "compacted") == before


# ----------------------------------------------------------------------------- split study


def _silver_study(lake: Path) -> dict[str, Any]:
    t = delta_read.read(LakePaths.of(lake).table_uri("silver_ImagingStudy"), TABLE_SCHEMAS["silver_ImagingStudy"])
    rows = [r for r in t.to_pylist() if r["studyInstanceUid"] == MULTI_STUDY]
    assert len(rows) == 1, f"{len(rows)} silver rows for the study"
    return rows[0]


def _series_instances(row: dict[str, Any]) -> dict[str, set[str]]:
    return {s["uid"]: {i["uid"] for i in s["instance"]} for s in row["series"]}


def test_study_split_over_two_days_is_one_complete_row(sources: list[Path], tmp_path: Path) -> None:
    study_files = [p for p in sources if p.name.startswith("study_")]
    by_series: dict[str, set[str]] = {}
    for p in study_files:  # expected values from pydicom, not from the pipeline
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
    lake = tmp_path / "lake"
    first = [p for p in study_files if "_s0_" in p.name]
    second = [p for p in study_files if "_s1_" in p.name]
    for p in first:
        drop(lake, p, 0, DAYS[0], second=1)
    run(lake, DAYS[0])
    assert _series_instances(_silver_study(lake)) == {MULTI_SERIES[0]: by_series[MULTI_SERIES[0]]}
    for p in second:
        drop(lake, p, 0, DAYS[1], second=2)
    run(lake, DAYS[1])
    row = _silver_study(lake)
    assert _series_instances(row) == by_series
    assert (row["numberOfSeries"], row["numberOfInstances"]) == (2, 4)
    # Re-materialising the first day rebuilds the study from all its instances: it does not shrink.
    run(lake, DAYS[0])
    row = _silver_study(lake)
    assert _series_instances(row) == by_series
    assert (row["numberOfSeries"], row["numberOfInstances"]) == (2, 4)
    io = delta_read.read(LakePaths.of(lake).table_uri("image_occurrence"), TABLE_SCHEMAS["image_occurrence"])
    got = sorted(s for s, u in zip(io.column("image_series_uid").to_pylist(), io.column("image_study_uid").to_pylist(), strict=False) if u == MULTI_STUDY)
    assert got == sorted(MULTI_SERIES)
