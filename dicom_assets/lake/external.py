"""External folders: bring-your-own storage read in place (SPEC §2).

``External/Imaging/DICOM/<ns>/<name>/**`` holds a user's own storage; ``<name>``
may itself be a symlink to storage elsewhere. Files there are read in place and
never moved, renamed, compressed or deleted. Symlinks *inside* a ``<name>``
root are never followed: one that resolves inside the root is redundant (its
target is walked anyway) and ignored; one that resolves outside is refused
with a failure record.

Read state lives in ``_state/external/<ns>/<name>.json``: for each file its
``(size, mtime_ns)`` when read and the partition day it was attributed to. A
file whose current ``(size, mtime_ns)`` matches is not read again; a new or
changed file is reported for the day of the run that discovers it (its first
sighting by a run) and becomes that day's once :func:`mark_external_read`
records it. Non-DICOM files are ignored; ``.dcm`` files that are not DICOM
get a failure record (no move) under ``Failed/<ns>/<day>/<name>/…``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_assets.config import Settings
from dicom_assets.dicom.sniff import SNIFF_BYTES, looks_like_dicom
from dicom_assets.lake import fileops
from dicom_assets.lake.failures import (
    FailedFile,
    check_day,
    error_json_for,
    error_record,
    record_failure,
    to_failed_file,
)
from dicom_assets.lake.paths import LakePaths

STAGE = "external"


@dataclass(frozen=True)
class ExternalEntry:
    """One External file version (``path`` as under External, links in ``<name>`` not resolved)."""

    path: str
    ns: str
    name: str
    rel: str
    size: int
    mtime_ns: int
    day: str
    failure: FailedFile | None = None

    @property
    def mtime(self) -> float:
        """POSIX seconds (``sourceModifiedAt``)."""
        return self.mtime_ns / 1e9

    @property
    def original_path(self) -> str:
        """``originalPath`` / ``filePath``: External files never move."""
        return fileops.display_path(self.path)

    @property
    def source_system(self) -> str:
        return self.ns


@dataclass(frozen=True)
class ExternalScan:
    """New or changed External files: ``files`` to read, ``failed`` refused ones."""

    files: list[ExternalEntry] = field(default_factory=list)
    failed: list[ExternalEntry] = field(default_factory=list)
    ignored: int = 0
    unsettled: int = 0


def _state_file(paths: LakePaths, ns: str, name: str) -> Path:
    return paths.state_dir / "external" / fileops.safe_component(ns) / (fileops.safe_component(name) + ".json")


def _load_state(paths: LakePaths, ns: str, name: str) -> dict[str, Any]:
    try:
        data = fileops.read_json(_state_file(paths, ns, name))
    except (FileNotFoundError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _roots(paths: LakePaths, settings: Settings) -> Iterator[tuple[str, str, Path]]:
    """``(ns, name, root)`` for every ``External/<ns>/<name>`` folder (``<name>`` may be a link)."""
    base = paths.external_root
    if not base.is_dir():
        return
    for ns_dir in sorted(base.iterdir()):
        if ns_dir.name.startswith(".") or ns_dir.is_symlink() or not ns_dir.is_dir():
            continue
        ns = fileops.safe_component(ns_dir.name)
        if settings.namespaces and ns not in settings.namespaces:
            continue
        for root in sorted(ns_dir.iterdir()):
            if not root.name.startswith(".") and root.is_dir():
                yield ns, root.name, root


def _inside(path: str, root_real: str) -> bool:
    return os.path.commonpath([path, root_real]) == root_real


def _walk(root: Path, root_real: str) -> Iterator[tuple[Path, os.stat_result, str]]:
    """``(path, lstat, kind)`` with kind ``file``, ``outside`` (link leaving the root) or ``skip``."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        p = root / e.name
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            yield p, st, ("skip" if _inside(os.path.realpath(p), root_real) else "outside")
        elif stat.S_ISDIR(st.st_mode):
            yield from _walk(p, root_real)
        elif stat.S_ISREG(st.st_mode):
            yield p, st, "file"
        else:
            yield p, st, "skip"


def _failure_target(name: str, rel: str) -> Path:
    parts = [fileops.safe_component(name)] + [fileops.safe_component(c) for c in rel.split("/")]
    parts[-1] = fileops.fit_name(parts[-1])
    return Path(*parts)


