"""External folders: read in place, never written; read state per file version (SPEC §2)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_assets.config import Settings
from dicom_assets.lake.external import discover_external, external_files_for_day, mark_external_read
from dicom_assets.lake.failures import list_failed
from dicom_assets.lake.paths import LakePaths

D1, D2 = "2024/03/05", "2024/03/06"


def dcm(name: str = "CT_small.dcm") -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def put(p: Path, data: bytes, age: float = 60) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    t = time.time() - age
    os.utime(p, (t, t))
    return p


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        for n in names + dirnames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            out[str(p)] = f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}:" + (
                hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            )
    return out


@pytest.fixture()
def env(tmp_path: Path) -> tuple[LakePaths, Settings, Path]:
    paths = LakePaths.of(tmp_path / "lake").ensure()
    storage = tmp_path / "pacs-export"  # the user's own storage, outside the lake
    (paths.external_root / "hospital").mkdir(parents=True)
    (paths.external_root / "hospital" / "pacs").symlink_to(storage, target_is_directory=True)
    storage.mkdir()
    return paths, Settings(lake=str(paths.root), settle_seconds=5), storage


def test_discovers_dicom_in_place_through_a_linked_root_and_writes_nothing_there(env) -> None:  # type: ignore[no-untyped-def]
    paths, settings, storage = env
    put(storage / "s1" / "IM0001", dcm())
    put(storage / "s1" / "IM0002.dcm", dcm("MR_small.dcm"))
    put(storage / "README.txt", b"hello")
    put(storage / "fresh.dcm", dcm(), age=0)
    before = snapshot(storage)
    scan = discover_external(paths, settings, D1, time.time())
    assert sorted(e.rel for e in scan.files) == ["s1/IM0001", "s1/IM0002.dcm"]
    assert (scan.ignored, scan.unsettled, scan.failed) == (1, 1, [])
    e = next(e for e in scan.files if e.rel == "s1/IM0001")
    assert e.path == str(paths.external_root / "hospital" / "pacs" / "s1" / "IM0001")
    assert (e.ns, e.name, e.day, e.size) == ("hospital", "pacs", D1, len(dcm()))
    assert e.original_path == e.path and abs(e.mtime - (time.time() - 60)) < 5
    mark_external_read(paths, scan.files)
    assert snapshot(storage) == before  # never moved, renamed, compressed or deleted


def test_read_files_are_not_read_again_and_changed_files_are(env) -> None:  # type: ignore[no-untyped-def]
    paths, settings, storage = env
    a = put(storage / "a.dcm", dcm())
    put(storage / "b.dcm", dcm("MR_small.dcm"))
    scan = discover_external(paths, settings, D1, time.time())
    mark_external_read(paths, scan.files)
    assert discover_external(paths, settings, D1, time.time()).files == []
    put(a, dcm("rtplan.dcm"))  # changed: other size and mtime
    again = discover_external(paths, settings, D2, time.time())
    assert [(e.rel, e.day) for e in again.files] == [("a.dcm", D2)]
    mark_external_read(paths, again.files)
    assert [e.rel for e in external_files_for_day(paths, D1)] == ["b.dcm"]  # a.dcm's current version is D2's
    assert [e.rel for e in external_files_for_day(paths, D2)] == ["a.dcm"]
    os.unlink(storage / "b.dcm")
    assert external_files_for_day(paths, D1) == []


def test_unmarked_files_are_offered_again(env) -> None:  # type: ignore[no-untyped-def]
    paths, settings, storage = env
    put(storage / "a.dcm", dcm())
    assert len(discover_external(paths, settings, D1, time.time()).files) == 1
    assert len(discover_external(paths, settings, D1, time.time()).files) == 1  # the run failed: still new


def test_non_dicom_dcm_gets_a_record_but_stays(env) -> None:  # type: ignore[no-untyped-def]
    paths, settings, storage = env
    bad = put(storage / "sub" / "bad.dcm", b"SECRET text")
    scan = discover_external(paths, settings, D1, time.time())
    [entry] = scan.failed
    assert entry.failure is not None and entry.failure.error_class == "NotDicom"
    assert bad.read_bytes() == b"SECRET text"  # recorded only, never moved
    [listed] = list_failed(paths, D1)
    assert listed.failed_path == entry.path and listed.in_place and listed.stage == "external"
    raw = Path(listed.error_json_path).read_text()
    assert "SECRET" not in raw and json.loads(raw)["originalPath"] == entry.path
    mark_external_read(paths, scan.failed)
    assert discover_external(paths, settings, D1, time.time()).failed == []  # reported once
    assert external_files_for_day(paths, D1) == []


def test_symlinks_inside_a_root_leaving_it_are_refused(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, settings, storage = env
    secret = put(tmp_path / "elsewhere" / "x.dcm", dcm())
    put(storage / "real.dcm", dcm())
    (storage / "escape.dcm").symlink_to(secret)
    (storage / "escape_dir").symlink_to(secret.parent, target_is_directory=True)
    (storage / "alias.dcm").symlink_to(storage / "real.dcm")  # inside: redundant, ignored
    for p in ("escape.dcm", "escape_dir", "alias.dcm"):
        os.utime(storage / p, (time.time() - 60,) * 2, follow_symlinks=False)
    scan = discover_external(paths, settings, D1, time.time())
    assert [e.rel for e in scan.files] == ["real.dcm"]
    assert sorted((e.rel, e.failure.error_class) for e in scan.failed if e.failure) == [
        ("escape.dcm", "SymlinkOutsideRoot"),
        ("escape_dir", "SymlinkOutsideRoot"),
    ]
    assert scan.ignored == 1 and secret.exists()


def test_sensor_mode_writes_no_records(env) -> None:  # type: ignore[no-untyped-def]
    paths, settings, storage = env
    put(storage / "bad.dcm", b"text")
    scan = discover_external(paths, settings, D1, time.time(), record_failures=False)
    assert len(scan.failed) == 1 and list_failed(paths, D1) == []


def test_namespaces_setting_limits_external(env) -> None:  # type: ignore[no-untyped-def]
    paths, settings, storage = env
    put(storage / "a.dcm", dcm())
    assert discover_external(paths, settings.replace(namespaces=("other",)), D1, time.time()).files == []
