"""Value Representation lookups for elements whose VR is not in the file.

Implicit VR transfer syntaxes (PS3.5 §7.1.3) and explicit ``UN`` elements carry
no usable VR, so it comes from the data dictionary: PS3.6 for public tags (with
its repeating groups), pydicom's private dictionary keyed by the Private Creator
for private tags (PS3.5 §7.8.1), ``LO`` for Private Creator elements and ``UL``
for group lengths. The rules are pydicom 3's (``hooks.raw_element_vr``) so both
readers agree on every value; lookups are memoised per process.
"""

from __future__ import annotations

from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary
from pydicom.datadict import mask_match, private_dictionary_VR

__all__ = ["public_vr", "private_vr", "implicit_vr", "AMBIGUOUS_VRS"]

#: Dictionary VRs that depend on other attributes (PS3.5 Annex A.1 note, PS3.6).
AMBIGUOUS_VRS = frozenset({"OB or OW", "US or SS", "US or OW", "US or SS or OW"})

_PUBLIC: dict[int, str | None] = {}
_PRIVATE: dict[tuple[str, int], str] = {}
_CACHE_MAX = 1 << 16


def public_vr(tag: int) -> str | None:
    """PS3.6 VR of a public tag (repeating groups included), ``None`` when unknown."""
    try:
        return _PUBLIC[tag]
    except KeyError:
        pass
    vr: str | None = None
    entry = DicomDictionary.get(tag)
    if entry is not None:
        vr = entry[0]
    elif not (tag >> 16) & 1:
        mask = mask_match(tag)
        if mask:
            vr = RepeatersDictionary[mask][0]
    if len(_PUBLIC) < _CACHE_MAX:  # bounded: corrupt files produce arbitrary tags
        _PUBLIC[tag] = vr
    return vr


def private_vr(tag: int, creator: str | None) -> str:
    """VR of a private element: ``LO`` for its Private Creator, else the private dictionary's or ``UN``."""
    elem = tag & 0xFFFF
    if 0x0010 <= elem <= 0x00FF:
        return "LO"
    if not creator or not (elem & 0xFF00):
        return "UN"
    key = (creator, tag)
    vr = _PRIVATE.get(key)
    if vr is None:
        try:
            vr = private_dictionary_VR(tag, creator)
        except KeyError:
            vr = "UN"
        if len(_PRIVATE) < _CACHE_MAX:
            _PRIVATE[key] = vr
    return vr


def implicit_vr(tag: int, creator: str | None) -> str:
    """VR for an element read without one; ``creator`` is its block's Private Creator value."""
    vr = public_vr(tag)
    if vr is not None:
        return vr
    if (tag >> 16) & 1:
        return private_vr(tag, creator)
    return "UL" if not tag & 0xFFFF else "UN"
