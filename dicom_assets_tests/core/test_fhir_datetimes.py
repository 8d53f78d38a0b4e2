"""DICOM DA/TM/offset → FHIR date, dateTime and instant (PS3.5 §6.2, FHIR R4 datatypes)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from dicom_assets.fhir.datetimes import fhir_date, fhir_datetime, fhir_instant, fhir_offset, fhir_time, parse_instant

# FHIR R4 dateTime regular expression (datatypes §2.24.0.1).
FHIR_DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)


@pytest.mark.parametrize(
    ("da", "tm", "offset", "expected"),
    [
        ("19740710", "071024", "+0000", "1974-07-10T07:10:24+00:00"),  # acceptance vector
        ("1974-07-10", "07:10:24", "+0000", "1974-07-10T07:10:24+00:00"),  # silver normalised forms
        ("19740710", "071024.123", "-0500", "1974-07-10T07:10:24.123-05:00"),
        ("19740710", "07", "+0100", "1974-07-10T07:00:00+01:00"),  # TM "HH"
        ("19740710", "0710", "+0100", "1974-07-10T07:10:00+01:00"),  # TM "HHMM"
        ("19740710", "071024", None, "1974-07-10"),  # no zone: keep the date only
        ("19740710", None, "+0000", "1974-07-10"),  # date only
        ("19740710", "", "", "1974-07-10"),
        ("1974.07.10", "07:10:24", "+1400", "1974-07-10T07:10:24+14:00"),  # ACR-NEMA forms
        ("19740710", "256199", "+0000", "1974-07-10"),  # impossible time dropped
        ("19740710", "071024", "+1500", "1974-07-10"),  # offset out of range dropped
        (None, "071024", "+0000", None),  # missing date: no started
        ("", "071024", "+0000", None),
        ("00000000", "071024", "+0000", None),
        ("19740230", "071024", "+0000", None),  # 30 February
        ("1974", "071024", "+0000", "1974"),  # partial date never carries a time
    ],
)
def test_fhir_datetime_vectors(da: str | None, tm: str | None, offset: str | None, expected: str | None) -> None:
    result = fhir_datetime(da, tm, offset)
    assert result == expected
    if result is not None:
        assert FHIR_DATETIME.fullmatch(result)


def test_default_offset_applies_only_when_the_instance_has_none() -> None:
    assert fhir_datetime("19740710", "071024", None, default_offset="+0200") == "1974-07-10T07:10:24+02:00"
    assert fhir_datetime("19740710", "071024", "-0300", default_offset="+0200") == "1974-07-10T07:10:24-03:00"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("19700102", "1970-01-02"),
        ("1970-01-02", "1970-01-02"),
        ("197001", "1970-01"),
        ("1970", "1970"),
        ("19701302", None),
        ("abc", None),
        (None, None),
    ],
)
def test_fhir_date(value: str | None, expected: str | None) -> None:
    assert fhir_date(value) == expected


def test_time_and_offset_parsers() -> None:
    assert fhir_time("235960") == "23:59:60"  # leap second allowed by DICOM and FHIR
    assert fhir_time("2400") is None
    assert fhir_offset("-1200") == "-12:00"
    assert fhir_offset("+1401") is None
    assert fhir_offset("0100") is None  # the sign is mandatory (PS3.5 &ZZXX)


def test_instant_round_trips_in_utc_and_requires_a_zone() -> None:
    moment = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    text = fhir_instant(moment)
    assert text == "2024-05-06T05:08:09.123456Z"
    assert parse_instant(text) == moment
    with pytest.raises(ValueError):
        fhir_instant(datetime(2024, 5, 6))
