"""``dicom-assets sample``: write a deterministic synthetic DICOM sample into a lake's Ingest.

SPEC §10. The sample is built from the real test files pydicom bundles (new UIDs,
names, dates; pixel data kept) and dropped under ``Ingest/Imaging/DICOM/sample/`` as a
mix of native files (``.dcm``, no extension, ``.IMA``), per-study ZIPs and ZIPs nested in
ZIPs, plus exactly one ``.dcm`` that is not DICOM, so a run exercises content sniffing,
ZIP extraction and the Failed folder. Same ``(size, seed)`` → byte-identical files.

Layout, per patient folder ``sample/<PatientID>/``::

    <StudyDate>_<AccessionNumber>/S<SeriesNumber>_<Modality>/<file>   native instances
    <AccessionNumber>.zip         members <StudyDate>_<AccessionNumber>/S…/<file>
    <AccessionNumber>_export.zip  one member <AccessionNumber>.zip, laid out as above
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dicom_assets.lake.paths import LakePaths
from dicom_assets.sample_plan import (
    SIZES,
    SamplePlan,
    SeriesPlan,
    StudyPlan,
    plan_sample,
)
from dicom_assets.sample_render import TemplateLibrary, render_series

#: Namespace (source-system folder, SPEC §2) the sample is written to.
SAMPLE_NAMESPACE = "sample"
#: Name of the one non-DICOM ``.dcm`` file, directly in the namespace folder.
INVALID_FILE_NAME = "incomplete_download.dcm"
#: ZIP entries carry this fixed timestamp so archives are byte-identical run to run.
_ZIP_DATE_TIME = (2024, 1, 1, 0, 0, 0)
#: What a failed web download saved as ``.dcm`` typically contains.
_INVALID_CONTENT = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><h1>502 Bad Gateway</h1><p>The PACS export gateway did not answer in time; "
    b"this file is not a DICOM object.</p></body></html>\n"
)


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`generate_sample` wrote.

    ``patients``/``studies``/``series``/``instances`` count distinct PatientID,
    StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID of the valid DICOM written.
    ``native_files`` counts valid DICOM written as plain files; ``zip_files`` ZIP archives
    whose members are DICOM files; ``nested_zip_files`` ZIP archives that hold such a ZIP.
    ``zip_instances``/``nested_zip_instances`` count the instances inside each kind, so
    ``native_files + zip_instances + nested_zip_instances == instances``.
    """

    size: str
    seed: int
    patients: int
    studies: int
    series: int
    instances: int
    invalid_files: int
    native_files: int
    zip_files: int
    nested_zip_files: int
    zip_instances: int
    nested_zip_instances: int
    root: Path

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["root"] = str(self.root)
        return data


def generate_sample(lake: Path | str, size: str = "small", *, seed: int = 0) -> SampleSummary:
    """Write the ``size`` sample (``small`` or ``fabric``) into ``lake``'s Ingest folder.

    Files appear atomically (written under the lake's ``_state`` folder, then renamed into
    place), so a sensor never sees a half-written file. Existing sample files with the
    same names are replaced by identical bytes; nothing else in Ingest is touched.
    """
    plan = plan_sample(size, seed=seed)
    paths = LakePaths.of(lake)
    root = paths.ingest_root / SAMPLE_NAMESPACE
    staging = paths.state_dir / "sample_staging"
    staging.mkdir(parents=True, exist_ok=True)
    writer = _AtomicWriter(staging)
    library = TemplateLibrary()
    counts = {"native": 0, "zip": 0, "nested": 0, "zip_instances": 0, "nested_instances": 0}
    try:
        try:
            for study in plan.studies:
                _write_study(writer, library, root, study, plan.seed, counts)
            writer.write(root / INVALID_FILE_NAME, _INVALID_CONTENT)
        finally:
            writer.close()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SampleSummary(
        size=size,
        seed=seed,
        patients=len({s.patient.patient_id for s in plan.studies}),
        studies=len(plan.studies),
        series=plan.series_count,
        instances=plan.instance_count,
        invalid_files=1,
        native_files=counts["native"],
        zip_files=counts["zip"],
        nested_zip_files=counts["nested"],
        zip_instances=counts["zip_instances"],
        nested_zip_instances=counts["nested_instances"],
        root=root,
    )


