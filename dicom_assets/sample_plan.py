"""The deterministic plan of a synthetic sample: who, which studies, which series, how many.

Planning is pure (no I/O): the same ``(size, seed)`` always gives the same plan, and the
plan alone fixes every identity written by :mod:`dicom_assets.sample_render`. UIDs are
``2.25.<decimal of a name-based UUID>`` (PS3.5 §B.2) derived from the seed and the
object's position, so they are valid, unique and reproducible.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal

from dicom_assets.sample_catalog import (
    FAMILY_NAMES,
    GIVEN_NAMES_F,
    GIVEN_NAMES_M,
    GIVEN_NAMES_O,
    INSTITUTIONS,
    MIDDLE_INITIALS,
    REFERRING_PHYSICIANS,
    STUDY_RECIPES,
    TEMPLATES,
    StudyRecipe,
)

#: Fixed namespace of the sample's name-based UUIDs (uuid5 of the project name in the URL space).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/dicom-assets/sample")

Container = Literal["native", "zip", "nested"]
Naming = Literal["dcm", "bare", "ima"]

#: Share of instances per container, as the brief for the sample asks (~60/25/15).
CONTAINER_SHARES: dict[Container, float] = {"native": 0.60, "zip": 0.25, "nested": 0.15}


@dataclass(frozen=True)
class SampleShape:
    """Exact totals of one sample size (valid instances; the invalid file comes on top)."""

    patients: int
    studies: int
    series: int
    instances: int
    invalid_files: int = 1


#: ``fabric`` reproduces the counts of Fabric's published DICOM sample (SPEC §10).
SIZES: dict[str, SampleShape] = {
    "small": SampleShape(patients=20, studies=25, series=32, instances=500),
    "fabric": SampleShape(patients=302, studies=340, series=389, instances=7739),
}


@dataclass(frozen=True)
class PatientPlan:
    """Patient module values: PatientID, PatientName, PatientBirthDate, PatientSex, issuer."""

    patient_id: str
    name: str
    birth_date: str
    sex: str
    issuer: str
    institution: str


@dataclass(frozen=True)
class SeriesPlan:
    """One series: SeriesInstanceUID, SeriesNumber, its template file and instance count."""

    uid: str
    number: int
    description: str
    template: str
    modality: str
    instances: int
    time: str
    frame_of_reference_uid: str


@dataclass(frozen=True)
class StudyPlan:
    """One study and how it is packaged in Ingest (``container``, file ``naming``)."""

    index: int
    uid: str
    patient: PatientPlan
    accession: str
    date: str
    time: str
    description: str
    body_part: str
    laterality: str | None
    referring_physician: str
    institution: str
    series: tuple[SeriesPlan, ...]
    container: Container
    naming: Naming

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


@dataclass(frozen=True)
class SamplePlan:
    """The whole sample: patients and studies in generation order."""

    size: str
    seed: int
    patients: tuple[PatientPlan, ...]
    studies: tuple[StudyPlan, ...]

    @property
    def series_count(self) -> int:
        return sum(len(s.series) for s in self.studies)

    @property
    def instance_count(self) -> int:
        return sum(s.instances for s in self.studies)


def uid(seed: int, *parts: object) -> str:
    """A ``2.25.`` UID derived only from ``seed`` and ``parts`` (stable across runs).

    PS3.5 §B.2 allows a UUID as ``2.25.<its 128-bit integer>``; a name-based (version 5)
    UUID makes it reproducible. (``pydicom.uid.generate_uid(prefix=None)`` ignores its
    entropy sources and draws a random UUID, so it cannot be used here.)
    """
    name = "/".join(map(str, ("dicom-assets-sample", seed, *parts)))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def instance_uid(seed: int, series_uid: str, number: int) -> str:
    """SOPInstanceUID (and MediaStorageSOPInstanceUID) of instance ``number`` of a series."""
    return uid(seed, "sop", series_uid, number)


def plan_sample(size: str = "small", *, seed: int = 0) -> SamplePlan:
    """Plan a sample of ``size`` (a key of :data:`SIZES`) with exact totals.

    Every patient has at least one study, every study at least one series, every series
    at least one instance; the extras are spread by a ``random.Random`` seeded from
    ``(size, seed)`` (string seeding is stable across Python processes).
    """
    if size not in SIZES:
        raise ValueError(f"unknown sample size {size!r}; expected one of {sorted(SIZES)}")
    shape = SIZES[size]
    if not shape.patients <= shape.studies <= shape.series <= shape.instances:
        raise ValueError(f"inconsistent sample shape {shape}")
    rng = random.Random(f"dicom-assets-sample:{size}:{seed}")

    recipes = _study_recipes(rng, shape.studies)
    owners = _study_owners(rng, shape.patients, shape.studies)
    series_per_study = _series_per_study(rng, recipes, shape.series)
    sizes = _instance_counts(rng, recipes, series_per_study, shape.instances)
    patients = _patients(rng, seed, shape.patients, owners, recipes)

    studies: list[StudyPlan] = []
    shares = {c: 0 for c in CONTAINER_SHARES}
    placed = 0
    used_dates: dict[str, set[str]] = {}
    for i in range(shape.studies):
        recipe, patient = recipes[i], patients[owners[i]]
        study_dt = _study_datetime(rng, used_dates.setdefault(patient.patient_id, set()))
        series_uids: list[SeriesPlan] = []
        study_uid = uid(seed, "study", i)
        frame_uid = uid(seed, "frame", i)
        for j, n in enumerate(sizes[i]):
            srecipe = recipe.series[j]
            template = srecipe.templates[rng.randrange(len(srecipe.templates))]
            series_dt = study_dt + timedelta(minutes=4 * j + rng.randrange(3))
            series_uids.append(SeriesPlan(
                uid=uid(seed, "series", i, j + 1), number=j + 1, description=srecipe.description,
                template=template, modality=TEMPLATES[template], instances=n,
                time=series_dt.strftime("%H%M%S"), frame_of_reference_uid=frame_uid,
            ))
        n_inst = sum(sizes[i])
        placed += n_inst
        # Largest deficit first keeps each container's share of instances near its target.
        container = max(CONTAINER_SHARES, key=lambda c: CONTAINER_SHARES[c] * placed - shares[c])
        shares[container] += n_inst
        laterality = rng.choice(("L", "R")) if recipe.lateral else None
        institution = patient.institution if rng.random() < 0.8 else rng.choice(INSTITUTIONS)[0]
        description = recipe.description
        if laterality:
            description = description.replace(" ", " LEFT " if laterality == "L" else " RIGHT ", 1)
        studies.append(StudyPlan(
            index=i, uid=study_uid, patient=patient, accession=f"ACC{seed % 100:02d}{i + 1:06d}",
            date=study_dt.strftime("%Y%m%d"), time=study_dt.strftime("%H%M%S"),
            description=description, body_part=recipe.body_part, laterality=laterality,
            referring_physician=rng.choice(REFERRING_PHYSICIANS), institution=institution,
            series=tuple(series_uids), container=container,
            naming=rng.choices(("dcm", "bare", "ima"), weights=(70, 15, 15))[0],
        ))
    return SamplePlan(size=size, seed=seed, patients=tuple(patients), studies=tuple(studies))


def _study_recipes(rng: random.Random, n: int) -> list[StudyRecipe]:
    # Every recipe appears once first, so even the small sample covers every modality.
    recipes = list(STUDY_RECIPES)
    rng.shuffle(recipes)
    weights = [r.weight for r in STUDY_RECIPES]
    while len(recipes) < n:
        recipes.append(rng.choices(STUDY_RECIPES, weights=weights)[0])
    return recipes[:n]


def _study_owners(rng: random.Random, patients: int, studies: int) -> list[int]:
    owners = list(range(patients))
    extra = studies - patients
    # Repeat visits: a few patients come back more than once, most come once.
    pool = list(range(patients))
    rng.shuffle(pool)
    for k in range(extra):
        owners.append(pool[k % len(pool)] if k < len(pool) else rng.randrange(patients))
    order = list(range(studies))
    rng.shuffle(order)
    return [owners[k] for k in order]


def _series_per_study(rng: random.Random, recipes: list[StudyRecipe], total: int) -> list[int]:
    counts = [1] * len(recipes)
    capacity = sum(len(r.series) for r in recipes)
    if total > capacity:
        raise ValueError(f"cannot place {total} series in {len(recipes)} studies")
    for _ in range(total - len(recipes)):
        open_ = [i for i, r in enumerate(recipes) if counts[i] < len(r.series)]
        counts[rng.choice(open_)] += 1
    return counts


def _instance_counts(
    rng: random.Random, recipes: list[StudyRecipe], per_study: list[int], total: int
) -> list[list[int]]:
    """Instances per series: draw each series' size, then rescale scalable ones to ``total``."""
    drawn: list[list[int]] = []
    for recipe, k in zip(recipes, per_study, strict=True):
        drawn.append([rng.randint(*s.count) for s in recipe.series[:k]])
    flat = [(i, j) for i, row in enumerate(drawn) for j in range(len(row))]
    scalable = [(i, j) for i, j in flat if not recipes[i].series[j].fixed]
    fixed_total = sum(drawn[i][j] for i, j in flat if recipes[i].series[j].fixed)
    budget = total - fixed_total - len(scalable)  # each scalable series keeps at least one
    if budget < 0 or not scalable:
        raise ValueError(f"cannot place {total} instances in {len(flat)} series")
    weights = [drawn[i][j] for i, j in scalable]
    wsum = sum(weights)
    shares = [budget * w / wsum for w in weights]
    extra = [int(s) for s in shares]
    # Largest remainder (ties by position) makes the total exact and deterministic.
    by_rest = sorted(range(len(scalable)), key=lambda k: (extra[k] - shares[k], k))
    for k in by_rest[: budget - sum(extra)]:
        extra[k] += 1
    for (i, j), e in zip(scalable, extra, strict=True):
        drawn[i][j] = 1 + e
    return drawn


