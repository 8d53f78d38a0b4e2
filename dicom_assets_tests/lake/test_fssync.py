"""BatchSync: one syncfs per filesystem for a batch's files, per-file fsync where it cannot be trusted."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from dicom_assets.lake import fileops, fssync


def _recording(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[str]]:
    """Calls of syncfs (descriptors) and of the per-file fsync fallback (paths) from now on."""
    if not fssync.syncfs_available():
        pytest.skip("no syncfs with error reporting here (Linux >= 5.8)")
    fds: list[int] = []
    files: list[str] = []
    real_syncfs, real_fsync = fssync._syncfs, fileops.fsync_file
    assert real_syncfs is not None
    monkeypatch.setattr(fssync, "_syncfs", lambda fd: (fds.append(fd), real_syncfs(fd))[1])
    monkeypatch.setattr(fileops, "fsync_file", lambda p: (files.append(str(p)), real_fsync(p))[1])
    return fds, files


def test_files_of_two_folders_on_one_filesystem_take_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fds, files = _recording(monkeypatch)
    a, b = tmp_path / "a", tmp_path / "b" / "deeper"
    a.mkdir()
    b.mkdir(parents=True)
    with fssync.BatchSync() as sync:
        sync.watch(str(a))
        sync.watch(str(tmp_path / "b"))  # files below a watched folder count too
        sync.watch(str(a))
        written = [str(a / "1"), str(a / "2"), str(b / "3")]
        for p in written:
            Path(p).write_bytes(b"x")
        assert sync.sync(written) == [None, None, None]
        assert len(fds) == 1 and files == []
        assert sync.whole_filesystems
    fd = fds[0]
    with pytest.raises(OSError):
        os.fstat(fd)  # released on leaving the block


def test_an_unwatched_filesystem_is_fsynced_file_by_file_and_a_missing_file_is_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fds, files = _recording(monkeypatch)
    (tmp_path / "f").write_bytes(b"x")
    with fssync.BatchSync() as sync:  # nothing watched
        out = sync.sync([str(tmp_path / "f"), str(tmp_path / "gone")])
    assert fds == [] and files == [str(tmp_path / "f")]
    assert out[0] is None and isinstance(out[1], FileNotFoundError)


def test_a_failed_syncfs_is_the_error_of_every_file_on_that_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _recording(monkeypatch)

    def failing(fd: int) -> int:
        ctypes.set_errno(5)
        return -1

    monkeypatch.setattr(fssync, "_syncfs", failing)
    paths = [str(tmp_path / n) for n in "xyz"]
    with fssync.BatchSync() as sync:
        sync.watch(str(tmp_path))
        for p in paths:
            Path(p).write_bytes(b"x")
        out = sync.sync(paths)
    assert all(isinstance(e, OSError) and e.errno == 5 for e in out), out


def test_without_syncfs_every_file_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files: list[str] = []
    real = fileops.fsync_file
    monkeypatch.setattr(fssync, "_syncfs", None)
    monkeypatch.setattr(fileops, "fsync_file", lambda p: (files.append(str(p)), real(p))[1])
    paths = [str(tmp_path / n) for n in "xy"]
    with fssync.BatchSync() as sync:
        sync.watch(str(tmp_path))
        for p in paths:
            Path(p).write_bytes(b"x")
        assert sync.sync(paths) == [None, None]
        assert not sync.whole_filesystems
    assert sorted(files) == paths


def test_syncfs_is_trusted_only_from_linux_5_8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older kernels' syncfs returned 0 after a writeback error: those fall back to fsync."""
    monkeypatch.setattr(fssync.platform, "release", lambda: "5.4.0-150-generic")
    assert not fssync._kernel_at_least(5, 8)
    monkeypatch.setattr(fssync.platform, "release", lambda: "5.8.0")
    assert fssync._kernel_at_least(5, 8)
    monkeypatch.setattr(fssync.platform, "release", lambda: "6.18.44-fc-v1272")
    assert fssync._kernel_at_least(5, 8)
    monkeypatch.setattr(fssync.platform, "release", lambda: "weird")
    assert not fssync._kernel_at_least(5, 8)
