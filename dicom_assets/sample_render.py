"""Turn a planned series into DICOM file bytes, starting from a pydicom test file.

Each template is read once and mutated in place for every series that uses it: every
rewritten attribute is set (or removed) for each series, so no value leaks from one
series to the next and the output depends only on the plan.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
from pydicom.charset import default_encoding
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_assets.sample_catalog import REMOVED_KEYWORDS
from dicom_assets.sample_plan import SeriesPlan, StudyPlan, instance_uid, patient_age

_ZERO_PREAMBLE = b"\x00" * 128
#: Elements that differ between instances of one series (see render_series).
_VARYING = (0x00080018, 0x00200013, 0x00200032, 0x00201041)
_META_GROUP_LENGTH = 0x00020000
_MEDIA_SOP_INSTANCE = 0x00020003
#: Date/time attributes of the template that take the study's (or series') date/time.
_DATE_KEYWORDS = ("InstanceCreationDate", "AcquisitionDate", "ContentDate",
                  "PerformedProcedureStepStartDate", "RTPlanDate")
_TIME_KEYWORDS = ("InstanceCreationTime", "AcquisitionTime", "ContentTime",
                  "PerformedProcedureStepStartTime", "RTPlanTime")


def template_path(name: str) -> Path:
    """Path of a pydicom bundled test file (no network: these ship inside pydicom)."""
    found = get_testdata_file(name)
    if found is None:
        raise FileNotFoundError(f"pydicom test file {name!r} is not installed")
    return Path(str(found))


class TemplateLibrary:
    """Reads each template at most once (pixel data included) and hands out the dataset."""

    def __init__(self) -> None:
        self._cache: dict[str, Dataset] = {}
        self._stacks: dict[str, tuple[list[float], list[float], float] | None] = {}

    def get(self, name: str) -> Dataset:
        ds = self._cache.get(name)
        if ds is None:
            with warnings.catch_warnings():
                # Some bundled files carry harmless oddities (padding, old VRs); read them quietly.
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(template_path(name))
            # Some preambles hold a TIFF header (dual-personality files); ours are plain DICOM.
            ds.preamble = _ZERO_PREAMBLE
            for keyword in REMOVED_KEYWORDS:
                if keyword in ds:
                    delattr(ds, keyword)
            self._cache[name] = ds
            # Taken before any mutation: every series restarts from the template's own origin.
            self._stacks[name] = _slice_stack(ds)
        return ds

    def stack(self, name: str) -> tuple[list[float], list[float], float] | None:
        """Origin, slice normal and spacing of a single-frame slice template, else None."""
        self.get(name)
        return self._stacks[name]


def render_series(
    library: TemplateLibrary,
    study: StudyPlan,
    series: SeriesPlan,
    seed: int,
    *,
    spliced: bool = True,
) -> Iterator[tuple[int, str, bytes]]:
    """Yield ``(InstanceNumber, SOPInstanceUID, file bytes)`` for every instance of ``series``.

    Rewritten attributes: Patient module — PatientName, PatientID, IssuerOfPatientID,
    PatientBirthDate, PatientSex, PatientAge; General Study — StudyInstanceUID, StudyDate,
    StudyTime, AccessionNumber, StudyID, StudyDescription, ReferringPhysicianName;
    General Series — SeriesInstanceUID, SeriesNumber, SeriesDescription, SeriesDate,
    SeriesTime, BodyPartExamined, Laterality (set for lateral studies, removed otherwise);
    InstitutionName; FrameOfReferenceUID (when present); per instance SOPInstanceUID,
    MediaStorageSOPInstanceUID, InstanceNumber and, for CT/MR slices, ImagePositionPatient
    and SliceLocation stepped along the slice normal. Modality, SOP class, transfer syntax
    and pixel data stay those of the template.

    ``spliced`` encodes the unchanging elements once per series and only the per-instance
    ones per file (same bytes as ``pydicom.dcmwrite``, about ten times faster);
    ``spliced=False`` calls ``dcmwrite`` for every instance.
    """
    ds = library.get(series.template)
    _apply_series(ds, study, series)
    stack = library.stack(series.template) if series.modality in ("CT", "MR") else None
    encoder: _SplicedEncoder | None = None
    for number in range(1, series.instances + 1):
        sop_uid = instance_uid(seed, series.uid, number)
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.InstanceNumber = number
        if stack is not None:
            origin, normal, spacing = stack
            offset = (number - 1) * spacing
            position = [o + offset * n for o, n in zip(origin, normal, strict=True)]
            ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
            if "SliceLocation" in ds:
                ds.SliceLocation = f"{sum(p * n for p, n in zip(position, normal, strict=True)):.4f}"
        if spliced and ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
            if encoder is None:
                encoder = _SplicedEncoder(ds)
            data = encoder.encode(ds)
        else:
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds)
            data = buffer.getvalue()
        yield number, sop_uid, data


def _apply_series(ds: Dataset, study: StudyPlan, series: SeriesPlan) -> None:
    patient = study.patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = patient_age(patient.birth_date, study.date)
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyID = study.accession
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = study.referring_physician
    ds.InstitutionName = study.institution
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.SeriesDate = study.date
    ds.SeriesTime = series.time
    ds.BodyPartExamined = study.body_part
    if study.laterality:
        ds.Laterality = study.laterality
    elif "Laterality" in ds:
        del ds.Laterality
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = series.frame_of_reference_uid
    for keyword in _DATE_KEYWORDS:
        if keyword in ds:
            setattr(ds, keyword, study.date)
    for keyword in _TIME_KEYWORDS:
        if keyword in ds:
            setattr(ds, keyword, series.time)
    if "AcquisitionDateTime" in ds:
        ds.AcquisitionDateTime = study.date + series.time


class _SplicedEncoder:
    """Encodes one series' files as pre-encoded static runs around the varying elements.

    Only SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation and the
    File Meta's MediaStorageSOPInstanceUID change between instances of a series, so the
    other elements (pixel data included) are encoded once, with the same writer and
    transfer syntax ``dcmwrite`` uses, and the File Meta group length is recomputed.
    """

    def __init__(self, ds: Dataset) -> None:
        tsyntax = ds.file_meta.TransferSyntaxUID
        self._implicit = tsyntax == ImplicitVRLittleEndian
        self._little = tsyntax != ExplicitVRBigEndian
        if "PixelData" in ds:
            # As dcmwrite does (PS3.5 A.4): encapsulated pixel data has undefined length.
            ds["PixelData"].is_undefined_length = tsyntax.is_compressed
        self._charset = ds.get("SpecificCharacterSet", default_encoding)
        # write_dataset skips retired group lengths; so do we.
        tags = [t for t in sorted(ds.keys()) if not (t.element == 0 and t.group > 6)]
        self._parts = _runs(tags, _VARYING, lambda t: self._element(ds, t))
        meta_tags = [t for t in sorted(ds.file_meta.keys()) if t != _META_GROUP_LENGTH]
        self._meta_parts = _runs(meta_tags, (_MEDIA_SOP_INSTANCE,),
                                 lambda t: self._element(ds.file_meta, t, meta=True))
        self._preamble = (ds.preamble or _ZERO_PREAMBLE) + b"DICM"

    def _element(self, ds: Dataset, tag: BaseTag, meta: bool = False) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR = False if meta else self._implicit
        fp.is_little_endian = True if meta else self._little
        write_data_element(fp, ds.get_item(tag), default_encoding if meta else self._charset)
        return fp.getvalue()

    def encode(self, ds: Dataset) -> bytes:
        meta = b"".join(p if isinstance(p, bytes) else self._element(ds.file_meta, p, meta=True)
                        for p in self._meta_parts)
        body = b"".join(p if isinstance(p, bytes) else self._element(ds, p)
                        for p in self._parts)
        group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(meta))
        return b"".join((self._preamble, group_length, meta, body))


def _runs(
    tags: list[BaseTag], varying: tuple[int, ...], encode: Callable[[BaseTag], bytes]
) -> list[bytes | BaseTag]:
    """Tags in order, consecutive static ones pre-encoded and joined into one bytes run."""
    parts: list[bytes | BaseTag] = []
    run: list[bytes] = []
    for tag in tags:
        if tag in varying:
            if run:
                parts.append(b"".join(run))
                run = []
            parts.append(tag)
        else:
            run.append(encode(tag))
    if run:
        parts.append(b"".join(run))
    return parts


def _slice_stack(ds: Dataset) -> tuple[list[float], list[float], float] | None:
    """Origin, slice normal and spacing of a single-frame slice, or None when absent."""
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return None
    origin = [float(v) for v in ds.ImagePositionPatient]
    r = [float(v) for v in ds.ImageOrientationPatient[:3]]
    c = [float(v) for v in ds.ImageOrientationPatient[3:]]
    normal = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]
    spacing = float(ds.get("SliceThickness", 1.0) or 1.0)
    return origin, normal, spacing


__all__ = ["TemplateLibrary", "render_series", "template_path"]