def _patients(
    rng: random.Random, seed: int, n: int, owners: list[int], recipes: list[StudyRecipe]
) -> list[PatientPlan]:
    forced = {owners[i]: r.sex for i, r in enumerate(recipes) if r.sex}
    patients = []
    for p in range(n):
        sex = forced.get(p) or rng.choices(("F", "M", "O"), weights=(48, 48, 4))[0]
        given = {"F": GIVEN_NAMES_F, "M": GIVEN_NAMES_M}.get(sex, GIVEN_NAMES_O)
        family, first = rng.choice(FAMILY_NAMES), rng.choice(given)
        # Vary the PN form as exports do: bare, with a middle name, with trailing delimiters.
        form = rng.randrange(10)
        name = (f"{family}^{first}^{rng.choice(MIDDLE_INITIALS)}" if form < 2
                else f"{family}^{first}^^^" if form < 4 else f"{family}^{first}")
        birth = date(1932, 1, 1) + timedelta(days=rng.randrange(365 * 80))
        institution, issuer = rng.choice(INSTITUTIONS)
        patients.append(PatientPlan(
            patient_id=f"SMP{seed % 100:02d}{p + 1:05d}", name=name,
            birth_date=birth.strftime("%Y%m%d"), sex=sex, issuer=issuer, institution=institution,
        ))
    return patients


def _study_datetime(rng: random.Random, used: set[str]) -> datetime:
    while True:
        day = date(2019, 1, 1) + timedelta(days=rng.randrange(6 * 365))
        if day.isoformat() not in used:
            used.add(day.isoformat())
            break
    seconds = 7 * 3600 + rng.randrange(11 * 3600)
    return datetime(day.year, day.month, day.day) + timedelta(seconds=seconds)


def patient_age(birth_date: str, study_date: str) -> str:
    """PatientAge (0010,1010) as an AS value (``nnnY``) at the study date."""
    b = datetime.strptime(birth_date, "%Y%m%d").date()
    s = datetime.strptime(study_date, "%Y%m%d").date()
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return f"{max(years, 0):03d}Y"


__all__ = [
    "SampleShape", "SIZES", "PatientPlan", "SeriesPlan", "StudyPlan", "SamplePlan",
    "CONTAINER_SHARES", "plan_sample", "uid", "instance_uid", "patient_age",
]
