"""Leaf values of the DICOM JSON model (PS3.18 Annex F.2) from raw element bytes.

Each converter takes the raw value bytes of one element, its byte order and the
character set in force, and returns the JSON ``"Value"`` array, or ``None`` when
the element is empty (PS3.18 F.2.5: an empty element has no ``"Value"``).
Decoding follows what pydicom 3 does for the same bytes (PS3.5 §6.2 VR rules,
PS3.5 §6.1 character sets), reusing pydicom's own charset helpers, so a value
read here equals ``pydicom.dcmread(...)[tag].value``; the difference is that no
``DataElement`` objects are built. Converters never raise on bad text: numbers
that do not parse are kept as their raw string. They raise
:class:`ValueLengthError` for numeric values whose length is not a multiple of
the value size, which pydicom refuses as well.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from struct import Struct, calcsize
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName
from pydicom.values import convert_PN

__all__ = ["Charset", "CharsetError", "CONVERTERS", "DEFAULT_CHARSET", "ValueLengthError", "charset_for"]

JsonValue = list[Any] | None
Converter = Callable[[bytes, bool, "Charset"], JsonValue]

ESC = b"\x1b"


class ValueLengthError(ValueError):
    """A numeric value whose byte length is not a multiple of the value size."""


class CharsetError(ValueError):
    """A (0008,0005) value that no codec can be found for (pydicom fails on it too)."""


class Charset:
    """The Python codecs for one (0008,0005) Specific Character Set value.

    ``text`` decodes SH/LO/UC/ST/LT/UT/PN bytes exactly as
    :func:`pydicom.charset.decode_bytes`: the first codec when the value has no
    ISO 2022 escape sequence, pydicom's escape-aware decoder otherwise, and
    pydicom's replacement-character fallback for undecodable bytes.
    """

    __slots__ = ("encodings", "first")

    def __init__(self, encodings: list[str]) -> None:
        self.encodings = encodings
        self.first = encodings[0]

    def text(self, raw: bytes) -> str:
        if ESC not in raw:
            try:
                return raw.decode(self.first)
            except (UnicodeError, LookupError):
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return decode_bytes(raw, self.encodings, TEXT_VR_DELIMS)
            except Exception:  # noqa: BLE001 - pydicom trips over some malformed ISO 2022 values
                return self.lenient(raw)

    def lenient(self, raw: bytes) -> str:
        """``raw`` in the first codec with replacement characters: the last resort, never raises."""
        try:
            return raw.decode(self.first, "replace")
        except LookupError:
            return raw.decode("latin-1")


_CHARSETS: dict[tuple[str, ...], Charset] = {}


def _term(value: Any) -> str:
    # (0008,0005) is CS; under a corrupt VR it may read as PN (pydicom then
    # uses the name text) or as numbers (pydicom fails, and so do we).
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, dict):
        return str(value.get("Alphabetic", ""))
    raise CharsetError("Specific Character Set is not text")


def charset_for(values: Sequence[Any] | None) -> Charset:
    """The :class:`Charset` for the ``"Value"`` of a (0008,0005) element (cached)."""
    key = tuple(_term(v) for v in values) if values else ("",)
    cs = _CHARSETS.get(key)
    if cs is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arg: str | list[str] = key[0] if len(key) == 1 else list(key)
            try:
                cs = Charset(convert_encodings(arg))
            except (ValueError, LookupError):
                raise CharsetError("Specific Character Set names no usable codec") from None
        if len(_CHARSETS) < 1024:  # bounded: corrupt files must not grow the cache forever
            _CHARSETS[key] = cs
    return cs


#: ISO-IR 6 (no (0008,0005)): pydicom's default codec, Latin-1 compatible.
DEFAULT_CHARSET = charset_for(None)


def _split(s: str) -> JsonValue:
    if not s:
        return None
    return [v or None for v in s.split("\\")]


def conv_string(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """AS, CS, DA, DT, TM: ISO-IR 6 text, trailing spaces/NULs dropped, ``\\`` splits."""
    return _split(raw.decode("latin-1").rstrip(" \x00"))


def conv_ui(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """UI: trailing NUL padding dropped (PS3.5 §9.1)."""
    return _split(raw.decode("latin-1").rstrip("\x00 "))


def conv_ae(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """AE: leading and trailing spaces are not significant."""
    parts = [v.strip() for v in raw.decode("latin-1").split("\\")]
    if len(parts) == 1 and not parts[0]:
        return None
    return [v or None for v in parts]


def conv_ur(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """UR: single-valued, trailing spaces not significant."""
    s = raw.decode("latin-1").rstrip()
    return [s] if s else None


def conv_multi_text(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """SH, LO, UC: Specific Character Set text, ``\\`` splits values."""
    parts = [v.rstrip("\x00 ") for v in cs.text(raw).split("\\")]
    if len(parts) == 1 and not parts[0]:
        return None
    return [v or None for v in parts]


def conv_single_text(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """ST, LT, UT: one value, backslash is an ordinary character."""
    s = cs.text(raw).rstrip("\x00 ")
    return [s] if s else None


def _finite(x: float) -> float | str:
    # JSON has no NaN/Infinity: keep them as the strings JavaScript would print.
    if math.isfinite(x):
        return x
    return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")


def _ds(part: str) -> float | str | None:
    p = part.strip()
    if not p:
        return None
    try:
        x = float(p)
    except ValueError:
        return part
    return x if math.isfinite(x) else part


_INF, _NINF = math.inf, -math.inf


def conv_ds(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """DS: decimal strings as JSON numbers; an unparseable part stays a string."""
    s = raw.decode("latin-1").strip().rstrip(" \x00")
    if not s:
        return None
    parts = s.split("\\")
    # Fast path for the usual all-numeric value (contour data has thousands):
    # without an "n" there is no NaN/Infinity spelling, and overflow shows as inf.
    if "n" not in s and "N" not in s:
        try:
            vals: list[Any] = [float(p) for p in parts]
        except ValueError:
            pass
        else:
            if _INF not in vals and _NINF not in vals:
                return vals
    return [_ds(p) for p in parts]


# Possessive quantifiers (Python 3.11+): no part of a JSON number can be given
# back to match otherwise, so backtracking only wastes time (1.5x faster on
# contour data; the regex was ~70% of reading an RT structure set).
_JSON_NUMBER = r" *+-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?[0-9]{1,2})?+ *+"
_JSON_NUMBERS = re.compile(rf"{_JSON_NUMBER}(?:\\{_JSON_NUMBER})*+")
#: DS values at least this long are candidates for :func:`ds_as_json_array`.
RAW_DS_MIN_BYTES = 512


def ds_as_json_array(raw: bytes) -> str | None:
    """A DS value as JSON array text, when every part is already a JSON number; else None.

    Long DS values (contour data, thousands of numbers) are copied into the
    JSON document as written instead of being parsed and printed again.
    """
    s = raw.decode("latin-1").rstrip(" \x00")
    if s and _JSON_NUMBERS.fullmatch(s):
        return "[" + s.replace("\\", ",") + "]"
    return None


def _is(part: str) -> int | str | None:
    p = part.strip()
    if not p:
        return None
    try:
        return int(p)
    except ValueError:
        pass
    try:
        x = float(p)
    except ValueError:
        return part
    # pydicom's IS accepts "2.0" (an integral float) and refuses "2.5".
    return int(x) if x.is_integer() else part


def conv_is(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """IS: integer strings as JSON numbers; an unparseable part stays a string."""
    s = raw.decode("latin-1").rstrip(" \x00")
    if not s:
        return None
    return [_is(p) for p in s.split("\\")]


def _pn_dict(comps: Sequence[str]) -> dict[str, str] | None:
    comps = list(comps)
    while comps and not comps[-1]:
        comps.pop()
    if not comps:
        return None
    out = {"Alphabetic": comps[0]}
    if len(comps) > 1:
        out["Ideographic"] = comps[1]
    if len(comps) > 2:
        out["Phonetic"] = comps[2]
    return out


def conv_pn(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """PN: each value as ``{"Alphabetic", "Ideographic", "Phonetic"}`` (PS3.18 F.2.2).

    Component groups are split on ``=``; groups after the last non-empty one are
    dropped, so ``"=".join(groups)`` equals ``str(pydicom PersonName)``.
    """
    stripped = raw.rstrip(b"\x00 ")
    if not stripped:
        return None
    text: str | None = None
    if len(cs.encodings) == 1 and ESC not in stripped:
        try:
            text = stripped.decode(cs.first)
        except (UnicodeError, LookupError):
            text = None
    if text is not None:
        return [_pn_dict(v.split("=")) for v in text.split("\\")]
    # Code extensions (ISO 2022) or undecodable bytes: let pydicom decode each
    # component group with its escape-sequence rules.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = convert_PN(stripped, cs.encodings)
        except Exception:  # noqa: BLE001 - pydicom re-encodes the name and can fail on malformed values
            return [_pn_dict(v.split("=")) for v in cs.lenient(stripped).split("\\")]
    names = [value] if isinstance(value, PersonName) else list(value)
    return [_pn_dict(n.components) for n in names]


def conv_at(raw: bytes, little: bool, cs: Charset) -> JsonValue:
    """AT: tags as 8 upper-hex strings (PS3.18 F.2.3); a ragged tail is ignored like pydicom."""
    n = len(raw) // 4
    if not n:
        return None
    fmt = ("<" if little else ">") + "HH" * n
    v = Struct(fmt).unpack_from(raw)
    return [f"{v[i]:04X}{v[i + 1]:04X}" for i in range(0, 2 * n, 2)]


_LUT_DESCRIPTOR_TAGS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})


def _numbers(code: str, is_float: bool) -> Converter:
    size = calcsize("=" + code)
    one_le = Struct("<" + code).unpack
    one_be = Struct(">" + code).unpack

    def conv(raw: bytes, little: bool, cs: Charset) -> JsonValue:
        n = len(raw)
        if n % size:
            raise ValueLengthError(f"{n} bytes is not a multiple of {size}")
        if n == size:
            vals = list((one_le if little else one_be)(raw))
        elif n == 0:
            return None
        else:
            vals = list(Struct(("<" if little else ">") + str(n // size) + code).unpack(raw))
        if is_float:
            return [_finite(x) for x in vals]
        return vals

    return conv


#: VR → converter for every VR whose value is not binary and not a sequence.
CONVERTERS: dict[str, Converter] = {
    "AE": conv_ae,
    "AS": conv_string,
    "CS": conv_string,
    "DA": conv_string,
    "DT": conv_string,
    "TM": conv_string,
    "UI": conv_ui,
    "UR": conv_ur,
    "DS": conv_ds,
    "IS": conv_is,
    "SH": conv_multi_text,
    "LO": conv_multi_text,
    "UC": conv_multi_text,
    "ST": conv_single_text,
    "LT": conv_single_text,
    "UT": conv_single_text,
    "PN": conv_pn,
    "AT": conv_at,
    "US": _numbers("H", False),
    "SS": _numbers("h", False),
    "UL": _numbers("L", False),
    "SL": _numbers("l", False),
    "UV": _numbers("Q", False),
    "SV": _numbers("q", False),
    "FL": _numbers("f", True),
    "FD": _numbers("d", True),
}


def fix_lut_descriptor(tag: int, value: JsonValue) -> JsonValue:
    """LUT Descriptor's first value is always unsigned (PS3.3 C.11.1.1), even when encoded SS."""
    if value and tag in _LUT_DESCRIPTOR_TAGS and isinstance(value[0], int) and value[0] < 0:
        value[0] += 65536
    return value
