"""Durable atomic file operations (SPEC §3.1: nothing deleted before its copy is durable)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dicom_assets.lake import fileops

SHM = Path("/dev/shm")


def _other_fs_dir(tmp_path: Path) -> Path | None:
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev or not os.access(SHM, os.W_OK):
        return None
    d = SHM / f"dicom-assets-test-{uuid.uuid4().hex}"
    d.mkdir()
    return d


def test_atomic_write_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "rec.json"
    fileops.atomic_write_json(target, {"k": "v\udcff"})  # undecodable path bytes survive
    assert fileops.read_json(target) == {"k": "v\udcff"}
    fileops.atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["rec.json"]


def test_durable_move_same_filesystem(tmp_path: Path) -> None:
    src = tmp_path / "in" / "x.dcm"
    src.parent.mkdir()
    src.write_bytes(b"data")
    dst = tmp_path / "out" / "deep" / "x.dcm"
    sync: set[Path] = set()
    fileops.durable_move(src, dst, sync_dirs=sync)
    assert dst.read_bytes() == b"data" and not src.exists()
    # Both folders of the rename, and the parents of the two folders it made.
    assert sync == {src.parent, dst.parent, tmp_path, tmp_path / "out"}


def test_durable_move_syncs_every_folder_it_touched_or_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a caller's set the move syncs them itself, the new folders' parents included."""
    synced: list[Path] = []
    real = fileops.fsync_dir
    monkeypatch.setattr(fileops, "fsync_dir", lambda p: (synced.append(Path(p)), real(p))[1])
    src = tmp_path / "in" / "x.dcm"
    src.parent.mkdir()
    src.write_bytes(b"data")
    fileops.durable_move(src, tmp_path / "out" / "deep" / "x.dcm")
    assert sorted(synced) == sorted([src.parent, tmp_path / "out" / "deep", tmp_path, tmp_path / "out"])


def test_durable_move_refuses_to_overwrite(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        fileops.durable_move(src, dst)
    assert src.read_bytes() == b"new" and dst.read_bytes() == b"old"


def test_durable_move_across_filesystems(tmp_path: Path) -> None:
    other = _other_fs_dir(tmp_path)
    if other is None:
        pytest.skip("no second filesystem (/dev/shm) to move across")
    try:
        src = other / "x.dcm"
        src.write_bytes(b"payload" * 1000)
        dst = tmp_path / "out" / "x.dcm"
        fileops.durable_move(src, dst, expect_sha256=hashlib.sha256(b"payload" * 1000).hexdigest())
        assert dst.read_bytes() == b"payload" * 1000 and not src.exists()
        assert not fileops.part_path(dst).exists()
    finally:
        for p in other.iterdir():
            p.unlink()
        other.rmdir()


def test_cross_device_fallback_checks_the_hash_before_unlinking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename

    def rename(a: object, b: object) -> None:
        if not str(a).endswith(fileops.PART_SUFFIX):
            raise OSError(errno.EXDEV, "simulated cross-device")
        real_rename(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    src = tmp_path / "s.dcm"
    src.write_bytes(b"abc")
    with pytest.raises(OSError):
        fileops.durable_move(src, tmp_path / "d.dcm", expect_sha256="0" * 64)
    assert src.read_bytes() == b"abc" and not (tmp_path / "d.dcm").exists()
    assert not fileops.part_path(tmp_path / "d.dcm").exists()
    fileops.durable_move(src, tmp_path / "d.dcm", expect_sha256=hashlib.sha256(b"abc").hexdigest())
    assert (tmp_path / "d.dcm").read_bytes() == b"abc" and not src.exists()


def test_moving_a_symlink_moves_the_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    fileops.durable_move(link, tmp_path / "moved" / "link")
    assert os.readlink(tmp_path / "moved" / "link") == str(target)
    assert target.read_text() == "keep me"


def test_reading_never_follows_links_or_blocks_on_fifos(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path / "t")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError):
        fileops.sha256_file(tmp_path / "l")
    with pytest.raises(OSError):
        fileops.read_head(tmp_path / "fifo", 10)  # returns at once: O_NONBLOCK + regular-file check


def test_append_lines_closes_a_torn_line(tmp_path: Path) -> None:
    f = tmp_path / "j.jsonl"
    f.write_bytes(b'{"a": 1}\n{"torn"')
    fileops.append_lines(f, ['{"b": 2}'])
    assert f.read_bytes().splitlines() == [b'{"a": 1}', b'{"torn"', b'{"b": 2}']


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain.dcm", "plain.dcm"),
        ("with space é.dcm", "with space é.dcm"),
        (os.fsdecode(b"bad\xff\xfename.dcm"), "bad__name.dcm"),
        ("new\nline\t.dcm", "new_line_.dcm"),
        ("..", "_"),
        ("", "_"),
        ("e\u0301.dcm", "\u00e9.dcm"),  # NFD → NFC
    ],
)
def test_safe_component(raw: str, expected: str) -> None:
    assert fileops.safe_component(raw) == expected
    expected.encode("utf-8")  # always storable in a UTF-8 column


def test_fit_name_keeps_the_extension_within_the_byte_limit() -> None:
    name = "é" * 300 + ".dcm"
    fitted = fileops.fit_name(name, 100)
    assert len(fitted.encode("utf-8")) <= 100 and fitted.endswith(".dcm")
    assert fileops.fit_name("short.dcm", 100) == "short.dcm"


def test_display_path_shows_undecodable_bytes() -> None:
    assert fileops.display_path(os.fsdecode(b"/x/\xff.dcm")) == "/x/\\xff.dcm"


def test_crash_point_kills_on_the_nth_hit(tmp_path: Path) -> None:
    code = (
        "from dicom_assets.lake.fileops import crash_point\n"
        "import sys\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    crash_point('p')\n"
    )
    env = dict(os.environ, DICOM_ASSETS_KILL_AT="p:3")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -9 and r.stdout.split() == ["0", "1", "2"]
    env.pop("DICOM_ASSETS_KILL_AT")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["0", "1", "2", "3", "4"]