def study_folder(study: StudyPlan) -> str:
    """Folder (or ZIP top folder) name of a study: ``<StudyDate>_<AccessionNumber>``."""
    return f"{study.date}_{study.accession}"


def instance_file_name(study: StudyPlan, series: SeriesPlan, number: int, sop_uid: str) -> str:
    """File name of one instance in the study's naming style.

    ``dcm`` → ``IM_0001.dcm``; ``bare`` → the SOPInstanceUID with no extension (as many
    PACS exports do); ``ima`` → a Siemens-like ``<PatientID>.<Modality>.<series>.<n>.IMA``.
    """
    if study.naming == "bare":
        return sop_uid
    if study.naming == "ima":
        return f"{study.patient.patient_id}.{series.modality}.{series.number:04d}.{number:04d}.IMA"
    return f"IM_{number:04d}.dcm"


def _write_study(
    writer: _AtomicWriter,
    library: TemplateLibrary,
    root: Path,
    study: StudyPlan,
    seed: int,
    counts: dict[str, int],
) -> None:
    patient_dir = root / study.patient.patient_id
    folder = study_folder(study)
    members: list[tuple[str, bytes]] = []
    for series in study.series:
        series_dir = f"S{series.number:03d}_{series.modality}"
        for number, sop_uid, data in render_series(library, study, series, seed):
            name = instance_file_name(study, series, number, sop_uid)
            if study.container == "native":
                writer.write(patient_dir / folder / series_dir / name, data)
            else:
                members.append((f"{folder}/{series_dir}/{name}", data))
    if study.container == "native":
        counts["native"] += study.instances
    elif study.container == "zip":
        writer.write(patient_dir / f"{study.accession}.zip", zip_bytes(members))
        counts["zip"] += 1
        counts["zip_instances"] += study.instances
    else:
        inner = zip_bytes(members)
        # The inner archive is already deflated: store it rather than compress it twice.
        outer = zip_bytes([(f"{study.accession}.zip", inner)], compress_type=zipfile.ZIP_STORED)
        writer.write(patient_dir / f"{study.accession}_export.zip", outer)
        counts["nested"] += 1
        counts["nested_instances"] += study.instances


def zip_bytes(members: list[tuple[str, bytes]], compress_type: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A ZIP archive in memory with fixed timestamps and attributes (reproducible bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.compress_type = compress_type
            info.create_system = 3  # Unix, whatever OS generates the sample
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data, compresslevel=6 if compress_type == zipfile.ZIP_DEFLATED else None)
    return buffer.getvalue()


class _AtomicWriter:
    """Writes each file under ``staging`` (same file system as the lake), then renames it.

    Creating thousands of small files is dominated by file-system latency, not CPU, so
    writes run on a few threads (the GIL is released during I/O) with a bounded backlog.
    """

    def __init__(self, staging: Path, threads: int = 2, backlog: int = 256) -> None:
        self._staging = staging
        self._made: set[Path] = set()
        self._n = 0
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sample-write")
        self._slots = threading.BoundedSemaphore(backlog)
        self._pending: list[Future[None]] = []

    def write(self, target: Path, data: bytes) -> None:
        parent = target.parent
        if parent not in self._made:
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        self._n += 1
        temp = self._staging / f"{self._n:08d}.part"
        self._slots.acquire()
        self._pending.append(self._pool.submit(self._write, temp, target, data))
        if len(self._pending) > 4096:
            self._pending = [f for f in self._pending if not f.done() or f.exception()]

    def _write(self, temp: Path, target: Path, data: bytes) -> None:
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
            os.replace(temp, target)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Wait for every write; re-raise the first failure."""
        self._pool.shutdown(wait=True)
        for future in self._pending:
            future.result()


def sample_sizes() -> list[str]:
    """Names accepted by ``--size``."""
    return list(SIZES)


__all__ = [
    "SAMPLE_NAMESPACE", "INVALID_FILE_NAME", "SampleSummary", "SamplePlan", "generate_sample",
    "plan_sample", "sample_sizes", "study_folder", "instance_file_name", "zip_bytes",
]
