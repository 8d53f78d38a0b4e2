"""Durable single-member ZIPs for compressed ``.dcm.zip`` files (SPEC §3.2, §6).

After a successful read the bronze step replaces ``<file>`` by ``<file>.zip``.
Nothing is deleted before its copy is durable: the ZIP is written to a
temporary name in the same folder, flushed and fsynced, renamed over the
target with :func:`os.replace` (atomic on POSIX), the folder is fsynced so the
rename survives a crash, and only then is the original unlinked. The temporary
name is deterministic (``<file>.zip.part``) so a re-run after a crash
overwrites a stale one instead of leaving litter.
"""

from __future__ import annotations

import mmap
import os
import time
import zipfile
from pathlib import Path

__all__ = ["write_zip_durably", "read_single_member", "replace_with_zip", "ZIP_COMPRESSLEVEL"]

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


def write_zip_durably(data: bytes | mmap.mmap, member: str, zip_path: str, *, mtime: float | None = None) -> None:
    """Write ``data`` as the only member ``member`` of ``zip_path`` (ZIP_DEFLATED), durably."""
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
