"""The synthetic sample (SPEC §10), checked by reading the written files with plain pydicom.

Expected totals come from SPEC §10 (``fabric``: Fabric's published sample) and from the
sizes this brief fixes for ``small``; every count is taken from the files on disk (native
files and ZIP members, nested ZIPs opened recursively), never from the generator's own
summary, which is only compared against them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_assets.lake.paths import LakePaths
from dicom_assets.sample import SampleSummary, generate_sample, plan_sample
from dicom_assets.sample_catalog import TEMPLATES
from dicom_assets.sample_render import TemplateLibrary, render_series

# SPEC §10 and the brief: (patients, studies, series, valid instances, invalid files).
SMALL = (20, 25, 32, 500, 1)
FABRIC = (302, 340, 389, 7739, 1)
BODY_PARTS = {"HEAD", "CHEST", "ABDOMEN", "KNEE", "BREAST", "CSPINE", "WHOLEBODY", "PELVIS"}
#: Identifying attributes of the source files that the sample must not carry over.
DROPPED = ("OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
           "OperatorsName", "NameOfPhysiciansReadingStudy", "InstitutionAddress")


@dataclass
class Item:
    """One file or ZIP member found under the sample folder."""

    where: str  # native | zip | nested
    name: str
    ds: Dataset | None  # None when plain pydicom cannot read it


def _is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def _read(data: bytes, tags: list[str] | None) -> Dataset | None:
    try:
        return pydicom.dcmread(io.BytesIO(data), specific_tags=tags)
    except (InvalidDicomError, EOFError, ValueError, KeyError):
        return None


def inventory(root: Path, tags: list[str] | None = None) -> tuple[list[Item], Counter[str]]:
    """Every DICOM candidate under ``root`` and counts of ZIP archives by kind."""
    items: list[Item] = []
    archives: Counter[str] = Counter()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if not _is_zip(data):
            items.append(Item("native", path.name, _read(data, tags)))
            continue
        with zipfile.ZipFile(io.BytesIO(data)) as outer:
            members = [(m.filename, outer.read(m)) for m in outer.infolist() if not m.is_dir()]
        nested = [d for _, d in members if _is_zip(d)]
        archives["nested" if nested else "zip"] += 1
        for name, member in members:
            if _is_zip(member):
                with zipfile.ZipFile(io.BytesIO(member)) as inner:
                    for m in inner.infolist():
                        items.append(Item("nested", m.filename, _read(inner.read(m), tags)))
            else:
                items.append(Item("zip", name, _read(member, tags)))
    return items, archives


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SampleSummary, list[Item], Counter[str]]:
    lake = tmp_path_factory.mktemp("lake")
    summary = generate_sample(lake, "small")
    items, archives = inventory(summary.root)
    return lake, summary, items, archives


def _valid(items: list[Item]) -> list[Dataset]:
    return [i.ds for i in items if i.ds is not None]


def test_small_sample_counts_read_back_from_files(small) -> None:
    _, summary, items, _ = small
    valid = _valid(items)
    counts = (
        len({ds.PatientID for ds in valid}),
        len({ds.StudyInstanceUID for ds in valid}),
        len({ds.SeriesInstanceUID for ds in valid}),
        len({ds.SOPInstanceUID for ds in valid}),
        sum(i.ds is None for i in items),
    )
    assert counts == SMALL
    assert len(valid) == SMALL[3]  # no instance written twice
    assert (summary.patients, summary.studies, summary.series, summary.instances,
            summary.invalid_files) == SMALL


def test_sample_lands_in_the_sample_namespace_of_ingest(small) -> None:
    lake, summary, _, _ = small
    assert summary.root == LakePaths.of(lake).ingest_root / "sample"
    assert not (LakePaths.of(lake).state_dir / "sample_staging").exists()
    assert not [p for p in summary.root.rglob("*") if p.name.endswith(".part")]


def test_summary_counts_containers_as_found_on_disk(small) -> None:
    _, summary, items, archives = small
    by_where = Counter(i.where for i in items if i.ds is not None)
    assert summary.native_files == by_where["native"]
    assert summary.zip_instances == by_where["zip"]
    assert summary.nested_zip_instances == by_where["nested"]
    assert summary.zip_files == archives["zip"] > 0
    assert summary.nested_zip_files == archives["nested"] > 0
    d = summary.to_dict()
    assert d["root"] == str(summary.root) and d["instances"] == SMALL[3] and d["size"] == "small"


def test_mix_of_native_zip_and_nested_zip(small) -> None:
    _, _, items, _ = small
    share = Counter(i.where for i in items if i.ds is not None)
    total = sum(share.values())
    assert 0.50 <= share["native"] / total <= 0.70
    assert 0.15 <= share["zip"] / total <= 0.35
    assert 0.08 <= share["nested"] / total <= 0.25
    native = [i.name for i in items if i.where == "native" and i.ds is not None]
    assert any(n.endswith(".dcm") for n in native)
    assert any(n.endswith(".IMA") for n in native)
    # Content sniffing: DICOM named after its SOPInstanceUID, no extension.
    assert any(n.startswith("2.25.") and not n.endswith((".dcm", ".IMA")) for n in native)


def test_exactly_one_invalid_dcm_file_that_is_not_dicom(small) -> None:
    _, summary, items, _ = small
    bad = [i for i in items if i.ds is None]
    assert len(bad) == 1
    assert bad[0].where == "native" and bad[0].name.endswith(".dcm")
    data = next(summary.root.rglob(bad[0].name)).read_bytes()
    assert data[128:132] != b"DICM"


def test_hierarchy_is_consistent(small) -> None:
    _, _, items, _ = small
    parents: dict[str, dict[str, set[object]]] = defaultdict(lambda: defaultdict(set))
    for ds in _valid(items):
        parents["series"][ds.SeriesInstanceUID].update({(ds.StudyInstanceUID, ds.Modality, ds.SeriesNumber)})
        parents["study"][ds.StudyInstanceUID].add(
            (ds.PatientID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyDescription))
        parents["patient"][ds.PatientID].add(
            (str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex, ds.IssuerOfPatientID))
    for level, mapping in parents.items():
        assert all(len(v) == 1 for v in mapping.values()), level
    studies_per_patient = Counter(next(iter(v))[0] for v in parents["study"].values())
    assert max(studies_per_patient.values()) > 1  # some patients came back
    series_per_study = Counter(next(iter(v))[0] for v in parents["series"].values())
    assert max(series_per_study.values()) > 1  # some studies have several series
    sizes = Counter(ds.SeriesInstanceUID for ds in _valid(items))
    assert min(sizes.values()) == 1 and max(sizes.values()) >= 20


def test_uids_are_valid_unique_and_new(small) -> None:
    _, _, items, _ = small
    valid = _valid(items)
    source_uids: set[str] = set()
    for name in TEMPLATES:
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True, force=True)
        source_uids.update(str(ds.get(k, "")) for k in
                           ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"))
    sops = [ds.SOPInstanceUID for ds in valid]
    assert len(set(sops)) == len(sops)
    studies = {ds.StudyInstanceUID for ds in valid}
    series = {ds.SeriesInstanceUID for ds in valid}
    assert not (studies & series) and not (set(sops) & (studies | series))
    for ds in valid:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                      ds.get("FrameOfReferenceUID", "2.25.1")):
            assert UID(value).is_valid and value.startswith("2.25.")
            assert value not in source_uids


def test_synthetic_patient_study_and_series_attributes(small) -> None:
    _, _, items, _ = small
    for ds in _valid(items):
        assert ds.PatientSex in {"M", "F", "O"}
        assert ds.PatientName.family_name and ds.PatientName.given_name
        assert ds.PatientID and ds.IssuerOfPatientID and ds.InstitutionName and ds.AccessionNumber
        assert "ReferringPhysicianName" in ds
        born = date.fromisoformat(f"{ds.PatientBirthDate[:4]}-{ds.PatientBirthDate[4:6]}-{ds.PatientBirthDate[6:]}")
        seen = date.fromisoformat(f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}")
        assert born < seen <= date(2025, 1, 1)
        age = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
        assert ds.PatientAge == f"{age:03d}Y"
        assert len(ds.StudyTime) == 6 and ds.SeriesDate == ds.StudyDate and ds.SeriesTime >= ds.StudyTime
        assert ds.BodyPartExamined in BODY_PARTS
        if ds.BodyPartExamined in {"KNEE", "BREAST"}:
            assert ds.Laterality in {"L", "R"}
        else:
            assert "Laterality" not in ds
        if ds.BodyPartExamined == "BREAST":
            assert ds.PatientSex == "F"
        assert ds.StudyDescription and ds.SeriesDescription
        assert int(ds.SeriesNumber) >= 1 and int(ds.InstanceNumber) >= 1
        assert not [k for k in DROPPED if k in ds]


def _source_index() -> tuple[dict[bytes, set[tuple[str, str, str]]], set[tuple[str, str]]]:
    """Pixel data digest → (Modality, SOPClassUID, TransferSyntaxUID) of pydicom's files."""
    pixels: dict[bytes, set[tuple[str, str, str]]] = defaultdict(set)
    classes: set[tuple[str, str]] = set()
    # The files bundled inside pydicom only (get_testdata_files would try to download more).
    bundled = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(p for p in bundled.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - the bundle holds deliberately broken files
            continue
        if "SOPClassUID" not in ds:
            continue
        classes.add((str(ds.get("Modality", "")), ds.SOPClassUID))
        if "PixelData" in ds:
            ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
            pixels[hashlib.sha256(ds.PixelData).digest()].add((str(ds.get("Modality", "")), ds.SOPClassUID, ts))
    return pixels, classes


def test_pixel_data_kept_and_modality_matches_the_source_file(small) -> None:
    _, _, items, _ = small
    pixels, classes = _source_index()
    valid = _valid(items)
    decoded = 0
    for ds in valid:
        assert (ds.Modality, ds.SOPClassUID) in classes
        if "PixelData" not in ds:
            continue
        key = (ds.Modality, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assert key in pixels.get(hashlib.sha256(ds.PixelData).digest(), set())
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            assert ds.pixel_array.size == int(ds.Rows) * int(ds.Columns) * int(
                ds.get("NumberOfFrames", 1)) * int(ds.SamplesPerPixel)
            decoded += 1
    assert decoded >= 100
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    assert any(ds.Modality == "MR" and ds.get("Rows") == 64 and (ds.pixel_array == mr).all()
               for ds in valid if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1")
    assert {"CT", "MR", "US", "CR", "NM", "RTPLAN", "OT"} <= {ds.Modality for ds in valid}
    assert any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in valid)
    assert len({ds.file_meta.TransferSyntaxUID for ds in valid}) >= 5


def test_same_seed_gives_byte_identical_files(small, tmp_path: Path) -> None:
    _, first, _, _ = small
    again = generate_sample(tmp_path / "a", "small")
    assert again.to_dict() | {"root": ""} == first.to_dict() | {"root": ""}
    assert file_hashes(again.root) == file_hashes(first.root)
    # Running again into the same lake rewrites the same bytes and adds nothing.
    generate_sample(tmp_path / "a", "small")
    assert file_hashes(again.root) == file_hashes(first.root)


def test_another_seed_gives_other_identities(small, tmp_path: Path) -> None:
    _, first, items, _ = small
    other = generate_sample(tmp_path / "b", "small", seed=1)
    other_items, _ = inventory(other.root, ["PatientID", "StudyInstanceUID", "SOPInstanceUID"])
    ours = {ds.SOPInstanceUID for ds in _valid(items)} | {ds.StudyInstanceUID for ds in _valid(items)}
    theirs = {ds.SOPInstanceUID for ds in _valid(other_items)} | {ds.StudyInstanceUID for ds in _valid(other_items)}
    assert not ours & theirs
    assert len({ds.SOPInstanceUID for ds in _valid(other_items)}) == SMALL[3]


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown sample size"):
        generate_sample(tmp_path, "huge")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_spliced_encoding_equals_dcmwrite(template: str) -> None:
    plan = plan_sample("small")
    study = next(s for s in plan.studies if s.laterality)
    series = dataclasses.replace(study.series[0], template=template, modality=TEMPLATES[template], instances=3)
    library = TemplateLibrary()
    fast = [data for _, _, data in render_series(library, study, series, 0)]
    reference = [data for _, _, data in render_series(library, study, series, 0, spliced=False)]
    assert fast == reference
    ds = pydicom.dcmread(io.BytesIO(fast[2]))
    assert ds.Modality == TEMPLATES[template] and ds.InstanceNumber == 3


def test_fabric_plan_has_fabric_totals() -> None:
    plan = plan_sample("fabric")
    series = [s for st in plan.studies for s in st.series]
    assert (len({st.patient.patient_id for st in plan.studies}), len({st.uid for st in plan.studies}),
            len({s.uid for s in series}), sum(s.instances for s in series)) == FABRIC[:4]
    assert min(s.instances for s in series) == 1 and max(s.instances for s in series) >= 50
    assert {"RTDOSE", "SEG", "SR"} <= {s.modality for s in series}


@pytest.mark.slow
def test_fabric_sample_written_and_counted(tmp_path: Path) -> None:
    summary = generate_sample(tmp_path, "fabric")
    tags = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    items, archives = inventory(summary.root, tags)
    valid = _valid(items)
    counts = (
        len({ds.PatientID for ds in valid}),
        len({ds.StudyInstanceUID for ds in valid}),
        len({ds.SeriesInstanceUID for ds in valid}),
        len({ds.SOPInstanceUID for ds in valid}),
        sum(i.ds is None for i in items),
    )
    assert counts == FABRIC
    assert len(valid) == FABRIC[3]
    assert (summary.zip_files, summary.nested_zip_files) == (archives["zip"], archives["nested"])
