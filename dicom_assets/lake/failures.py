"""Failure records: ``<file>.error.json`` beside each file in Failed (SPEC §2, §6).

Every file that cannot be organised or read ends in
``Failed/Imaging/DICOM/<ns>/<day>/…`` with a JSON record holding ``stage,
errorClass, message, originalPath, detectedAt`` (ISO-8601 UTC) plus the facts
the bronze ``dicom_failures`` table needs (``failedPath, sourceSystem,
ingestDate, fileSize, contentSha256``). The records are the source of truth:
:func:`list_failed` rebuilds the failure rows of a day from them, so the table
can be re-materialised idempotently. Messages never carry file content.

External files are never moved: their record is written under Failed with
``inPlace: true`` and ``failedPath`` pointing at the External file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_assets.lake import fileops
from dicom_assets.lake.paths import LakePaths

ERROR_SUFFIX = ".error.json"
DAY_RE = re.compile(r"^\d{4}/\d{2}/\d{2}$")


@dataclass(frozen=True)
class FailedFile:
    """One refused or unreadable file and why (a ``dicom_failures`` row)."""

    failed_path: str
    error_json_path: str
    original_path: str
    source_system: str
    stage: str
    error_class: str
    message: str
    size: int | None
    sha256: str | None
    detected_at: str = ""
    ingest_date: str = ""
    in_place: bool = False

    def as_row(self) -> dict[str, Any]:
        """The row for ``bronze/dicom_failures`` (column names of ``FAILURES_SCHEMA``)."""
        return {
            "filePath": self.failed_path,
            "originalPath": self.original_path,
            "sourceSystem": self.source_system,
            "ingestDate": self.ingest_date,
            "stage": self.stage,
            "errorClass": self.error_class,
            "message": self.message,
            "fileSize": self.size,
            "contentSha256": self.sha256,
            "detectedAt": datetime.fromisoformat(self.detected_at.replace("Z", "+00:00")) if self.detected_at else None,
        }


def check_day(day: str) -> str:
    """Reject anything but a ``yyyy/mm/dd`` partition key (it becomes a path)."""
    if not DAY_RE.match(day):
        raise ValueError(f"partition key must be yyyy/mm/dd, got {day!r}")
    return day


def utc_now_iso(now: float | None = None) -> str:
    t = datetime.now(UTC) if now is None else datetime.fromtimestamp(now, UTC)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _rel(paths: LakePaths, p: Path | str) -> str:
    """Lake-relative when inside the lake (so the lake can be moved), else absolute."""
    try:
        return Path(p).relative_to(paths.root).as_posix()
    except ValueError:
        return str(p)


def _abs(paths: LakePaths, p: str) -> str:
    return p if os.path.isabs(p) else str(paths.root / p)


def error_record(
    paths: LakePaths,
    *,
    failed_path: Path,
    original_path: str,
    ns: str,
    day: str,
    stage: str,
    error_class: str,
    message: str,
    size: int | None,
    sha256: str | None,
    detected_at: str | None = None,
    in_place: bool = False,
) -> dict[str, Any]:
    """The JSON object written to ``<failed file>.error.json``."""
    return {
        "stage": stage,
        "errorClass": error_class,
        "message": message,
        "originalPath": original_path,
        "detectedAt": detected_at or utc_now_iso(),
        "failedPath": _rel(paths, failed_path),
        "sourceSystem": ns,
        "ingestDate": day,
        "fileSize": size,
        "contentSha256": sha256,
        "inPlace": in_place,
    }


def to_failed_file(paths: LakePaths, json_path: Path, rec: dict[str, Any]) -> FailedFile:
    failed = rec.get("failedPath") or str(json_path)[: -len(ERROR_SUFFIX)]
    return FailedFile(
        failed_path=fileops.display_path(_abs(paths, failed)),
        error_json_path=fileops.display_path(json_path),
        original_path=str(rec.get("originalPath", "")),
        source_system=str(rec.get("sourceSystem", "")),
        stage=str(rec.get("stage", "")),
        error_class=str(rec.get("errorClass", "")),
        message=str(rec.get("message", "")),
        size=rec.get("fileSize"),
        sha256=rec.get("contentSha256"),
        detected_at=str(rec.get("detectedAt", "")),
        ingest_date=str(rec.get("ingestDate", "")),
        in_place=bool(rec.get("inPlace", False)),
    )


def write_error_json(paths: LakePaths, json_path: Path, rec: dict[str, Any]) -> FailedFile:
    fileops.atomic_write_json(json_path, rec)
    return to_failed_file(paths, json_path, rec)


def error_json_for(failed_path: Path) -> Path:
    return failed_path.parent / (failed_path.name + ERROR_SUFFIX)


def list_failed(paths: LakePaths, day: str) -> list[FailedFile]:
    """Every failure record of partition ``day`` across namespaces, sorted by path.

    Reads ``Failed/Imaging/DICOM/<ns>/<day>/**/*.error.json``; unreadable
    records (torn by a crash before the atomic rename cannot happen, but a user
    may edit them) are skipped.
    """
    check_day(day)
    out: list[FailedFile] = []
    root = paths.failed_root
    if not root.is_dir():
        return out
    for ns_dir in sorted(root.iterdir()):
        day_dir = ns_dir / day
        if not day_dir.is_dir() or ns_dir.name.startswith("."):
            continue
        for dirpath, dirnames, filenames in os.walk(day_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.endswith(ERROR_SUFFIX):
                    continue
                jp = Path(dirpath) / name
                try:
                    rec = fileops.read_json(jp)
                except (OSError, ValueError):
                    continue
                if isinstance(rec, dict):
                    out.append(to_failed_file(paths, jp, rec))
    return out


def move_to_failed(
    paths: LakePaths,
    process_file: Path,
    *,
    ns: str,
    day: str,
    original_path: str,
    stage: str,
    error_class: str,
    message: str,
) -> FailedFile:
    """Move a Process file that failed reading to Failed, durably and idempotently.

    The target keeps the file's path under ``Process/<ns>/<day>/`` (its name
    already carries the unique ``<epoch>_`` prefix), so it is deterministic:
    calling again after a crash finds the half-done state and completes it.
    The record is written *before* the move, so a crash in between leaves the
    file in Process (read again next run, which fails again and calls this
    again) rather than an unrecorded file in Failed.
    """
    check_day(day)
    process_file = Path(process_file)
    try:
        sub = process_file.relative_to(paths.process_dir(ns, day))
    except ValueError:
        sub = Path(process_file.name)
    target = paths.failed_dir(ns, day) / sub
    jp = error_json_for(target)
    size: int | None = None
    sha: str | None = None
    src_there = os.path.lexists(process_file)
    if src_there:
        st = os.lstat(process_file)
        size = st.st_size
        sha = None if os.path.islink(process_file) else fileops.sha256_file(process_file)
    elif os.path.lexists(target):
        st = os.lstat(target)
        size = st.st_size
        sha = None if os.path.islink(target) else fileops.sha256_file(target)
    else:
        raise FileNotFoundError(str(process_file))
    detected = None
    if jp.exists():
        try:
            detected = fileops.read_json(jp).get("detectedAt")
        except (OSError, ValueError, AttributeError):
            detected = None
    rec = error_record(
        paths,
        failed_path=target,
        original_path=original_path,
        ns=ns,
        day=day,
        stage=stage,
        error_class=error_class,
        message=message,
        size=size,
        sha256=sha,
        detected_at=detected,
    )
    failed = write_error_json(paths, jp, rec)
    if src_there:
        if os.path.lexists(target):
            # A cross-filesystem move died after the copy was durable: the copy wins.
            if sha is None or fileops.sha256_file(target) == sha:
                os.unlink(process_file)
                fileops.fsync_dir(process_file.parent)
            else:
                raise FileExistsError(str(target))
        else:
            fileops.remove_quietly(fileops.part_path(target))
            fileops.durable_move(process_file, target, expect_sha256=sha)
    return failed


def record_failure(
    paths: LakePaths,
    file: Path,
    *,
    ns: str,
    day: str,
    rel_target: Path,
    original_path: str,
    stage: str,
    error_class: str,
    message: str,
    size: int | None = None,
    sha256: str | None = None,
) -> FailedFile:
    """Record a failure for a file that stays where it is (External): record only, no move.

    The record goes to ``Failed/<ns>/<day>/<rel_target>.error.json`` with
    ``inPlace: true`` and ``failedPath`` naming ``file``. Idempotent: the
    first ``detectedAt`` is kept.
    """
    check_day(day)
    jp = error_json_for(paths.failed_dir(ns, day) / rel_target)
    detected = None
    if jp.exists():
        try:
            detected = fileops.read_json(jp).get("detectedAt")
        except (OSError, ValueError, AttributeError):
            detected = None
    rec = error_record(
        paths,
        failed_path=Path(file),
        original_path=original_path,
        ns=ns,
        day=day,
        stage=stage,
        error_class=error_class,
        message=message,
        size=size,
        sha256=sha256,
        detected_at=detected,
        in_place=True,
    )
    return write_error_json(paths, jp, rec)


__all__ = [
    "FailedFile",
    "ERROR_SUFFIX",
    "check_day",
    "utc_now_iso",
    "error_record",
    "error_json_for",
    "write_error_json",
    "to_failed_file",
    "list_failed",
    "move_to_failed",
    "record_failure",
]