def discover_external(
    paths: LakePaths, settings: Settings, day: str, now: float, *, record_failures: bool = True
) -> ExternalScan:
    """New-or-changed settled files in every External folder, attributed to ``day``.

    DICOM by content (:func:`looks_like_dicom`) goes to ``files``. ``.dcm``
    files that are not DICOM and symlinks leaving their root go to ``failed``
    with a failure record (written unless ``record_failures`` is false, e.g.
    for a sensor that only looks). Nothing under External is ever written.
    """
    check_day(day)
    scan = ExternalScan()
    ignored = unsettled = 0
    for ns, name, root in _roots(paths, settings):
        state = _load_state(paths, ns, name)
        root_real = os.path.realpath(root)
        for p, st, kind in _walk(root, root_real):
            if kind == "skip":
                ignored += 1
                continue
            rel = p.relative_to(root).as_posix()
            seen = state.get(rel)
            if seen and seen.get("size") == st.st_size and seen.get("mtimeNs") == st.st_mtime_ns:
                continue
            if st.st_mtime > now - settings.settle_seconds:
                unsettled += 1
                continue
            entry = ExternalEntry(str(p), ns, name, rel, st.st_size, st.st_mtime_ns, day)
            if kind == "outside":
                scan.failed.append(
                    _fail(
                        paths,
                        entry,
                        "SymlinkOutsideRoot",
                        "symlink resolves outside its External folder; not followed",
                        record_failures,
                    )
                )
                continue
            try:
                head = fileops.read_head(p, SNIFF_BYTES)
            except OSError:
                unsettled += 1  # unreadable now (permissions, vanished): try again next time
                continue
            if looks_like_dicom(head):
                scan.files.append(entry)
            elif p.name.lower().endswith(".dcm"):
                scan.failed.append(
                    _fail(
                        paths,
                        entry,
                        "NotDicom",
                        "named .dcm but no DICM prefix at byte 128 and no dataset start",
                        record_failures,
                    )
                )
            else:
                ignored += 1
    return ExternalScan(scan.files, scan.failed, ignored, unsettled)


def _fail(paths: LakePaths, entry: ExternalEntry, error_class: str, message: str, write: bool) -> ExternalEntry:
    rel_target = _failure_target(entry.name, entry.rel)
    kwargs: dict[str, Any] = dict(
        ns=entry.ns,
        day=entry.day,
        original_path=entry.original_path,
        stage=STAGE,
        error_class=error_class,
        message=message,
        size=entry.size,
        sha256=None,
    )
    if write:
        failure = record_failure(paths, Path(entry.path), rel_target=rel_target, **kwargs)
    else:
        jp = error_json_for(paths.failed_dir(entry.ns, entry.day) / rel_target)
        rec = error_record(paths, failed_path=Path(entry.path), in_place=True, **kwargs)
        failure = to_failed_file(paths, jp, rec)
    return ExternalEntry(entry.path, entry.ns, entry.name, entry.rel, entry.size, entry.mtime_ns, entry.day, failure)


def mark_external_read(paths: LakePaths, entries: Iterable[ExternalEntry]) -> None:
    """Persist that these file versions were read (or refused) for their ``day`` (atomic write)."""
    groups: dict[tuple[str, str], list[ExternalEntry]] = {}
    for e in entries:
        groups.setdefault((e.ns, e.name), []).append(e)
    if not groups:
        return
    with fileops.exclusive_lock(paths.state_dir / "external" / "lock"):
        for (ns, name), group in groups.items():
            files = _load_state(paths, ns, name)
            for e in group:
                files[e.rel] = {"size": e.size, "mtimeNs": e.mtime_ns, "day": e.day, "failed": e.failure is not None}
            fileops.atomic_write_json(_state_file(paths, ns, name), {"ns": ns, "name": name, "files": files})


def external_files_for_day(paths: LakePaths, day: str) -> list[ExternalEntry]:
    """Files whose current version was read for partition ``day`` (for idempotent re-materialisation).

    A file changed since (different size or mtime) or deleted is not listed:
    its current version is not this day's. Refused files are not listed
    (their records are found by :func:`~dicom_assets.lake.failures.list_failed`).
    """
    check_day(day)
    out: list[ExternalEntry] = []
    base = paths.state_dir / "external"
    if not base.is_dir():
        return out
    for sf in sorted(base.glob("*/*.json")):
        try:
            data = fileops.read_json(sf)
        except (OSError, ValueError):
            continue
        ns, name, files = data.get("ns"), data.get("name"), data.get("files") or {}
        root = paths.external_root / ns / name
        for rel, rec in sorted(files.items()):
            if rec.get("day") != day or rec.get("failed"):
                continue
            p = root / rel
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtimeNs"):
                out.append(ExternalEntry(str(p), ns, name, rel, st.st_size, st.st_mtime_ns, day))
    return out


__all__ = ["ExternalEntry", "ExternalScan", "discover_external", "mark_external_read", "external_files_for_day"]
