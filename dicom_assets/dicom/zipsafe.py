"""Safe ZIP extraction for dropped archives (SPEC §3.1, §6).

A ZIP is hostile until proven otherwise. Before any byte is decompressed the
central directory is checked against :class:`ZipLimits` (member count, declared
sizes, compression ratio, encryption, compression method, member names that
would escape the target); while decompressing, real byte counts are held to the
same budget, so a header that lies about sizes cannot get past it. Nested ZIPs
(recognised by content) are opened from the staging folder and checked the
same way, down to ``max_depth`` levels.

Members are written only into the caller's staging folder under generated
names (``m000001``…); their own names are never used as paths, so a ZIP cannot
write anywhere else even if a check were missed. Anything wrong with the
archive raises :class:`ZipRefused` naming an ``error_class`` and a message that
carries sizes and member names only, never content.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Local file header, or the end record of an empty archive.
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
#: Below this size a high compression ratio is harmless (and common: blank
#: images, padded headers), so ratio limits apply only above it.
RATIO_FLOOR_BYTES = 1 << 20
#: Only these methods are accepted: zipfile decompresses them in bounded steps.
#: Its bzip2 and LZMA readers inflate a whole compressed chunk at once, which a
#: bomb can turn into gigabytes of memory, so those archives are refused.
SAFE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")

DICOM = "dicom"
NOT_DICOM = "not_dicom"  # named .dcm but not DICOM: kept, goes to Failed
SKIPPED = "skipped"  # neither DICOM, nor .dcm, nor a ZIP: not written


@dataclass(frozen=True)
class ZipLimits:
    """Limits for one dropped archive, nested archives included (config, SPEC §9)."""

    max_zip_bytes: int = 8 * 1024**3
    max_uncompressed_bytes: int = 32 * 1024**3
    max_ratio: float = 200.0
    max_members: int = 100_000
    max_depth: int = 4
    max_file_bytes: int = 8 * 1024**3

    @classmethod
    def from_settings(cls, settings: Any) -> ZipLimits:
        return cls(
            max_zip_bytes=settings.max_zip_bytes,
            max_uncompressed_bytes=settings.max_zip_uncompressed_bytes,
            max_ratio=settings.max_zip_ratio,
            max_members=settings.max_zip_members,
            max_depth=settings.max_zip_depth,
            max_file_bytes=settings.max_file_bytes,
        )


class ZipRefused(Exception):
    """The archive as a whole is refused; ``error_class`` is a stable short code."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message


@dataclass(frozen=True)
class ExtractedMember:
    """One member written to staging (or skipped).

    ``chain`` names the member from the outer archive inwards, e.g.
    ``("inner.zip", "a/b.dcm")``; ``mtime`` is POSIX seconds from the member's
    extended-timestamp field, else its DOS date read as UTC, else ``None``.
    """

    staged_path: Path | None
    chain: tuple[str, ...]
    kind: str
    size: int
    sha256: str | None
    mtime: float | None

    @property
    def basename(self) -> str:
        return self.chain[-1].replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


@dataclass
class _Budget:
    limits: ZipLimits
    outer_size: int = 0
    members: int = 0
    declared: int = 0
    actual: int = 0
    seq: int = 0
    out: list[ExtractedMember] = field(default_factory=list)
    salvage: bool = False
    corrupt: list[tuple[tuple[str, ...], str]] = field(default_factory=list)


def is_zip_magic(head: bytes) -> bool:
    """True when ``head`` starts like a ZIP archive (by content, whatever the name)."""
    return head[:4] in ZIP_MAGICS


def member_name_problem(name: str) -> str | None:
    """Why a member name could escape the extraction folder, or ``None`` when it cannot."""
    if "\x00" in name:
        return "member name contains a NUL byte"
    norm = name.replace("\\", "/")
    if norm.startswith("/"):
        return "absolute member name"
    if _DRIVE.match(norm):
        return "member name with a drive letter"
    if any(part == ".." for part in norm.split("/")):
        return "member name with '..'"
    return None


def member_mtime(info: zipfile.ZipInfo) -> float | None:
    """Member modification time: extended timestamp (0x5455, UTC) first, else DOS time as UTC."""
    extra = info.extra
    i = 0
    while i + 4 <= len(extra):
        tag = int.from_bytes(extra[i : i + 2], "little")
        size = int.from_bytes(extra[i + 2 : i + 4], "little")
        body = extra[i + 4 : i + 4 + size]
        if tag == 0x5455 and len(body) >= 5 and body[0] & 1:
            return float(int.from_bytes(body[1:5], "little", signed=True))
        i += 4 + size
    try:
        y, mo, d, h, mi, s = info.date_time
        if not (1 <= mo <= 12 and 1 <= d <= 31):
            return None
        return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))
    except (TypeError, ValueError, OverflowError):
        return None


