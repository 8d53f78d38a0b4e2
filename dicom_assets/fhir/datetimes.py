"""DICOM DA / TM / Timezone Offset From UTC → FHIR ``date`` / ``dateTime`` / ``instant`` strings.

Inputs are either the silver normalised forms (DA ``YYYY-MM-DD``, TM ``HH:MM:SS[.ffffff]``) or the
raw DICOM forms (PS3.5 §6.2: DA ``YYYYMMDD``, TM ``HH[MM[SS[.F{1,6}]]]``, offset ``&ZZXX``), plus
the ACR-NEMA ``YYYY.MM.DD`` / ``HH:MM:SS`` forms old files still carry. A value that is not a valid
date or time gives ``None``: we never invent a value and never fail on one.

FHIR R4 ``dateTime`` (datatypes §2.24.0.1) allows a partial date (``YYYY``, ``YYYY-MM``,
``YYYY-MM-DD``), but once a time is given it must have seconds *and* a time zone. Hence:

* TM with less precision than seconds (``07`` or ``0710``) is padded with zeros (``07:00:00``), as
  pydicom's ``TM`` does: FHIR has no hour- or minute-precision time.
* A time without a zone is **dropped, keeping the date**: DICOM DA/TM are local time of the
  creator, and Timezone Offset From UTC (0008,0201) is the only statement of that zone
  (PS3.3 C.12.1.1.8). Assuming UTC would shift the time by hours and state a false precision;
  a caller that knows the site's zone can pass ``default_offset``.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

_DATE_RE = re.compile(r"^(\d{4})(?:[-.]?(\d{2})(?:[-.]?(\d{2}))?)?$")
_TIME_RE = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")
_OFFSET_RE = re.compile(r"^([+-])(\d{2}):?(\d{2})$")


def fhir_date(value: str | None) -> str | None:
    """DA (raw, normalised or partial) → FHIR ``date`` (``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``).

    Used for Patient.birthDate from Patient's Birth Date (0010,0030) and as the date part of
    ``started``. Year 0000 (a common "unknown" filler) and impossible dates give ``None``.
    """
    if value is None:
        return None
    match = _DATE_RE.match(value.strip())
    if match is None:
        return None
    year_s, month_s, day_s = match.groups()
    year = int(year_s)
    if year < 1:
        return None
    if month_s is None:
        return year_s
    month = int(month_s)
    if not 1 <= month <= 12:
        return None
    if day_s is None:
        return f"{year_s}-{month_s}"
    try:
        date(year, month, int(day_s))
    except ValueError:
        return None
    return f"{year_s}-{month_s}-{day_s}"


def fhir_time(value: str | None) -> str | None:
    """TM (raw or normalised, any precision) → ``HH:MM:SS[.f]``, padding missing minutes/seconds with 0.

    Seconds may be 60 (leap second), which both DICOM and FHIR allow. The fraction is kept as
    recorded (up to 6 digits).
    """
    if value is None:
        return None
    match = _TIME_RE.match(value.strip())
    if match is None:
        return None
    hh, mm, ss, frac = match.groups()
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        return None
    text = f"{hh}:{mm or '00'}:{ss or '00'}"
    return f"{text}.{frac}" if frac else text


def fhir_offset(value: str | None) -> str | None:
    """Timezone Offset From UTC (0008,0201) ``&ZZXX`` → ``±hh:mm``; out of FHIR's range → ``None``.

    DICOM allows -1200 … +1400; FHIR's dateTime pattern allows hours 00–13 and exactly 14:00.
    """
    if value is None:
        return None
    match = _OFFSET_RE.match(value.strip())
    if match is None:
        return None
    sign, hh, mm = match.groups()
    hours, minutes = int(hh), int(mm)
    if minutes > 59 or hours > 14 or (hours == 14 and minutes != 0):
        return None
    return f"{sign}{hh}:{mm}"


def fhir_datetime(
    date_value: str | None,
    time_value: str | None,
    offset_value: str | None,
    *,
    default_offset: str | None = None,
) -> str | None:
    """DA + TM + Timezone Offset From UTC → FHIR ``dateTime`` (e.g. ImagingStudy.started).

    ``19740710`` + ``071024`` + ``+0000`` → ``1974-07-10T07:10:24+00:00``. Without a date there
    is no value; without a usable time or zone (and no ``default_offset``) the date alone is
    returned; a partial date never carries a time.
    """
    day = fhir_date(date_value)
    if day is None:
        return None
    if len(day) != 10:
        return day
    time_part = fhir_time(time_value)
    if time_part is None:
        return day
    zone = fhir_offset(offset_value) or fhir_offset(default_offset)
    if zone is None:
        return day
    return f"{day}T{time_part}{zone}"


def fhir_instant(moment: datetime) -> str:
    """A timezone-aware datetime → FHIR ``instant`` in UTC with microseconds (``YYYY-MM-DDThh:mm:ss.ffffffZ``).

    Microseconds keep the value identical to the microsecond ``lastUpdated`` table column.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("meta.lastUpdated needs a timezone-aware datetime")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_instant(value: str) -> datetime:
    """FHIR ``instant`` → timezone-aware UTC datetime (inverse of :func:`fhir_instant`)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("instant without a time zone")
    return parsed.astimezone(UTC)
