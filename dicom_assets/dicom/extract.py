"""Bronze ``dicomimagingmetastore`` rows from DICOM files (SPEC §3.2, §6).

:func:`extract_dataset` turns one file's bytes into the extracted columns
(promoted tags, the full DICOM JSON model in ``metadata_string``, size and
SHA-256); :func:`extract_batch` / :func:`extract_batch_arrow` do it for a batch
of :class:`ExtractTask` and add lineage, compress successfully read files to
``<file>.zip`` when asked, and turn every problem into a failure record so
one file never stops a batch. Each file is read within a budget of size,
nesting, work and time (:mod:`dicom_assets.dicom.budget`): a pathological
file fails with ``TooLarge``, ``TooDeep`` or ``Timeout`` instead of hanging
the batch or exhausting memory. These are the functions the process pool and
the Spark engine call; they import neither Dagster nor Spark.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import traceback
import zipfile
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from dicom_assets.dicom.budget import Budget, FileTooLarge, ReadLimits, alarm, alarm_handler_installed
from dicom_assets.dicom.compress import CompressionBatch, read_single_member
from dicom_assets.dicom.promote import DICOMDIR_SOP_CLASS, promoted_columns
from dicom_assets.dicom.records import DicomReadError, ExtractTask
from dicom_assets.dicom.walker import Buffer, walk
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA

__all__ = ["extract_dataset", "extract_batch", "extract_batch_arrow", "DicomReadError", "ReadLimits"]

#: Files at least this big are memory-mapped rather than read (bounded RSS for multi-GB objects).
MMAP_MIN_BYTES = 64 * 1024 * 1024
_TEXT_COLUMNS = frozenset(
    f.name for f in METASTORE_SCHEMA if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
)


def extract_dataset(
    data: Buffer, *, bulk_data_uri: str, bulk_data_threshold: int = 1024, budget: Budget | None = None
) -> dict[str, Any]:
    """Every ``EXTRACTED_FIELDS`` column for one DICOM file's bytes.

    Columns: the promoted tags (see :mod:`dicom_assets.dicom.promote`),
    ``metadata_string`` (every element of the command set, file meta group
    0002 and dataset as the PS3.18 Annex F JSON model, keys sorted by tag;
    binary values over ``bulk_data_threshold`` bytes and all Pixel Data as
    ``{"vr", "BulkDataURI": "<bulk_data_uri>#<tag path>", "length"}``),
    ``fileSize`` and ``contentSha256`` (hex SHA-256 of ``data``).

    Raises :class:`DicomReadError` when ``data`` is not DICOM (``NotDicom``), is
    cut short (``Truncated``), has an element that cannot be read
    (``InvalidElement``) or lacks (0008,0016) SOP Class UID / (0008,0018) SOP
    Instance UID (``MissingUid``; a DICOMDIR takes them from (0002,0002) /
    (0002,0003)). A missing Study or Series Instance UID is not an error.
    Over ``budget`` (default limits, clock started now) it raises ``TooDeep``,
    ``TooLarge`` or ``Timeout``.
    """
    parsed = walk(data, bulk_data_uri=bulk_data_uri, bulk_data_threshold=bulk_data_threshold, budget=budget)
    row = promoted_columns(parsed.dataset, parsed.meta, has_pixel_data=parsed.has_pixel_data)
    missing = [
        name
        for name, col in (("(0008,0016) SOPClassUID", "sopClassUid"), ("(0008,0018) SOPInstanceUID", "sopInstanceUid"))
        if not row[col]
    ]
    if missing:
        is_dicomdir = row["sopClassUid"] == DICOMDIR_SOP_CLASS
        what = (
            "DICOMDIR lacks (0002,0003) MediaStorageSOPInstanceUID" if is_dicomdir else "missing " + ", ".join(missing)
        )
        raise DicomReadError("MissingUid", what)
    for name in _TEXT_COLUMNS.intersection(row):
        # A corrupt VR can turn a promoted tag into numbers; bad values are kept raw, as text.
        if row[name] is not None and not isinstance(row[name], str):
            row[name] = str(row[name])
    row["metadata_string"] = parsed.to_json()
    row["fileSize"] = len(data)
    row["contentSha256"] = hashlib.sha256(data).hexdigest()
    return row


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _text(path: str) -> str:
    """A path as valid Unicode for the tables: undecodable name bytes shown as ``\\xNN``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def _safe_message(exc: BaseException) -> tuple[str, str]:
    """(errorClass, message) for an exception, without element values (no PHI)."""
    if isinstance(exc, MemoryError):
        return "TooLarge", "out of memory while reading the file (MemoryError)"
    if isinstance(exc, RecursionError):
        return "TooDeep", "nested past Python's recursion limit (RecursionError)"
    if isinstance(exc, FileNotFoundError):
        return "FileNotFound", f"{exc.strerror}: {_text(str(exc.filename))}"
    if isinstance(exc, OSError):
        return "Unreadable", f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    if isinstance(exc, (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error)):
        return "CorruptZip", f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return "InternalError", f"unexpected {type(exc).__name__}{where}"


