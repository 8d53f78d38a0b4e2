"""What the synthetic sample is made of: pydicom's bundled test files and study recipes.

The repository ships no third-party images (SPEC §10): every generated instance starts
from one of the real test files that pydicom bundles (``pydicom.data.get_testdata_file``),
keeps its SOP class, Modality, transfer syntax and pixel data, and gets new identities.
This module is data only; :mod:`dicom_assets.sample_plan` draws from it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Template file (path relative to pydicom's ``data/test_files``) → its Modality (0008,0060).
#: Chosen for being readable by plain pydicom, covering CT, MR, US, CR, NM, RT, SR, SEG and
#: OT, several transfer syntaxes (explicit/implicit little endian, big endian, deflate, RLE,
#: JPEG, JPEG-LS, JPEG 2000) and a few multi-frame objects (US cine, RT dose grid, 2-frame SC).
TEMPLATES: dict[str, str] = {
    "CT_small.dcm": "CT",
    "dicomdirtests/77654033/CT2/17106": "CT",
    "dicomdirtests/77654033/CT2/17136": "CT",
    "dicomdirtests/98892001/CT5N/2062": "CT",
    "693_J2KI.dcm": "CT",
    "MR_small.dcm": "MR",
    "MR_small_implicit.dcm": "MR",
    "MR_small_RLE.dcm": "MR",
    "MR_small_jpeg_ls_lossless.dcm": "MR",
    "dicomdirtests/98892003/MR1/15820": "MR",
    "dicomdirtests/98892003/MR2/4950": "MR",
    "dicomdirtests/98892003/MR700/4467": "MR",
    "ExplVR_BigEnd.dcm": "US",
    "examples_rgb_color.dcm": "US",
    "examples_palette.dcm": "US",
    "examples_jpeg2k.dcm": "US",
    "examples_ybr_color.dcm": "US",
    "dicomdirtests/77654033/CR1/6154": "CR",
    "dicomdirtests/77654033/CR2/6247": "CR",
    "dicomdirtests/77654033/CR3/6278": "CR",
    "JPEG-lossy.dcm": "NM",
    "JPEG2000.dcm": "NM",
    "rtplan.dcm": "RTPLAN",
    "rtdose.dcm": "RTDOSE",
    "reportsi.dcm": "SR",
    "liver_1frame.dcm": "SEG",
    "SC_rgb_small_odd.dcm": "OT",
    "SC_rgb_rle_2frame.dcm": "OT",
    "image_dfl.dcm": "OT",
}

_CT = ("dicomdirtests/77654033/CT2/17106", "dicomdirtests/98892001/CT5N/2062",
       "dicomdirtests/77654033/CT2/17136", "CT_small.dcm", "693_J2KI.dcm")
_MR = ("dicomdirtests/98892003/MR1/15820", "dicomdirtests/98892003/MR2/4950",
       "dicomdirtests/98892003/MR700/4467", "MR_small.dcm", "MR_small_implicit.dcm",
       "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm")
_US = ("ExplVR_BigEnd.dcm", "examples_ybr_color.dcm", "examples_rgb_color.dcm",
       "examples_jpeg2k.dcm", "examples_palette.dcm")
_CR = ("dicomdirtests/77654033/CR1/6154", "dicomdirtests/77654033/CR2/6247",
       "dicomdirtests/77654033/CR3/6278")
_NM = ("JPEG-lossy.dcm", "JPEG2000.dcm")
_OT = ("SC_rgb_small_odd.dcm", "SC_rgb_rle_2frame.dcm", "image_dfl.dcm")
_SR = ("reportsi.dcm",)


@dataclass(frozen=True)
class SeriesRecipe:
    """One kind of series: its SeriesDescription, candidate templates and size range.

    ``count`` is the (low, high) number of instances drawn before the plan rescales
    every scalable series so the sample hits its exact instance total; ``(1, 1)``
    marks a series that always holds exactly one instance (a report, a plan, a dose).
    """

    description: str
    templates: tuple[str, ...]
    count: tuple[int, int]

    @property
    def fixed(self) -> bool:
        return self.count == (1, 1)


@dataclass(frozen=True)
class StudyRecipe:
    """One kind of study: StudyDescription, BodyPartExamined and its ordered series.

    A planned study takes the first *k* series of ``series`` (k ≥ 1), so the first entry
    is the one every study of this kind has. ``lateral`` studies carry Laterality
    (0020,0060) L or R on every series; ``sex`` forces PatientSex (breast imaging).
    """

    code: str
    description: str
    body_part: str
    series: tuple[SeriesRecipe, ...]
    weight: int
    lateral: bool = False
    sex: str | None = None


_REPORT = SeriesRecipe("PRELIMINARY REPORT", _SR, (1, 1))

STUDY_RECIPES: tuple[StudyRecipe, ...] = (
    StudyRecipe("CT_HEAD", "CT HEAD W/O CONTRAST", "HEAD", (
        SeriesRecipe("AX BRAIN 5MM", _CT, (40, 160)),
        SeriesRecipe("AX BONE 1.25MM", _CT, (40, 160)),
        _REPORT), weight=12),
    StudyRecipe("CT_CHEST", "CT CHEST W CONTRAST", "CHEST", (
        SeriesRecipe("AX LUNG 2.5MM", _CT, (60, 200)),
        SeriesRecipe("COR MPR 3MM", _CT, (30, 90)),
        _REPORT), weight=12),
    StudyRecipe("CT_ABDOMEN", "CT ABDOMEN PELVIS W CONTRAST", "ABDOMEN", (
        SeriesRecipe("PORTAL VENOUS 3MM", _CT, (60, 200)),
        SeriesRecipe("LIVER SEGMENTATION", ("liver_1frame.dcm",), (1, 1)),
        SeriesRecipe("SAG MPR 3MM", _CT, (30, 90))), weight=10),
    StudyRecipe("MR_BRAIN", "MR BRAIN W/O CONTRAST", "HEAD", (
        SeriesRecipe("AX T2 FSE", _MR, (15, 40)),
        SeriesRecipe("SAG T1", _MR, (15, 30)),
        SeriesRecipe("AX FLAIR", _MR, (15, 40))), weight=9),
    StudyRecipe("MR_KNEE", "MR KNEE W/O CONTRAST", "KNEE", (
        SeriesRecipe("SAG PD FS", _MR, (15, 35)),
        SeriesRecipe("COR T1", _MR, (15, 30))), weight=6, lateral=True),
    StudyRecipe("MR_ABDOMEN", "MR LIVER W WO CONTRAST", "ABDOMEN", (
        SeriesRecipe("AX T1 VIBE", _MR, (20, 60)),
        SeriesRecipe("AX T2 HASTE", _MR, (15, 40))), weight=4),
    StudyRecipe("US_ABDOMEN", "US ABDOMEN COMPLETE", "ABDOMEN", (
        SeriesRecipe("ABDOMEN", _US, (1, 4)),), weight=6),
    StudyRecipe("US_BREAST", "US BREAST", "BREAST", (
        SeriesRecipe("BREAST", _US, (1, 3)),), weight=3, lateral=True, sex="F"),
    StudyRecipe("CR_CHEST", "XR CHEST 2 VIEWS", "CHEST", (
        SeriesRecipe("PA", _CR, (1, 1)),
        SeriesRecipe("LATERAL", _CR, (1, 1))), weight=14),
    StudyRecipe("CR_KNEE", "XR KNEE 3 VIEWS", "KNEE", (
        SeriesRecipe("AP LAT OBLIQUE", _CR, (2, 3)),), weight=5, lateral=True),
    StudyRecipe("CR_CSPINE", "XR C-SPINE 4 VIEWS", "CSPINE", (
        SeriesRecipe("C-SPINE", _CR, (2, 4)),), weight=4),
    StudyRecipe("NM_BONE", "NM BONE SCAN WHOLE BODY", "WHOLEBODY", (
        SeriesRecipe("WHOLE BODY ANT POST", _NM, (1, 2)),), weight=3),
    StudyRecipe("RT_PELVIS", "RT PLANNING PELVIS", "PELVIS", (
        SeriesRecipe("RT PLAN", ("rtplan.dcm",), (1, 1)),
        SeriesRecipe("RT DOSE", ("rtdose.dcm",), (1, 1))), weight=2),
    StudyRecipe("OT_CAPTURE", "SECONDARY CAPTURE", "ABDOMEN", (
        SeriesRecipe("SCREEN CAPTURE", _OT, (1, 3)),), weight=2),
)

#: Tags of the template removed from every generated instance: identifying or
#: source-specific values that would contradict the synthetic patient.
REMOVED_KEYWORDS: tuple[str, ...] = (
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
    "PatientBirthName", "PatientMotherBirthName", "PatientTelephoneNumbers",
    "PatientBirthTime", "PatientComments", "AdditionalPatientHistory", "EthnicGroup",
    "OperatorsName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "InstitutionAddress", "InstitutionalDepartmentName",
    "StudyComments", "RequestAttributesSequence", "ContentCreatorName",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeviceSerialNumber",
    "StorageMediaFileSetUID", "TimezoneOffsetFromUTC", "ModalitiesInStudy",
    "ClinicalTrialCoordinatingCenterName", "PerformedProcedureStepID",
)

FAMILY_NAMES: tuple[str, ...] = (
    "DOE", "ROE", "SMITH", "JOHNSON", "GARCIA", "MARTINEZ", "NGUYEN", "KIM", "PATEL",
    "MUELLER", "ROSSI", "DUBOIS", "NOVAK", "SILVA", "COHEN", "OKAFOR", "TANAKA", "LARSEN",
    "BROWN", "WILSON", "ANDERSON", "THOMAS", "MOORE", "TAYLOR", "LEE", "WALKER", "HALL",
    "YOUNG", "KING", "WRIGHT", "LOPEZ", "HILL", "SCOTT", "GREEN", "ADAMS", "BAKER",
)
GIVEN_NAMES_F: tuple[str, ...] = (
    "JANE", "MARY", "ANNA", "SOFIA", "EMMA", "OLIVIA", "AVA", "MIA", "CHLOE", "LUCIA",
    "HANA", "AMARA", "INGRID", "PRIYA", "ELENA", "GRACE",
)
GIVEN_NAMES_M: tuple[str, ...] = (
    "JOHN", "JAMES", "ROBERT", "MICHAEL", "DAVID", "LUCAS", "NOAH", "LIAM", "MATEO",
    "KENJI", "OMAR", "RAVI", "ERIK", "PAVEL", "SAMUEL", "THEO",
)
GIVEN_NAMES_O: tuple[str, ...] = ("ALEX", "SAM", "JORDAN", "TAYLOR", "ROBIN", "KAI")
MIDDLE_INITIALS: tuple[str, ...] = ("A", "B", "C", "E", "J", "L", "M", "R")

#: (InstitutionName, IssuerOfPatientID) pairs: fictitious organisations.
INSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("CONTOSO GENERAL HOSPITAL", "CONTOSO"),
    ("FABRIKAM IMAGING CENTER", "FABRIKAM"),
    ("NORTHWIND MEDICAL CLINIC", "NORTHWIND"),
)
REFERRING_PHYSICIANS: tuple[str, ...] = (
    "HOUSE^GREGORY^^DR", "GREY^MEREDITH", "QUINN^MICHAELA^^DR", "KILDARE^JAMES",
    "WELBY^MARCUS^^DR", "CARTER^JOHN", "ROSS^DOUG", "",
)

__all__ = [
    "TEMPLATES", "SeriesRecipe", "StudyRecipe", "STUDY_RECIPES", "REMOVED_KEYWORDS",
    "FAMILY_NAMES", "GIVEN_NAMES_F", "GIVEN_NAMES_M", "GIVEN_NAMES_O", "MIDDLE_INITIALS",
    "INSTITUTIONS", "REFERRING_PHYSICIANS",
]
