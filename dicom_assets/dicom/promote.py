"""Promoted columns of bronze ``dicomimagingmetastore`` from the DICOM JSON model (SPEC §3.2).

Every column in ``FABRIC_PROMOTED``/``EXTRA_PROMOTED`` (lake/schemas.py) is read
from the top-level dataset by its DICOM keyword's tag. Normalisation, as Fabric
does it and never raising:

- PN → the Alphabetic component group (PS3.5 §6.2.1.1), e.g. ``Doe^Jane``.
- DA → ``YYYY-MM-DD`` (also from the ACR-NEMA form ``YYYY.MM.DD``).
- TM → ``HH:MM:SS[.ffffff]``. PS3.5 §6.2 allows ``HH``, ``HHMM``, ``HHMMSS`` and
  ``HHMMSS.F{1-6}``; omitted minutes/seconds are written as ``00`` so every
  value is a valid SQL time, the fraction keeps its given digits (1-6).
  The ACR-NEMA form ``HH:MM:SS`` is accepted.
- Anything that does not match is kept raw (string columns) or null (int columns).
- Multi-valued strings are joined with ``\\`` as they are encoded (``imageType``:
  ``ORIGINAL\\PRIMARY\\AXIAL``); ``modalitiesInStudy`` is the list and
  ``modalitiesInStudy_string`` its JSON array text (``["CT","SR"]``), like every
  other ``*_string`` column of the lake.
- ``issuerOfAccessionNumber``: (0008,0051) item 1's (0040,0031) Local Namespace
  Entity ID, else its (0040,0032) Universal Entity ID.
- ``numberOfFrames``: (0028,0008) when it is an integer, else 1 when the file
  has (7FE0,0010) Pixel Data, else 0.
- ``transferSyntaxUid``: (0002,0010), null without file meta.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydicom.datadict import tag_for_keyword

from dicom_assets.lake.schemas import EXTRA_PROMOTED, FABRIC_PROMOTED

__all__ = ["promoted_columns", "format_da", "format_tm", "DICOMDIR_SOP_CLASS"]

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

_SPECIAL = {"modalitiesInStudy", "issuerOfAccessionNumber", "numberOfFrames", "transferSyntaxUid", "imageType"}
_DA_RE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TM_RE = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")


def _columns() -> list[tuple[str, str, bool]]:
    cols = []
    for name, keyword, typ in (*FABRIC_PROMOTED, *EXTRA_PROMOTED):
        if name in _SPECIAL:
            continue
        tag = tag_for_keyword(keyword)
        if tag is None:  # pragma: no cover - schemas name only PS3.6 keywords
            raise ValueError(f"unknown DICOM keyword {keyword}")
        cols.append((name, f"{tag:08X}", str(typ) == "int64"))
    return cols


#: (column, 8-hex tag, is_int) for the columns read straight from one tag.
_COLUMNS = _columns()


def format_da(value: str) -> str:
    """DA ``YYYYMMDD`` → ``YYYY-MM-DD``; other text is returned unchanged."""
    m = _DA_RE.fullmatch(value)
    if not m:
        return value
    y, mo, d = m.groups()
    if not ("01" <= mo <= "12" and "01" <= d <= "31"):
        return value
    return f"{y}-{mo}-{d}"


def format_tm(value: str) -> str:
    """TM ``HHMMSS.ffffff`` (or a shorter prefix) → ``HH:MM:SS[.ffffff]``; bad text unchanged."""
    m = _TM_RE.fullmatch(value.strip())
    if not m:
        return value
    hh, mm, ss, frac = m.groups()
    mm, ss = mm or "00", ss or "00"
    # 60 is allowed for leap seconds (PS3.5 §6.2 TM).
    if not (hh <= "23" and mm <= "59" and ss <= "60"):
        return value
    out = f"{hh}:{mm}:{ss}"
    return f"{out}.{frac}" if frac else out


def _text(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("Alphabetic", ""))
    return "" if v is None else str(v)


def _string(el: dict[str, Any]) -> str | None:
    values = el.get("Value")
    if not values:
        return None
    vr = el.get("vr")
    parts = [_text(v) for v in values]
    if vr == "DA":
        parts = [format_da(p) for p in parts]
    elif vr == "TM":
        parts = [format_tm(p) for p in parts]
    s = "\\".join(parts)
    return s if s else None


def _int(el: dict[str, Any]) -> int | None:
    values = el.get("Value")
    if not values:
        return None
    v = values[0]
    return v if isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 else None


def _issuer(ds: dict[str, Any]) -> str | None:
    items = ds.get("00080051", {}).get("Value")
    if not items or not isinstance(items[0], dict):
        return None
    for key in ("00400031", "00400032"):
        el = items[0].get(key)
        if el:
            s = _string(el)
            if s:
                return s
    return None


def promoted_columns(dataset: dict[str, Any], meta: dict[str, Any], *, has_pixel_data: bool) -> dict[str, Any]:
    """Every promoted column (plus ``modalitiesInStudy_string``) of one file.

    ``dataset``/``meta`` are the top-level dataset and file meta in the JSON
    model. For a DICOMDIR (Media Storage SOP Class 1.2.840.10008.1.3.10) the
    SOP Class/Instance UIDs come from (0002,0002)/(0002,0003) when the
    dataset lacks them.
    """
    row: dict[str, Any] = {}
    for name, key, is_int in _COLUMNS:
        el = dataset.get(key)
        if el is None:
            row[name] = None
        else:
            row[name] = _int(el) if is_int else _string(el)

    modalities = dataset.get("00080061", {}).get("Value")
    mods = [str(m) for m in modalities if m] if modalities else None
    row["modalitiesInStudy"] = mods
    row["modalitiesInStudy_string"] = json.dumps(mods, ensure_ascii=False) if mods else None
    image_type = dataset.get("00080008")
    row["imageType"] = _string(image_type) if image_type else None
    row["issuerOfAccessionNumber"] = _issuer(dataset)
    frames = dataset.get("00280008")
    n_frames = _int(frames) if frames else None
    row["numberOfFrames"] = n_frames if n_frames is not None else (1 if has_pixel_data else 0)
    ts = meta.get("00020010", {}).get("Value")
    row["transferSyntaxUid"] = ts[0] if ts else None

    ms_class = meta.get("00020002", {}).get("Value")
    if ms_class and ms_class[0] == DICOMDIR_SOP_CLASS:
        ms_inst = meta.get("00020003", {}).get("Value")
        row["sopClassUid"] = row["sopClassUid"] or DICOMDIR_SOP_CLASS
        row["sopInstanceUid"] = row["sopInstanceUid"] or (ms_inst[0] if ms_inst else None)
    return row