def _read_member(zip_path: str, member: str | None, max_bytes: int) -> bytes:
    """A ``.dcm.zip`` member in memory, refused first when its declared size is over ``max_bytes``."""
    with zipfile.ZipFile(zip_path) as zf:
        infos = [zf.getinfo(member)] if member is not None else [i for i in zf.infolist() if not i.is_dir()]
        for info in infos:
            if info.file_size > max_bytes:
                raise FileTooLarge(info.file_size, max_bytes)
    return read_single_member(zip_path, member)


def _read(task: ExtractTask, limits: ReadLimits) -> tuple[Buffer, str, bool]:
    """(bytes, path read, whether to compress afterwards) for one task.

    Raises :class:`FileTooLarge` for a file (or ZIP member, by its declared
    size, which zipfile never reads past) over ``limits.max_file_bytes``.
    """
    max_bytes = limits.max_file_bytes
    if task.member is not None:
        return _read_member(task.path, task.member, max_bytes), task.path, False
    compress = task.file_path == task.path + ".zip"
    try:
        fh = open(task.path, "rb")
    except FileNotFoundError:
        if not (compress and os.path.exists(task.file_path)):
            raise
        # A previous run compressed the file and died before recording it.
        try:
            data = _read_member(task.file_path, Path(task.path).name, max_bytes)
        except KeyError:
            data = _read_member(task.file_path, None, max_bytes)
        return data, task.file_path, False
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise FileTooLarge(size, max_bytes)
        if size >= MMAP_MIN_BYTES:
            # Map big files instead of copying them: pixel data is then never
            # read into this process except by the hash and the zip writer.
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), task.path, compress
        return fh.read(), task.path, compress


def extract_batch(
    tasks: Sequence[ExtractTask],
    *,
    bulk_data_threshold: int = 1024,
    now: datetime | None = None,
    limits: ReadLimits | None = None,
    defer_removal: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read every task; return (metastore rows, failure records).

    Rows carry ``METASTORE_SCHEMA``'s fields: the extracted columns plus
    ``filePath`` (``task.file_path``, also the bulk-data URI base),
    ``originalPath``, ``sourceSystem``, ``ingestDate``, ``sourceModifiedAt``
    (UTC) and ``createdDatetime`` (``now``). Failures carry
    ``FAILURES_SCHEMA``'s fields with ``stage`` ``extract`` (or ``compress``
    when the file read fine but its ZIP could not be written; the original
    then stays in place). When ``task.file_path == task.path + ".zip"`` a read
    file is replaced by a durable single-member ZIP; if only the ZIP exists
    (re-run after a crash) it is read instead. Path columns are valid UTF-8:
    name bytes that are not show as ``\\xNN``.

    Each file is read within ``limits`` (default :class:`ReadLimits`: the
    ``Settings`` defaults, use :meth:`ReadLimits.from_settings`): over
    ``max_file_bytes`` it is refused unread, and its reading (not its
    compression, which must not be cut half-way) has ``timeout_seconds`` of
    wall-clock time, checked by the walker and, in the main thread, also by a
    ``SIGALRM`` backstop (see :mod:`dicom_assets.dicom.budget`). Nothing a
    file contains makes this function raise.

    With ``defer_removal`` the originals of compressed files are unlinked in
    the background once their ZIPs are durable; the caller must call
    :func:`~dicom_assets.dicom.compress.settle_removals` before it relies on
    them being gone.
    """
    now = now or datetime.now(UTC)
    limits = limits or ReadLimits()
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    zips = CompressionBatch(defer_removal=defer_removal)
    row_of: dict[int, int] = {}
    try:
        with alarm_handler_installed() as alarm_enabled:
            for i, task in enumerate(tasks):
                row, failure = _extract_one(task, bulk_data_threshold, now, limits, alarm_enabled, zips, i)
                if row is not None:
                    row_of[i] = len(rows)
                    rows.append(row)
                if failure is not None:
                    failures.append(failure)
    finally:
        unwritten = zips.finish()
        zips.close()
    if unwritten:
        # The file read fine but its ZIP could not be written: a failure of
        # stage "compress"; the original stays where it was.
        for i, exc in unwritten.items():
            row = rows[row_of[i]]
            failures.append(
                _failure(tasks[i], tasks[i].path, "compress", *_safe_message(exc), None, now,
                         size=row["fileSize"], sha256=row["contentSha256"])
            )
        dropped = {row_of[i] for i in unwritten}
        rows = [r for k, r in enumerate(rows) if k not in dropped]
    return rows, failures


def _extract_one(
    task: ExtractTask,
    threshold: int,
    now: datetime,
    limits: ReadLimits,
    alarm_enabled: bool,
    zips: CompressionBatch,
    key: int,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(row, None) or (None, failure record) for one task."""
    data: Buffer | None = None
    read_path = task.path
    stage = "extract"
    size: int | None = None
    try:
        with alarm(limits.timeout_seconds, alarm_enabled):
            budget = Budget.start(limits)
            data, read_path, compress = _read(task, limits)
            row = extract_dataset(
                data, bulk_data_uri=_text(task.file_path), bulk_data_threshold=threshold, budget=budget
            )
        if compress:
            stage = "compress"
            zips.add(key, task.path, task.file_path, data, mtime=task.source_modified_at)
    except DicomReadError as exc:
        size = exc.size if isinstance(exc, FileTooLarge) else None
        return None, _failure(task, read_path, stage, exc.error_class, exc.message, data, now, size)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
        error_class, message = _safe_message(exc)
        return None, _failure(task, read_path, stage, error_class, message, data, now)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    row["filePath"] = _text(task.file_path)
    row["originalPath"] = _text(task.original_path)
    row["sourceSystem"] = _text(task.source_system)
    row["ingestDate"] = task.ingest_date
    row["sourceModifiedAt"] = _utc(task.source_modified_at)
    row["createdDatetime"] = now
    return row, None


