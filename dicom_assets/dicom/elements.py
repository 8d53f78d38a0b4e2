"""The element walker: one buffer of DICOM data elements → the DICOM JSON model.

:class:`DatasetWalker` reads data elements (PS3.5 §7.1) from one contiguous
buffer in one byte order — explicit or implicit VR, sequences and items of
defined or undefined length (PS3.5 §7.5), encapsulated values (PS3.5 A.4) —
and writes each straight into the JSON model of PS3.18 Annex F:
``{"GGGGEEEE": {"vr": ..., "Value": [...]}}``, with
:mod:`dicom_assets.dicom.values` converting leaf values. Datasets are dicts
sorted by tag; sequence values are lists of such dicts.

Bulk data: Pixel Data (7FE0,0010), Float/Double Float Pixel Data and any
binary value (OB, OD, OF, OL, OV, OW, UN) longer than the threshold become
``{"vr", "BulkDataURI": "<uri>#<path>", "length": n}`` and their bytes are
never copied. The URI fragment is the element's path from the top dataset:
tags as 8 upper-hex digits and item indexes from 0, joined by ``/`` —
``file.dcm#7FE00010`` at top level, ``file.dcm#52009230/0/00289110/0/00181310``
inside the first item of nested sequences. ``length`` is the value length in
bytes; for encapsulated (undefined-length) Pixel Data it is the total length
of the fragments (every item after the Basic Offset Table). Smaller binary
values are ``InlineBinary`` base64.

Leniency mirrors pydicom 3 so both readers agree on which files are readable:
an explicit-VR element, dataset or item that is in fact implicit is read as
implicit (PS3.5 §6.2.2), ``UN`` with undefined length is a sequence, an
explicit ``UN`` of a known tag gets its dictionary VR, fewer than 8 trailing
bytes end a dataset, an Item Delimitation Item ends the dataset it is in.
Where pydicom silently returns short values or fails when it converts a
value, the walker raises :class:`DicomReadError`: ``Truncated`` for a value
longer than the bytes left or end of data inside an undefined-length value,
``InvalidElement`` for an unknown VR or a numeric value of impossible length;
over its :class:`~dicom_assets.dicom.budget.Budget` it raises ``TooDeep``
(nesting), ``TooLarge`` (elements visited, one decoded value) or ``Timeout``.
Messages carry tags, offsets and lengths only, never values.
"""

from __future__ import annotations

import mmap
import secrets
from base64 import b64encode
from struct import Struct
from typing import Any

from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from dicom_assets.dicom.budget import CHECK_EVERY, Budget
from dicom_assets.dicom.records import DicomReadError
from dicom_assets.dicom.values import (
    CONVERTERS,
    RAW_DS_MIN_BYTES,
    Charset,
    CharsetError,
    ValueLengthError,
    charset_for,
    ds_as_json_array,
    fix_lut_descriptor,
)
from dicom_assets.dicom.vr_lookup import AMBIGUOUS_VRS, implicit_vr, private_vr, public_vr

__all__ = ["Buffer", "DatasetWalker", "PIXEL_TAGS", "BINARY_VRS", "VR_BYTES", "looks_implicit", "tag_str"]

#: What the walker reads: file bytes, or a read-only memory map of a big file.
Buffer = bytes | mmap.mmap

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIM = 0xFFFEE00D
SEQ_DELIM = 0xFFFEE0DD
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: always bulk data.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_LONG_VRS = frozenset(str(v) for v in EXPLICIT_VR_LENGTH_32)
VR_BYTES = {v.encode(): v for v in (*CONVERTERS, *BINARY_VRS, "SQ")}
_SHORT_VR_BYTES = {b: v for b, v in VR_BYTES.items() if v not in _LONG_VRS}
_LONG_VR_BYTES = {b: v for b, v in VR_BYTES.items() if v in _LONG_VRS}
_TAGSTR: dict[int, str] = {}
_CACHE_MAX = 1 << 16


def tag_str(tag: int) -> str:
    """``0x00100010`` → ``"00100010"`` (memoised: tags repeat across files)."""
    s = _TAGSTR.get(tag)
    if s is None:
        s = f"{tag:08X}"
        if len(_TAGSTR) < _CACHE_MAX:  # corrupt files must not grow the cache without bound
            _TAGSTR[tag] = s
    return s


def looks_implicit(buf: Buffer, pos: int, limit: int, assumed: bool) -> bool:
    # PS3.5 VRs are two upper-case letters; anything else at bytes 4-5 of the
    # first element means the length field sits there (implicit VR).
    if limit - pos < 6:
        return assumed
    a, b = buf[pos + 4], buf[pos + 5]
    return not (0x40 < a < 0x5B and 0x40 < b < 0x5B)


