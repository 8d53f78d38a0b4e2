"""Durable single-member ZIPs for compressed ``.dcm.zip`` files (SPEC §3.2, §6).

After a successful read the bronze step replaces ``<file>`` by ``<file>.zip``.
Nothing is deleted before its copy is durable: the ZIP is written to a
temporary name in the same folder, flushed and fsynced, renamed over the
target with :func:`os.replace` (atomic on POSIX), the folder is fsynced so the
rename survives a crash, and only then is the original unlinked. The temporary
name is deterministic (``<file>.zip.part``) so a re-run after a crash
overwrites a stale one instead of leaving litter.

:class:`CompressionBatch` keeps that order for a whole batch of files but
pays the waits together: at the end one ``syncfs`` per filesystem makes
every ZIP and its rename durable (:class:`~dicom_assets.lake.fssync.BatchSync`;
where ``syncfs`` cannot report errors, each ZIP is fsynced, several at a time,
then each folder once), then the originals are unlinked and the folders
synced again. Until the batch's :meth:`CompressionBatch.finish`,
a compressed file and its original both exist; a re-run after a crash reads
the original again and rewrites the ZIP, so nothing is lost either way.

A batch made with ``defer_removal=True`` leaves that last part (unlink the
originals, sync their folders) to a background thread of this process, so
the caller reads its next batch meanwhile: on this machine's disk an unlink
waits ~0.5 ms (0.1 ms of it CPU), which made a third of the time of a batch's
:meth:`~CompressionBatch.finish`. The caller must then call
:func:`settle_removals` before it reports the files compressed (the local
engine does so before its commit).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
import zipfile
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

try:  # ISA-L deflate: see _write_one_member_zip; without it, zipfile and zlib do the same job slower
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a dependency; kept optional for odd platforms
    _isal = None  # type: ignore[assignment]

from dicom_assets.lake.fileops import shared_thread_pool
from dicom_assets.lake.fssync import BatchSync

__all__ = [
    "write_zip_durably",
    "read_single_member",
    "replace_with_zip",
    "CompressionBatch",
    "settle_removals",
    "ZIP_COMPRESSLEVEL",
]

#: Writer threads per reading process, and the bytes they may hold unwritten.
WRITER_THREADS = 2
MAX_INFLIGHT_BYTES = 256 << 20

#: Deflate level 1: pixel data gains little from higher levels and costs much more CPU.
ZIP_COMPRESSLEVEL = 1


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on dirs
        pass
    finally:
        os.close(fd)


#: Sizes past this need ZIP64 records; those rare files go through :mod:`zipfile`.
_ZIP32_LIMIT = 0xFFFF_FFFF
_EXTERNAL_ATTR = 0o644 << 16  # rw-r--r--


def _write_one_member_zip(fh: BinaryIO, member: str, data: bytes | mmap.mmap, date_time: tuple[int, ...]) -> None:
    """A one-member ZIP (PKWARE APPNOTE 6.3: local header, data, central directory, end record).

    The member is raw deflate from ISA-L (:mod:`isal.isal_zlib`): the same
    format as zlib's, about 5x faster at level 1 for a like ratio (0.65
    against 0.63 on the fabric sample), which made compression, not parsing,
    the larger part of the bronze step. :mod:`zipfile` reads it back.
    """
    assert _isal is not None
    try:
        name, flags = member.encode("ascii"), 0
    except UnicodeEncodeError:
        name, flags = member.encode("utf-8"), 0x800  # bit 11: the name is UTF-8
    deflater = _isal.compressobj(ZIP_COMPRESSLEVEL, _isal.DEFLATED, -15)
    packed = deflater.compress(data) + deflater.flush()
    if len(packed) >= _ZIP32_LIMIT:  # pragma: no cover - incompressible data past 4 GiB
        raise OSError(f"{member}: compressed size needs ZIP64")
    crc = _isal.crc32(data) & 0xFFFF_FFFF
    y, mo, d, h, mi, sec = date_time[:6]
    dos_time, dos_date = (h << 11) | (mi << 5) | (sec // 2), ((y - 1980) << 9) | (mo << 5) | d
    common = (20, flags, 8, dos_time, dos_date, crc, len(packed), len(data), len(name))  # version 2.0, deflate
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", *common, 0)
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", (3 << 8) | 20, *common, 0, 0, 0, 0, _EXTERNAL_ATTR, 0)
    central_offset = len(local) + len(name) + len(packed)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name), central_offset, 0)
    fh.write(local + name)
    fh.write(packed)
    fh.write(central + name + end)


def write_zip_durably(
    data: bytes | mmap.mmap,
    member: str,
    zip_path: str,
    *,
    mtime: float | None = None,
    sync_folder: bool = True,
    sync_file: bool = True,
) -> None:
    """Write ``data`` as the only member ``member`` of ``zip_path`` (deflated), durably.

    With ``sync_folder=False`` the caller fsyncs the folder before relying on
    the rename, with ``sync_file=False`` also the file's data (both are done
    for a whole batch by :class:`CompressionBatch`).
    """
    folder = os.path.dirname(os.path.abspath(zip_path))
    tmp = zip_path + ".part"
    stamp = time.gmtime(mtime if mtime is not None else time.time())
    # ZIP timestamps start in 1980.
    date_time = max((1980, 1, 1, 0, 0, 0), tuple(stamp[:6]))
    try:
        with open(tmp, "wb") as fh:
            if _isal is not None and len(data) < _ZIP32_LIMIT:
                _write_one_member_zip(fh, member, data, date_time)
            else:
                info = zipfile.ZipInfo(member, date_time=date_time)  # type: ignore[arg-type]
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = _EXTERNAL_ATTR
                with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_COMPRESSLEVEL) as zf:
                    zf.writestr(info, data, compresslevel=ZIP_COMPRESSLEVEL)
            fh.flush()
            if sync_file:
                os.fsync(fh.fileno())
        os.replace(tmp, zip_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_folder:
        _fsync_dir(folder)


def read_single_member(zip_path: str, member: str | None = None) -> bytes:
    """The bytes of ``member`` (default: the only file member) of ``zip_path``, in memory."""
    with zipfile.ZipFile(zip_path) as zf:
        if member is None:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            if len(names) != 1:
                raise zipfile.BadZipFile(f"expected one member, found {len(names)}")
            member = names[0]
        return zf.read(member)


def replace_with_zip(path: str, zip_path: str, data: bytes | mmap.mmap, *, mtime: float | None = None) -> None:
    """Compress the already-read ``data`` of ``path`` into ``zip_path`` durably, then unlink ``path``."""
    write_zip_durably(data, Path(path).name, zip_path, mtime=mtime)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _remove_originals(paths: list[str], folders: list[str]) -> None:
    """Unlink ``paths`` (their ZIPs are durable), then fsync ``folders`` so the unlinks are too.

    One path that cannot be unlinked does not keep the others: the first
    error is raised once the rest are done.
    """
    errors: list[OSError] = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(exc)
    for folder in folders:
        _fsync_dir(folder)
    if errors:
        raise errors[0]


# This process's deferred removals (see CompressionBatch), oldest first.
_removals: list[Future[None]] = []
_removals_lock = threading.Lock()


def settle_removals() -> None:
    """Wait until every removal of originals deferred by this process is done.

    Raises the first error one of them met (an ``OSError`` other than a file
    already gone); the originals concerned stay beside their ZIPs, which a
    re-run reads again, so nothing is lost. Cheap when nothing is pending.
    """
    with _removals_lock:
        pending, _removals[:] = list(_removals), []
    errors = [exc for fut in pending if (exc := fut.exception()) is not None]
    if errors:
        raise errors[0]


class CompressionBatch:
    """Replace many read files by their ZIPs: writes overlap the reading, folders are synced once.

    :meth:`add` hands each file's bytes to a few writer threads (zlib
    releases the GIL, so the next file is parsed meanwhile) which write each
    ZIP and rename it into place. :meth:`finish` waits for them and syncs
    (:class:`~dicom_assets.lake.fssync.BatchSync`), so every ZIP and rename
    is durable; only then does it unlink the originals
    of the ZIPs written, and fsyncs the folders again (with ``defer_removal``,
    in the background: see :func:`settle_removals`). Memory-mapped (big)
    files are written at once, in the caller's thread.
    """

    def __init__(
        self,
        threads: int = WRITER_THREADS,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        *,
        defer_removal: bool = False,
    ) -> None:
        self._pool = shared_thread_pool("dicom-zip", threads) if threads > 0 else None
        self._defer_removal = defer_removal
        self._max_inflight = max_inflight_bytes
        self._pending: list[tuple[int, str, str, Future[None], int]] = []
        self._inflight = 0
        self._written: list[tuple[int, str, str]] = []
        self._failed: dict[int, BaseException] = {}
        self._sync = BatchSync()

    def add(
        self, key: int, path: str, zip_path: str, data: bytes | mmap.mmap, *, mtime: float | None = None
    ) -> None:
        """Compress the already-read ``data`` of ``path`` into ``zip_path``; ``path`` goes at :meth:`finish`.

        A failure of a file written at once raises here; one of a file handed
        to a writer thread is reported by :meth:`finish` under ``key``.
        """
        member = Path(path).name
        self._sync.watch(os.path.dirname(os.path.abspath(zip_path)))
        if self._pool is None or not isinstance(data, bytes):
            write_zip_durably(data, member, zip_path, mtime=mtime, sync_folder=False, sync_file=False)
            self._written.append((key, path, zip_path))
            return
        fut = self._pool.submit(
            write_zip_durably, data, member, zip_path, mtime=mtime, sync_folder=False, sync_file=False
        )
        self._pending.append((key, path, zip_path, fut, len(data)))
        self._inflight += len(data)
        while self._inflight > self._max_inflight and self._pending:
            self._settle(self._pending.pop(0))

    def _settle(self, item: tuple[int, str, str, Future[None], int]) -> None:
        key, path, zip_path, fut, size = item
        self._inflight -= size
        exc = fut.exception()
        if exc is None:
            self._written.append((key, path, zip_path))
        else:
            self._failed[key] = exc

    def finish(self) -> dict[int, BaseException]:
        """Wait for the writers, make every ZIP durable in its folder, then remove the originals.

        Returns the files whose ZIP could not be written, by ``key``; those
        originals stay in place. With ``defer_removal`` the other originals
        are removed in the background (:func:`settle_removals` waits for
        that). Idempotent; the batch can be reused after.
        """
        while self._pending:
            self._settle(self._pending.pop(0))
        written: list[tuple[int, str, str]] = []
        synced = self._sync.sync([z for _k, _p, z in self._written])
        whole_filesystems = self._sync.whole_filesystems
        self._sync.close()  # watched again by the next add()
        for (key, path, zip_path), exc in zip(self._written, synced, strict=True):
            if exc is None:
                written.append((key, path, zip_path))
                continue
            self._failed[key] = exc  # not durable: the original stays, the ZIP goes
            try:
                os.unlink(zip_path)
            except OSError:
                pass
        folders = sorted({os.path.dirname(os.path.abspath(p)) for _k, path, z in written for p in (path, z)})
        if not whole_filesystems:  # a syncfs made the renames durable already
            for folder in folders:
                _fsync_dir(folder)
        originals = [path for _key, path, _zip in written]
        if self._defer_removal and originals:
            # One thread: unlinks in one folder take its lock in turn anyway.
            fut = shared_thread_pool("dicom-unlink", 1).submit(_remove_originals, originals, folders)
            with _removals_lock:
                _removals.append(fut)
        elif originals:
            _remove_originals(originals, folders)
        failed, self._failed, self._written = self._failed, {}, []
        return failed

    def close(self) -> None:
        """Wait for any writer still running (after :meth:`finish` there is none).

        The writer threads are shared by every batch of the process, so they stay up.
        """
        while self._pending:
            self._settle(self._pending.pop(0))
        self._sync.close()
