"""Durable single-member ZIPs for compressed ``.dcm.zip`` files (SPEC §3.2, §6).

After a successful read the bronze step replaces ``<file>`` by ``<file>.zip``.
Nothing is deleted before its copy is durable: the ZIP is written to a
temporary name in the same folder, flushed and fsynced, renamed over the
target with :func:`os.replace` (atomic on POSIX), the folder is fsynced so the
rename survives a crash, and only then is the original unlinked. The temporary
name is deterministic (``<file>.zip.part``) so a re-run after a crash
overwrites a stale one instead of leaving litter.

:class:`CompressionBatch` keeps that order for a whole batch of files but
pays the folder fsyncs once per folder and phase instead of twice per file:
on the fabric sample two folder fsyncs per file were a fifth of the bronze
step's time. Until the batch's :meth:`CompressionBatch.finish`, a compressed
file and its original both exist; a re-run after a crash reads the original
again and rewrites the ZIP, so nothing is lost either way.
"""

from __future__ import annotations

import mmap
import os
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = ["write_zip_durably", "read_single_member", "replace_with_zip", "CompressionBatch", "ZIP_COMPRESSLEVEL"]

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


def write_zip_durably(
    data: bytes | mmap.mmap, member: str, zip_path: str, *, mtime: float | None = None, sync_folder: bool = True
) -> None:
    """Write ``data`` as the only member ``member`` of ``zip_path`` (ZIP_DEFLATED), durably.

    With ``sync_folder=False`` the caller fsyncs the folder before relying on
    the rename (see :class:`CompressionBatch`).
    """
    folder = os.path.dirname(os.path.abspath(zip_path))
    tmp = zip_path + ".part"
    stamp = time.gmtime(mtime if mtime is not None else time.time())
    # ZIP timestamps start in 1980.
    date_time = max((1980, 1, 1, 0, 0, 0), tuple(stamp[:6]))
    info = zipfile.ZipInfo(member, date_time=date_time)  # type: ignore[arg-type]
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    try:
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_COMPRESSLEVEL) as zf:
                zf.writestr(info, data, compresslevel=ZIP_COMPRESSLEVEL)
            fh.flush()
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


class CompressionBatch:
    """Replace many read files by their ZIPs: writes overlap the reading, folders are synced once.

    :meth:`add` hands each file's bytes to a few writer threads (zlib and
    fsync release the GIL, so the next file is parsed meanwhile) which write
    each ZIP durably (data fsynced, renamed into place). :meth:`finish` waits
    for them, fsyncs the touched folders so every rename is durable, only then
    unlinks the originals of the ZIPs written, and fsyncs the folders again.
    Memory-mapped (big) files are written at once, in the caller's thread.
    """

    def __init__(self, threads: int = WRITER_THREADS, max_inflight_bytes: int = MAX_INFLIGHT_BYTES) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dicom-zip") if threads > 0 else None
        self._max_inflight = max_inflight_bytes
        self._pending: list[tuple[int, str, str, Future[None], int]] = []
        self._inflight = 0
        self._written: list[tuple[str, str]] = []
        self._failed: dict[int, BaseException] = {}

    def add(
        self, key: int, path: str, zip_path: str, data: bytes | mmap.mmap, *, mtime: float | None = None
    ) -> None:
        """Compress the already-read ``data`` of ``path`` into ``zip_path``; ``path`` goes at :meth:`finish`.

        A failure of a file written at once raises here; one of a file handed
        to a writer thread is reported by :meth:`finish` under ``key``.
        """
        member = Path(path).name
        if self._pool is None or not isinstance(data, bytes):
            write_zip_durably(data, member, zip_path, mtime=mtime, sync_folder=False)
            self._written.append((path, zip_path))
            return
        fut = self._pool.submit(write_zip_durably, data, member, zip_path, mtime=mtime, sync_folder=False)
        self._pending.append((key, path, zip_path, fut, len(data)))
        self._inflight += len(data)
        while self._inflight > self._max_inflight and self._pending:
            self._settle(self._pending.pop(0))

    def _settle(self, item: tuple[int, str, str, Future[None], int]) -> None:
        key, path, zip_path, fut, size = item
        self._inflight -= size
        exc = fut.exception()
        if exc is None:
            self._written.append((path, zip_path))
        else:
            self._failed[key] = exc

    def finish(self) -> dict[int, BaseException]:
        """Wait for the writers, make every ZIP durable in its folder, then remove the originals.

        Returns the files whose ZIP could not be written, by ``key``; those
        originals stay in place. Idempotent; the batch can be reused after.
        """
        while self._pending:
            self._settle(self._pending.pop(0))
        folders = sorted({os.path.dirname(os.path.abspath(p)) for pair in self._written for p in pair})
        for folder in folders:
            _fsync_dir(folder)
        for path, _zip in self._written:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for folder in folders:
            _fsync_dir(folder)
        failed, self._failed, self._written = self._failed, {}, []
        return failed

    def close(self) -> None:
        """Stop the writer threads (after :meth:`finish`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