def _err(cls: str, tag: int, pos: int, what: str) -> DicomReadError:
    return DicomReadError(cls, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos}: {what}")


class DatasetWalker:
    """Walks one contiguous buffer in one byte order.

    ``threshold`` is the bulk-data threshold in bytes, ``uri`` the bulk-data
    URI base, ``budget`` what the file may spend (nesting depth, elements
    visited, decoded value size, time: :mod:`dicom_assets.dicom.budget`).
    Long DS values that are already JSON numbers are not parsed: their
    ``"Value"`` is a placeholder (``raw_token`` + index into ``raw_values``)
    that :meth:`ParsedFile.to_json` swaps for the text.
    """

    def __init__(self, buf: Buffer, little: bool, threshold: int, uri: str, budget: Budget | None = None) -> None:
        e = "<" if little else ">"
        self.buf = buf
        self.budget = budget or Budget.start(None)
        self.little = little
        self.threshold = threshold
        self.uri = uri
        self.hdr_e = Struct(e + "HH2sH").unpack_from
        self.hdr_i = Struct(e + "HHL").unpack_from
        self.u32 = Struct(e + "L").unpack_from
        self.seq_delim = Struct(e + "HH").pack(0xFFFE, 0xE0DD)
        self.stack: list[dict[str, Any]] = []
        self.raw_token = ""
        self.raw_values: list[str] = []

    def _raw_placeholder(self, raw_json: str) -> str:
        # A private-use character plus a random token cannot occur in a decoded value.
        if not self.raw_token:
            self.raw_token = "\ue000" + secrets.token_hex(8) + ":"
        self.raw_values.append(raw_json)
        return f"{self.raw_token}{len(self.raw_values) - 1}"

    # -- datasets -----------------------------------------------------------
    def dataset(
        self,
        pos: int,
        end: int,
        limit: int,
        implicit: bool,
        cs: Charset,
        prefix: str,
        stop_group: int = -1,
        forced_cs: bool = False,
    ) -> tuple[dict[str, Any], int]:
        """Read elements from ``pos`` while ``pos < end`` (values may run to ``limit``).

        Ends early at an Item Delimitation Item (undefined-length item) or, with
        ``stop_group``, at the first tag of another group (file meta, command set).
        """
        buf, hdr_e, hdr_i, u32 = self.buf, self.hdr_e, self.hdr_i, self.u32
        little, threshold = self.little, self.threshold
        converters, short_vrs, long_vrs, binary_vrs = CONVERTERS, _SHORT_VR_BYTES, _LONG_VR_BYTES, BINARY_VRS
        tagstrs = _TAGSTR
        budget = self.budget
        max_value = budget.limits.max_value_bytes
        out: dict[str, Any] = {}
        self.stack.append(out)
        start, last, unsorted, ticks = pos, -1, False, 1
        try:
            while pos < end:
                ticks += 1
                if ticks >= CHECK_EVERY:
                    budget.spend(ticks)
                    ticks = 0
                if limit - pos < 8:
                    pos = limit
                    break
                if implicit:
                    group, elem, length = hdr_i(buf, pos)
                    vr = None
                    hdr = 8
                else:
                    group, elem, vrb, length = hdr_e(buf, pos)
                    if stop_group >= 0 and group != stop_group:
                        break  # what follows file meta may be deflated: never read its "VR"
                    vr = short_vrs.get(vrb)
                    hdr = 8
                    if vr is None:
                        vr = long_vrs.get(vrb)
                        if vr is not None:
                            if limit - pos < 12:
                                raise _err("Truncated", group << 16 | elem, pos, "element header cut short")
                            length = u32(buf, pos + 8)[0]
                            hdr = 12
                        elif b"AA" <= vrb <= b"ZZ":
                            raise _err("InvalidElement", group << 16 | elem, pos, "unknown VR")
                        else:
                            # A writer switched to implicit VR for this element.
                            group, elem, length = hdr_i(buf, pos)
                tag = group << 16 | elem
                if tag == ITEM_DELIM:
                    budget.spend(ticks)
                    return out, pos + 8
                if stop_group >= 0 and group != stop_group:
                    break
                ts = tagstrs.get(tag) or tag_str(tag)
                if tag <= last:
                    unsorted = True
                last = tag
                vpos = pos + hdr

                if length == UNDEFINED:
                    out[ts], pos = self._undefined(tag, ts, vr, vpos, limit, implicit, cs, prefix, out)
                    continue

                vend = vpos + length
                if vend > limit:
                    raise _err("Truncated", tag, pos, f"value declares {length} bytes, {limit - vpos} remain")
                pos = vend
                if vr is None or vr == "UN":
                    if vr is None:
                        vr = implicit_vr(tag, self._creator(tag, out) if group & 1 else None)
                    else:
                        vr = self._un_vr(tag, length, out)
                    if vr in AMBIGUOUS_VRS:
                        vr = self._ambiguous(tag, vr, False, implicit, out)
                if length > max_value and vr != "SQ" and tag not in PIXEL_TAGS:
                    if vr not in binary_vrs or length <= threshold:
                        budget.value(tag, vpos - hdr, length)

                conv = converters.get(vr)
                if vr == "DS" and length >= RAW_DS_MIN_BYTES:
                    raw_json = ds_as_json_array(buf[vpos:vend])
                    if raw_json is not None:
                        out[ts] = {"vr": "DS", "Value": self._raw_placeholder(raw_json)}
                        continue
                if conv is not None and (tag < 0x7FE00008 or tag not in PIXEL_TAGS):
                    try:
                        value = conv(buf[vpos:vend], little, cs)
                    except ValueLengthError as exc:
                        raise _err("InvalidElement", tag, vpos - hdr, f"VR {vr}: {exc}") from None
                    if tag == 0x00080005:
                        try:
                            new_cs = charset_for(value)
                        except CharsetError as exc:
                            raise _err("InvalidElement", tag, vpos - hdr, str(exc)) from None
                        if unsorted and not forced_cs and new_cs is not cs:
                            # Specific Character Set after other elements: it
                            # still governs the whole dataset, so read it again.
                            self.stack.pop()
                            budget.spend(ticks)
                            return self.dataset(start, end, limit, implicit, new_cs, prefix, stop_group, True)
                        if not forced_cs:
                            cs = new_cs
                    elif 0x00281101 <= tag <= 0x00283002:
                        value = fix_lut_descriptor(tag, value)
                    out[ts] = {"vr": vr, "Value": value} if value is not None else {"vr": vr}
                elif vr == "SQ":
                    items, _ = self.sequence(vpos, vend, vend, implicit, cs, f"{prefix}{ts}/")
                    out[ts] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                elif vr in binary_vrs or tag in PIXEL_TAGS:
                    if length == 0:
                        out[ts] = {"vr": vr}
                    elif length > threshold or tag in PIXEL_TAGS:
                        out[ts] = {"vr": vr, "BulkDataURI": f"{self.uri}#{prefix}{ts}", "length": length}
                    else:
                        out[ts] = {"vr": vr, "InlineBinary": b64encode(buf[vpos:vend]).decode("ascii")}
                else:
                    raise _err("InvalidElement", tag, vpos - hdr, f"no value representation for VR {vr!r}")
            budget.spend(ticks)
            if unsorted:
                out = dict(sorted(out.items()))
            return out, pos
        finally:
            if self.stack and self.stack[-1] is out:
                self.stack.pop()

    def sequence(
        self, pos: int, sq_end: int | None, limit: int, implicit: bool, cs: Charset, prefix: str
    ) -> tuple[list[dict[str, Any]], int]:
        """Read the items of a sequence value (``sq_end`` None: undefined length)."""
        buf, hdr_i = self.buf, self.hdr_i
        items: list[dict[str, Any]] = []
        self.budget.enter(pos)
        try:
            while sq_end is None or pos < sq_end:
                if limit - pos < 8:
                    raise DicomReadError("Truncated", f"sequence item header at offset {pos}: end of data")
                group, elem, length = hdr_i(buf, pos)
                pos += 8
                if (group << 16 | elem) == SEQ_DELIM:
                    break
                # Items of an explicit-VR sequence may be implicit (PS3.5 §6.2.2, UN sequences).
                item_implicit = implicit or looks_implicit(buf, pos, limit, implicit)
                item_prefix = f"{prefix}{len(items)}/"
                item_end = limit if length == UNDEFINED else pos + length
                ds, pos = self.dataset(pos, item_end, limit, item_implicit, cs, item_prefix)
                items.append(ds)
        finally:
            self.budget.depth -= 1
        return items, pos

    # -- helpers ------------------------------------------------------------
    def _undefined(
        self,
        tag: int,
        ts: str,
        vr: str | None,
        vpos: int,
        limit: int,
        implicit: bool,
        cs: Charset,
        prefix: str,
        out: dict[str, Any],
    ) -> tuple[dict[str, Any], int]:
        """An undefined-length element: a sequence, or an encapsulated value up to its delimiter."""
        if vr == "UN":
            vr = "SQ"  # PS3.5 §6.2.2: UN of undefined length is an implicit-VR sequence
        elif vr is None:
            dict_vr = public_vr(tag)
            if dict_vr == "SQ" or (
                dict_vr is None and limit - vpos >= 8 and self.hdr_i(self.buf, vpos)[0:2] == (0xFFFE, 0xE000)
            ):
                vr = "SQ"
        if vr == "SQ":
            items, pos = self.sequence(vpos, None, limit, implicit, cs, f"{prefix}{ts}/")
            return ({"vr": "SQ", "Value": items} if items else {"vr": "SQ"}), pos
        vend, pos, frag_len = self._skip_encapsulated(tag, vpos, limit)
        if vr is None:
            vr = implicit_vr(tag, self._creator(tag, out) if (tag >> 16) & 1 else None)
        if vr in AMBIGUOUS_VRS:
            vr = self._ambiguous(tag, vr, True, implicit, out)
        if vr in CONVERTERS and tag not in PIXEL_TAGS:
            # Not allowed by PS3.5 §7.1 but read by pydicom: a text or number value up to the delimiter.
            self.budget.value(tag, vpos, vend - vpos)
            try:
                value = CONVERTERS[vr](self.buf[vpos:vend], self.little, cs)
            except ValueLengthError as exc:
                raise _err("InvalidElement", tag, vpos, f"VR {vr}: {exc}") from None
            return ({"vr": vr, "Value": value} if value is not None else {"vr": vr}), pos
        if vr not in BINARY_VRS and tag not in PIXEL_TAGS:
            raise _err("InvalidElement", tag, vpos, f"no value representation for VR {vr!r}")
        if frag_len > self.threshold or tag in PIXEL_TAGS:
            return {"vr": vr, "BulkDataURI": f"{self.uri}#{prefix}{ts}", "length": frag_len}, pos
        if vend == vpos:
            return {"vr": vr}, pos
        self.budget.value(tag, vpos, vend - vpos)  # a Basic Offset Table is not in frag_len
        return {"vr": vr, "InlineBinary": b64encode(self.buf[vpos:vend]).decode("ascii")}, pos

    def _skip_encapsulated(self, tag: int, vpos: int, limit: int) -> tuple[int, int, int]:
        """Find the Sequence Delimitation Item after an encapsulated value (PS3.5 A.4).

        Returns (value end, position after the delimiter, total fragment length).
        Items are hopped by their lengths; when they do not chain, the delimiter
        is searched for byte-wise as pydicom does.
        """
        buf, hdr_i = self.buf, self.hdr_i
        p, total, first, ticks = vpos, 0, True, 0
        while limit - p >= 8:
            ticks += 1
            if ticks >= CHECK_EVERY:
                self.budget.spend(ticks)
                ticks = 0
            group, elem, length = hdr_i(buf, p)
            t = group << 16 | elem
            if t == SEQ_DELIM:
                return p, p + 8, total
            if t != ITEM or length == UNDEFINED or p + 8 + length > limit:
                break
            if not first:
                total += length
            first = False
            p += 8 + length
        idx = buf.find(self.seq_delim, vpos, limit)
        if idx < 0 or limit - idx < 8:
            raise _err("Truncated", tag, vpos, "end of data before the sequence delimiter of an undefined-length value")
        return idx, idx + 8, idx - vpos

    @staticmethod
    def _creator(tag: int, out: dict[str, Any]) -> str | None:
        elem = tag & 0xFFFF
        if not elem & 0xFF00:
            return None
        el = out.get(tag_str((tag & 0xFFFF0000) | (elem >> 8)))
        v = el.get("Value") if el else None
        return v[0] if v and isinstance(v[0], str) else None

    def _un_vr(self, tag: int, length: int, out: dict[str, Any]) -> str:
        # An explicit UN whose tag is known gets its dictionary VR, as pydicom
        # does (config.replace_un_with_known_vr), so both read the same value.
        if (tag >> 16) & 1:
            return private_vr(tag, self._creator(tag, out))
        if length < 0xFFFF:
            return public_vr(tag) or "UN"
        return "UN"

    def _ambiguous(self, tag: int, vr: str, undefined: bool, implicit: bool, out: dict[str, Any]) -> str:
        """Resolve ``US or SS``-style dictionary VRs (PS3.5 A.1, as pydicom's writer does)."""

        def first(key: str) -> Any:
            for ds in (out, *reversed(self.stack)):
                el = ds.get(key)
                v = el.get("Value") if el else None
                if v:
                    return v[0]
            return None

        if tag == 0x7FE00010 or vr == "OB or OW":
            if undefined:
                return "OB"
            if implicit:
                return "OW"
            bits = first("00280100" if tag == 0x7FE00010 else "54000110")
            return "OB" if isinstance(bits, int) and bits <= 8 else "OW"
        if tag == 0x00283006:
            desc = out.get("00283002", {}).get("Value")
            return "US" if desc and desc[0] == 1 else "OW"
        if vr == "US or SS":
            return "SS" if first("00280103") == 1 else "US"
        return "OW"
