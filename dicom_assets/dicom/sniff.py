"""Is this file DICOM? Decided from its first bytes, whatever its name (SPEC §2).

A Part 10 file has ``DICM`` at offset 128 (PS3.10 §7.1). Older exports and
some archives hold a bare dataset without preamble: it starts with a low
group tag — command (0000), file meta (0002), directory (0004) or identifying
(0008) — followed by a two-letter VR (explicit VR, either byte order) or a
sane 32-bit length (implicit VR little endian). Text, gzip, ZIP and other
formats start with printable or magic bytes that never read as such a tag.
"""

from __future__ import annotations

from struct import unpack_from

__all__ = ["looks_like_dicom", "SNIFF_BYTES"]

#: How many leading bytes callers should pass to :func:`looks_like_dicom`.
SNIFF_BYTES = 512

_VRS = frozenset(
    v.encode()
    for v in (
        "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    ).split()
)
_LONG_VRS = frozenset(v.encode() for v in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: First groups a bare dataset plausibly starts with.
_FIRST_GROUPS = frozenset({0x0000, 0x0002, 0x0004, 0x0008})
#: With an explicit VR the evidence is stronger, so later groups are allowed too.
_FIRST_GROUPS_EXPLICIT = _FIRST_GROUPS | {0x0010, 0x0018, 0x0020, 0x0028}
_MAX_IMPLICIT_FIRST_LENGTH = 1 << 24


def _next_tag_ok(head: bytes, pos: int, group: int, endian: str) -> bool:
    """Whether the element after the first one (if within ``head``) continues the dataset."""
    if len(head) - pos < 4:
        return True
    next_group: int = unpack_from(endian + "H", head, pos)[0]
    return next_group >= group and (next_group <= 0x7FE0 or next_group == 0xFFFE)


def _explicit(head: bytes, endian: str) -> bool:
    group, _elem, vr = unpack_from(endian + "HH2s", head, 0)
    if group not in _FIRST_GROUPS_EXPLICIT or vr not in _VRS:
        return False
    if vr in _LONG_VRS:
        if len(head) < 12:
            return True
        length = unpack_from(endian + "L", head, 8)[0]
        start = 12
    else:
        length = unpack_from(endian + "H", head, 6)[0]
        start = 8
    if length == 0xFFFFFFFF:
        return True
    return _next_tag_ok(head, start + length, group, endian)


def _implicit(head: bytes) -> bool:
    group, _elem, length = unpack_from("<HHL", head, 0)
    if group not in _FIRST_GROUPS:
        return False
    if length == 0xFFFFFFFF:
        return True
    if length > _MAX_IMPLICIT_FIRST_LENGTH:
        return False
    return _next_tag_ok(head, 8 + length, group, "<")


def looks_like_dicom(head: bytes) -> bool:
    """True when ``head`` (a file's first ~512 bytes) starts a DICOM file or bare dataset.

    ``DICM`` at offset 128 → True. Otherwise the first element must read as a
    tag of group 0000/0002/0004/0008 (little endian; explicit VR also big
    endian and groups 0010-0028) with a known VR or, implicit, a length under
    16 MiB, and the next tag, when within ``head``, must not go back a group.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    return _explicit(head, "<") or _explicit(head, ">") or _implicit(head)