def _check_directory(infos: list[zipfile.ZipInfo], archive_size: int, label: str, budget: _Budget) -> None:
    lim = budget.limits
    budget.members += len(infos)
    if budget.members > lim.max_members:
        raise ZipRefused("ZipTooManyMembers", f"{label}: more than {lim.max_members} members")
    total = 0
    for info in infos:
        problem = member_name_problem(info.filename)
        if problem:
            raise ZipRefused("ZipSlip", f"{label}: {problem}: {info.filename!r}")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise ZipRefused("ZipEncrypted", f"{label}: encrypted member {info.filename!r}")
        if info.compress_type not in SAFE_METHODS:
            names: dict[int, str] = getattr(zipfile, "compressor_names", {})
            method = names.get(info.compress_type, str(info.compress_type))
            raise ZipRefused("ZipUnsupported", f"{label}: member {info.filename!r} uses compression '{method}'")
        if info.file_size > lim.max_file_bytes:
            raise ZipRefused("TooLarge", f"{label}: member {info.filename!r} is {info.file_size} bytes")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR_BYTES and ratio > lim.max_ratio:
            raise ZipRefused("ZipBomb", f"{label}: member {info.filename!r} expands {ratio:.0f}x")
        total += info.file_size
    budget.declared += total
    if budget.declared > lim.max_uncompressed_bytes:
        raise ZipRefused("ZipBomb", f"{label}: more than {lim.max_uncompressed_bytes} bytes uncompressed")
    overall = total / max(archive_size, 1)
    if total > RATIO_FLOOR_BYTES and overall > lim.max_ratio:
        raise ZipRefused("ZipBomb", f"{label}: archive expands {overall:.0f}x")
    # Nested archives of many small, highly compressed members stay under the
    # per-archive floor one by one; held against the outer archive they do not.
    cumulative = budget.declared / max(budget.outer_size, 1)
    if budget.declared > RATIO_FLOOR_BYTES and cumulative > lim.max_ratio:
        raise ZipRefused("ZipBomb", f"{label}: nested archives expand {cumulative:.0f}x")


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, RuntimeError, NotImplementedError)


def _reason(exc: BaseException) -> str:
    """zipfile/zlib error texts name members and offsets, never content."""
    text = str(exc).strip() or type(exc).__name__
    return text[:200]


class CorruptMember(ZipRefused):
    """One member's data cannot be read back (CRC or inflate error); the directory is sound."""


def _corrupt(label: str, info: zipfile.ZipInfo, exc: BaseException) -> ZipRefused:
    return CorruptMember("CorruptZip", f"{label}: member {info.filename!r}: {_reason(exc)}")


def _guarded_read(src: Any, n: int, label: str, info: zipfile.ZipInfo) -> bytes:
    """Read from a member; decoding/CRC errors mean a corrupt archive."""
    try:
        return bytes(src.read(n))
    except _READ_ERRORS as exc:
        raise _corrupt(label, info, exc) from None
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error, not bz2/lzma data errors
            raise
        raise _corrupt(label, info, exc) from None


def _write_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    staging: Path,
    budget: _Budget,
    label: str,
    is_dicom: Callable[[bytes], bool],
    head_bytes: int,
) -> tuple[Path | None, str, int, str | None, bool]:
    """Stream one member: classify it from its head, write it to staging unless skipped.

    Returns ``(staged_path, kind, size, sha256, is_zip)``. Read-side errors mean
    a corrupt archive; write-side ``OSError`` (disk full) propagates unchanged.
    Skipped members are still read to the end so a CRC error anywhere fails the ZIP.
    """
    lim = budget.limits
    h = hashlib.sha256()
    try:
        src = zf.open(info)
    except _READ_ERRORS as exc:
        raise _corrupt(label, info, exc) from None
    fd: int | None = None
    staged: Path | None = None
    with src:
        chunk = _guarded_read(src, head_bytes, label, info)
        nested = is_zip_magic(chunk)
        if nested or is_dicom(chunk):
            kind = DICOM
        elif info.filename.lower().endswith(".dcm"):
            kind = NOT_DICOM
        else:
            kind = SKIPPED
        size = 0
        try:
            if kind != SKIPPED:
                budget.seq += 1
                staged = staging / f"m{budget.seq:06d}"
                fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            while chunk:
                size += len(chunk)
                budget.actual += len(chunk)
                if size > info.file_size or budget.actual > lim.max_uncompressed_bytes:
                    raise ZipRefused("ZipBomb", f"{label}: member {info.filename!r} inflates past its declared size")
                h.update(chunk)
                if fd is not None:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                chunk = _guarded_read(src, CHUNK, label, info)
        finally:
            if fd is not None:
                os.close(fd)
    return staged, kind, size, h.hexdigest() if staged is not None else None, nested


