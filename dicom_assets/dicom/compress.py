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
from pathlib import Path

__all__ = ["write_zip_durably", "read_single_member", "replace_with_zip", "CompressionBatch", "ZIP_COMPRESSLEVEL"]

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
    """Replace many read files by their ZIPs with one folder fsync per folder and phase.

    :meth:`add` writes each ZIP durably (its data fsynced, renamed into
    place); :meth:`finish` fsyncs the touched folders so every rename is
    durable, only then unlinks the originals, and fsyncs the folders again.
    """

    def __init__(self) -> None:
        self._originals: list[str] = []
        self._folders: set[str] = set()

    def add(self, path: str, zip_path: str, data: bytes | mmap.mmap, *, mtime: float | None = None) -> None:
        """Compress the already-read ``data`` of ``path`` into ``zip_path``; ``path`` goes at :meth:`finish`."""
        write_zip_durably(data, Path(path).name, zip_path, mtime=mtime, sync_folder=False)
        self._originals.append(path)
        self._folders.add(os.path.dirname(os.path.abspath(zip_path)))
        self._folders.add(os.path.dirname(os.path.abspath(path)))

    def finish(self) -> None:
        """Make every ZIP durable in its folder, then remove the originals (idempotent)."""
        for folder in sorted(self._folders):
            _fsync_dir(folder)
        for path in self._originals:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for folder in sorted(self._folders):
            _fsync_dir(folder)
        self._originals.clear()
        self._folders.clear()
