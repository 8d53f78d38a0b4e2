"""DICOM Person Name (PN) → FHIR ``HumanName`` (PS3.5 §6.2.1).

A PN value has up to three component groups separated by ``=``: alphabetic, ideographic and
phonetic (PS3.5 §6.2.1.1–2); each group has up to five components separated by ``^``: family
name, given name, middle name, name prefix, name suffix. Trailing empty components and groups
may be omitted. The DICOM JSON model (PS3.18 F.2.2) carries the same groups as the keys
``Alphabetic``, ``Ideographic`` and ``Phonetic``, already decoded from the Specific Character
Set (0008,0005), so no character set handling is left to do here.

Each non-empty group becomes one HumanName: ``family``; ``given`` = [given, middle];
``prefix``; ``suffix``; ``text``. When a value has more than one group, every HumanName carries
the FHIR extension ``iso21090-EN-representation`` (``ABC`` / ``IDE`` / ``SYL``) that FHIR defines
for exactly this case (Japanese kanji / kana names). ``text`` is written given-first for the
alphabetic group ("Tarou Yamada") and family-first for ideographic and phonetic groups
("山田 太郎"), the order in which those scripts write names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicom_assets.fhir.codes import EN_REPRESENTATION_URL

_GROUP_KEYS = ("Alphabetic", "Ideographic", "Phonetic")
_REPRESENTATION = {"Alphabetic": "ABC", "Ideographic": "IDE", "Phonetic": "SYL"}


@dataclass(frozen=True)
class PersonNameGroup:
    """The five components of one PN component group (PS3.5 §6.2.1.1), empty strings when absent."""

    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""

    @classmethod
    def parse(cls, group: str) -> PersonNameGroup:
        parts = [part.strip() for part in group.split("^")][:5]
        parts += [""] * (5 - len(parts))
        return cls(*parts)

    def is_empty(self) -> bool:
        return not (self.family or self.given or self.middle or self.prefix or self.suffix)


def split_person_name(value: str | Mapping[str, Any] | None) -> dict[str, PersonNameGroup]:
    """A PN as a string (``A=I=P``) or a DICOM JSON model object → its non-empty groups by name.

    Only the first value of a multi-valued PN (``\\``-separated) is used: Patient's Name is VM 1.
    """
    if value is None:
        return {}
    groups: dict[str, str] = {}
    if isinstance(value, Mapping):
        for key in _GROUP_KEYS:
            raw = value.get(key)
            if isinstance(raw, str):
                groups[key] = raw
    else:
        first = value.split("\\", 1)[0]
        for key, raw in zip(_GROUP_KEYS, first.split("="), strict=False):
            groups[key] = raw
    parsed = {key: PersonNameGroup.parse(raw) for key, raw in groups.items()}
    return {key: group for key, group in parsed.items() if not group.is_empty()}


def _text(group: PersonNameGroup, *, family_first: bool) -> str:
    if family_first:
        parts = [group.prefix, group.family, group.given, group.middle, group.suffix]
    else:
        parts = [group.prefix, group.given, group.middle, group.family, group.suffix]
    return " ".join(part for part in parts if part)


def human_name(group: PersonNameGroup, *, family_first: bool = False) -> dict[str, Any]:
    """One PN component group → a FHIR HumanName (family, given, prefix, suffix, text)."""
    name: dict[str, Any] = {}
    if group.family:
        name["family"] = group.family
    given = [part for part in (group.given, group.middle) if part]
    if given:
        name["given"] = given
    if group.prefix:
        name["prefix"] = [group.prefix]
    if group.suffix:
        name["suffix"] = [group.suffix]
    name["text"] = _text(group, family_first=family_first)
    return name


def human_names(value: str | Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Patient's Name (0010,0010) → ``Patient.name``: one HumanName per non-empty component group.

    ``'Yamada^Tarou=山田^太郎=やまだ^たろう'`` gives three names: family ``Yamada`` / given
    ``Tarou`` (ABC), family ``山田`` / given ``太郎`` (IDE), family ``やまだ`` / given ``たろう`` (SYL).
    """
    groups = split_person_name(value)
    names: list[dict[str, Any]] = []
    for key, group in groups.items():
        name = human_name(group, family_first=key != "Alphabetic")
        if len(groups) > 1:
            name = {
                "extension": [{"url": EN_REPRESENTATION_URL, "valueCode": _REPRESENTATION[key]}],
                **name,
            }
        names.append(name)
    return names