def _failure(
    task: ExtractTask,
    read_path: str,
    stage: str,
    error_class: str,
    message: str,
    data: Buffer | None,
    now: datetime,
    size: int | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """A ``FAILURES_SCHEMA`` record; size and hash from ``data`` when it was read, else as given."""
    return {
        "filePath": _text(read_path),
        "originalPath": _text(task.original_path),
        "sourceSystem": _text(task.source_system),
        "ingestDate": task.ingest_date,
        "stage": stage,
        "errorClass": error_class,
        "message": message,
        "fileSize": len(data) if data is not None else size,
        "contentSha256": hashlib.sha256(data).hexdigest() if data is not None else sha256,
        "detectedAt": now,
    }


def extract_batch_arrow(
    tasks: Sequence[ExtractTask],
    *,
    bulk_data_threshold: int = 1024,
    now: datetime | None = None,
    limits: ReadLimits | None = None,
    defer_removal: bool = False,
) -> tuple[pa.Table, pa.Table]:
    """:func:`extract_batch` as tables with exactly ``METASTORE_SCHEMA`` and ``FAILURES_SCHEMA``.

    A row that does not convert to ``METASTORE_SCHEMA`` (a reader bug, never
    expected) becomes an ``InternalError`` failure instead of failing the batch.
    """
    rows, failures = extract_batch(
        tasks, bulk_data_threshold=bulk_data_threshold, now=now, limits=limits, defer_removal=defer_removal
    )
    try:
        table = pa.Table.from_pylist(rows, schema=METASTORE_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        kept = []
        for row in rows:
            try:
                pa.Table.from_pylist([row], schema=METASTORE_SCHEMA)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                failures.append(_unconvertible(row, exc))
            else:
                kept.append(row)
        table = pa.Table.from_pylist(kept, schema=METASTORE_SCHEMA)
    return table, pa.Table.from_pylist(failures, schema=FAILURES_SCHEMA)


def _unconvertible(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    return {
        "filePath": row["filePath"],
        "originalPath": row["originalPath"],
        "sourceSystem": row["sourceSystem"],
        "ingestDate": row["ingestDate"],
        "stage": "extract",
        "errorClass": "InternalError",
        "message": f"row does not fit the metastore schema ({type(exc).__name__})",
        "fileSize": row["fileSize"],
        "contentSha256": row["contentSha256"],
        "detectedAt": row["createdDatetime"],
    }
