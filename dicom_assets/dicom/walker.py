"""Read a whole DICOM file into the DICOM JSON model, without pydicom objects.

:func:`walk` handles the file level — the 128-byte preamble and ``DICM``
prefix (PS3.10 §7.1, optional as for pydicom's ``force=True``), the file meta
group 0002 (explicit VR little endian), a command set group 0000, and the
transfer syntax (PS3.5 §10 and Annex A): implicit or explicit VR little
endian, explicit VR big endian, deflated explicit little endian (inflated in
memory), and every other syntax as explicit little endian with encapsulated
Pixel Data. Without file meta the encoding is guessed from the first element
as pydicom does. The elements themselves are read by
:class:`dicom_assets.dicom.elements.DatasetWalker` (bulk-data rules there).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from dicom_assets.dicom.budget import Budget
from dicom_assets.dicom.elements import VR_BYTES, Buffer, DatasetWalker, looks_implicit
from dicom_assets.dicom.records import DicomReadError
from dicom_assets.dicom.sniff import looks_like_dicom
from dicom_assets.dicom.values import DEFAULT_CHARSET

__all__ = ["Buffer", "ParsedFile", "walk"]

_std_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _dumps(obj: Any) -> str:
    """Compact JSON text of the model; orjson (a tenth of the stdlib's time), the stdlib where it refuses.

    orjson refuses integers past 64 bits and strings holding lone surrogates;
    the stdlib writes both, so those rare models come out as before. The two
    differ only in how some floats are spelled (``1e-5`` / ``1e-05``), never in value.
    """
    try:
        return orjson.dumps(obj).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _std_dumps(obj)

#: A deflated dataset never inflates past this, whatever the budget allows
#: (a deflate bomb is refused as ``TooLarge``; see also ``ReadLimits.max_inflate_ratio``).
MAX_INFLATED_BYTES = 1 << 30

_TS_IMPLICIT_LE = "1.2.840.10008.1.2"
_TS_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_TS_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_TS_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class ParsedFile:
    """One file read by :func:`walk`.

    ``elements`` is the whole DICOM JSON model (command set, file meta group
    0002 and dataset, sorted by tag); ``dataset`` holds the top-level dataset
    elements only; ``transfer_syntax`` is (0002,0010) or None without file meta.
    """

    elements: dict[str, Any]
    dataset: dict[str, Any]
    meta: dict[str, Any]
    transfer_syntax: str | None
    has_pixel_data: bool
    has_preamble: bool
    #: Long DS values kept as JSON text: ``"Value"`` holds ``raw_token + index``.
    raw_token: str = ""
    raw_values: tuple[str, ...] = ()

    def to_json(self) -> str:
        """``elements`` as compact JSON text (keys already sorted by tag)."""
        text = _dumps(self.elements)
        if not self.raw_values:
            return text
        values = self.raw_values
        pattern = re.compile('"' + re.escape(self.raw_token) + r'([0-9]+)"')
        return pattern.sub(lambda m: values[int(m.group(1))], text)

    def model(self) -> dict[str, Any]:
        """The JSON model as plain Python values (long DS values resolved)."""
        result: dict[str, Any] = json.loads(self.to_json()) if self.raw_values else self.elements
        return result


def _first_str(ds: dict[str, Any], key: str) -> str | None:
    el = ds.get(key)
    v = el.get("Value") if el else None
    return v[0] if v and isinstance(v[0], str) else None


def _inflate(deflated: memoryview, offset: int, budget: Budget) -> bytes:
    """The Deflated Explicit VR Little Endian dataset (PS3.5 A.5), bounded against deflate bombs.

    The output is capped before inflating (``max_inflated_bytes`` and
    ``max_inflate_ratio`` times the deflated size), so a bomb costs at most
    the cap in memory and one bounded ``zlib`` call in time.
    """
    cap = min(MAX_INFLATED_BYTES, budget.inflate_limit(len(deflated)))
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        buf = d.decompress(deflated, cap)
    except zlib.error:
        raise DicomReadError("InvalidElement", f"deflated dataset at offset {offset} does not inflate") from None
    if not d.eof and (d.unconsumed_tail or len(buf) >= cap):
        raise DicomReadError(
            "TooLarge",
            f"deflated dataset at offset {offset} ({len(deflated)} bytes) inflates past {cap} bytes "
            f"(max_inflated_bytes, max_inflate_ratio)",
        )
    if not d.eof:
        raise DicomReadError("Truncated", f"deflated dataset at offset {offset} ends inside its deflate stream")
    return buf


def walk(
    data: Buffer, *, bulk_data_uri: str, bulk_data_threshold: int = 1024, budget: Budget | None = None
) -> ParsedFile:
    """Parse a DICOM file's bytes into the JSON model (see module docstring for the rules).

    ``budget`` (default: :class:`~dicom_assets.dicom.budget.ReadLimits`
    defaults, clock started now) bounds nesting, work, value sizes, inflation
    and time. Raises :class:`DicomReadError` (``NotDicom``, ``Truncated``,
    ``InvalidElement``; ``TooDeep``, ``TooLarge``, ``Timeout`` over budget).
    """
    budget = budget or Budget.start(None)
    n = len(data)
    has_preamble = n >= 132 and data[128:132] == b"DICM"
    if has_preamble:
        pos = 132
    elif looks_like_dicom(data[:512]):
        pos = 0
    else:
        raise DicomReadError("NotDicom", f"no DICM prefix at offset 128 and no dataset at offset 0 ({n} bytes)")

    le = DatasetWalker(data, True, bulk_data_threshold, bulk_data_uri, budget)
    meta: dict[str, Any] = {}
    command: dict[str, Any] = {}
    if n - pos >= 8 and data[pos : pos + 2] == b"\x02\x00":
        meta, pos = le.dataset(pos, n, n, looks_implicit(data, pos, n, False), DEFAULT_CHARSET, "", stop_group=2)
    if n - pos >= 8 and data[pos : pos + 2] == b"\x00\x00":
        command, pos = le.dataset(pos, n, n, looks_implicit(data, pos, n, True), DEFAULT_CHARSET, "", stop_group=0)

    ts = _first_str(meta, "00020010")
    implicit, little, walker, buf = True, True, le, data
    if pos >= n:
        pass
    elif ts is None:
        # No transfer syntax: guess from the first element, as pydicom does.
        if n - pos >= 6 and data[pos + 4 : pos + 6] in VR_BYTES:
            implicit = False
            little = int.from_bytes(data[pos : pos + 2], "little") < 1024
    elif ts == _TS_IMPLICIT_LE:
        pass
    elif ts == _TS_EXPLICIT_BE:
        implicit, little = False, False
    elif ts == _TS_DEFLATED:
        with memoryview(data) as whole, whole[pos:] as deflated:  # no copy of a mapped file
            buf = _inflate(deflated, pos, budget)
        implicit, pos = False, 0
    else:
        implicit = False  # every other transfer syntax is explicit VR little endian (PS3.5 A.4)

    if buf is not data or not little:
        walker = DatasetWalker(buf, little, bulk_data_threshold, bulk_data_uri, budget)
    end = len(buf)
    implicit = looks_implicit(buf, pos, end, implicit)
    dataset, _ = walker.dataset(pos, end, end, implicit, DEFAULT_CHARSET, "")
    if command:
        dataset = dict(sorted({**dataset, **command}.items()))

    if meta and dataset and next(iter(dataset)) <= next(reversed(meta)):
        elements = dict(sorted({**meta, **dataset}.items()))
    else:
        elements = {**meta, **dataset} if meta else dataset
    return ParsedFile(
        elements=elements,
        dataset=dataset,
        meta=meta,
        transfer_syntax=ts,
        has_pixel_data="7FE00010" in dataset,
        has_preamble=has_preamble,
        raw_token=walker.raw_token,
        raw_values=tuple(walker.raw_values),
    )