def _extract(
    zip_path: Path,
    chain: tuple[str, ...],
    staging: Path,
    budget: _Budget,
    depth: int,
    is_dicom: Callable[[bytes], bool],
    head_bytes: int,
    label: str,
) -> None:
    lim = budget.limits
    if depth > lim.max_depth:
        raise ZipRefused("ZipTooDeep", f"{label}: ZIPs nested more than {lim.max_depth} deep")
    archive_size = os.stat(zip_path).st_size
    if archive_size > lim.max_zip_bytes:
        raise ZipRefused("ZipTooLarge", f"{label}: {archive_size} bytes, limit {lim.max_zip_bytes}")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise ZipRefused("CorruptZip", f"{label}: not a readable ZIP ({_reason(exc)})") from None
    with zf:
        infos = zf.infolist()
        _check_directory(infos, archive_size, label, budget)
        for info in infos:
            if info.is_dir():
                continue
            seq_before = budget.seq
            try:
                staged, kind, size, sha, nested = _write_member(zf, info, staging, budget, label, is_dicom, head_bytes)
            except CorruptMember as exc:
                if not budget.salvage:
                    raise
                # A bad member must not cost the good ones: they are kept, the
                # broken one is reported and the archive itself goes to Failed.
                if budget.seq != seq_before:
                    (staging / f"m{budget.seq:06d}").unlink(missing_ok=True)
                budget.corrupt.append((chain + (info.filename,), exc.message))
                continue
            member_chain = chain + (info.filename,)
            if nested and staged is not None:
                inner_label = f"{label}!{info.filename}"
                _extract(staged, member_chain, staging, budget, depth + 1, is_dicom, head_bytes, inner_label)
                os.unlink(staged)  # its members are staged now; the inner archive itself is not kept
                continue
            budget.out.append(ExtractedMember(staged, member_chain, kind, size, sha, member_mtime(info)))


def extract_zip_safely(
    zip_path: Path,
    staging: Path,
    limits: ZipLimits,
    is_dicom: Callable[[bytes], bool],
    *,
    head_bytes: int = 4096,
    label: str = "zip",
    corrupt_members: list[tuple[tuple[str, ...], str]] | None = None,
) -> list[ExtractedMember]:
    """Extract every DICOM (and ``.dcm``-named) member of ``zip_path`` into ``staging``.

    Nested archives are recognised by content and extracted recursively; their
    members appear with a longer ``chain``. Skipped members (not DICOM, not
    ``.dcm``, not a ZIP) are listed with ``staged_path=None``. Raises
    :class:`ZipRefused` for corrupt, encrypted, oversized, too deeply nested
    archives, bombs and escaping names; the caller then discards ``staging``.
    ``staging`` must exist and be empty; written files are not fsynced (the
    caller syncs them together, before relying on them).

    With ``corrupt_members`` (a list), a member whose data fails its CRC or
    cannot be inflated is appended there as ``(chain, message)`` and the other
    members are still extracted; without it such a member refuses the ZIP.
    Security refusals (names escaping, bombs, encryption) always refuse it.
    """
    budget = _Budget(limits, outer_size=os.stat(zip_path).st_size, salvage=corrupt_members is not None)
    _extract(Path(zip_path), (), Path(staging), budget, 0, is_dicom, head_bytes, label)
    if corrupt_members is not None:
        corrupt_members.extend(budget.corrupt)
    return budget.out


__all__ = [
    "ZipLimits",
    "ZipRefused",
    "CorruptMember",
    "ExtractedMember",
    "is_zip_magic",
    "member_name_problem",
    "member_mtime",
    "extract_zip_safely",
    "ZIP_MAGICS",
    "RATIO_FLOOR_BYTES",
    "DICOM",
    "NOT_DICOM",
    "SKIPPED",
]
