"""Organise (SPEC §3.1): Ingest → Process/<ns>/<day>/, ZIPs extracted, refusals to Failed."""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import re
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_assets.config import Settings
from dicom_assets.lake.organise import (
    ingest_fingerprint,
    list_failed,
    list_process_files,
    load_landed,
    move_to_failed,
    organise,
    settled_candidates,
)
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import FAILURES_SCHEMA

DAY = "2024/03/05"
EPOCH_NAME = re.compile(r"^(\d{10})\.(\d{6})_(.+)$")


def dcm(name: str = "CT_small.dcm") -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture()
def paths(tmp_path: Path) -> LakePaths:
    return LakePaths.of(tmp_path / "lake").ensure()


def settings(paths: LakePaths, **kw: object) -> Settings:
    return Settings(lake=str(paths.root), settle_seconds=5, **kw)  # type: ignore[arg-type]


def drop(paths: LakePaths, rel: str, data: bytes, age: float = 60) -> Path:
    p = paths.ingest_root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    t = time.time() - age
    os.utime(p, (t, t))
    return p


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def strip_epoch(rel: str) -> str:
    head, _, name = rel.rpartition("/")
    m = EPOCH_NAME.match(name)
    assert m, f"{rel} lacks the <epoch>_ prefix"
    return f"{head}/{m.group(3)}" if head else m.group(3)


def test_dicom_by_content_lands_keeping_subfolders(paths: LakePaths) -> None:
    ct, mr, rt = dcm("CT_small.dcm"), dcm("MR_small.dcm"), dcm("rtplan.dcm")
    src_ct = drop(paths, "ns1/a/b/IMG0001", ct)  # no extension
    drop(paths, "ns1/a/scan.IMA", mr)
    drop(paths, "root.dcm", rt)  # directly under DICOM/ → namespace "default"
    drop(paths, "ns1/README.txt", b"read me")
    drop(paths, "ns1/notes.gz", b"\x1f\x8b\x08\x00" + bytes(40))
    res = organise(paths, settings(paths), DAY, now=time.time())

    assert {strip_epoch(k): sha(v) for k, v in files_under(paths.process_dir("ns1", DAY)).items()} == {
        "a/b/IMG0001": sha(ct),
        "a/scan.IMA": sha(mr),
    }
    assert {strip_epoch(k): sha(v) for k, v in files_under(paths.process_dir("default", DAY)).items()} == {
        "root.dcm": sha(rt)
    }
    assert sorted(files_under(paths.ingest_root)) == ["ns1/README.txt", "ns1/notes.gz"]
    assert (res.ignored, res.unsettled, len(res.failed)) == (2, 0, 0)
    rec = next(r for r in res.landed if r.original_path.endswith("IMG0001"))
    assert rec.original_path == str(src_ct)
    assert (rec.source_system, rec.sha256, rec.size, rec.ingest_date) == ("ns1", sha(ct), len(ct), DAY)
    assert abs(rec.mtime - (time.time() - 60)) < 5
    assert Path(rec.process_path).read_bytes() == ct


def test_epoch_prefix_is_unique_for_equal_basenames(paths: LakePaths) -> None:
    ct = dcm()
    drop(paths, "ns/x/img.dcm", ct)
    drop(paths, "ns/x/a.zip", make_zip([("img.dcm", ct)]))
    drop(paths, "ns/x/b.zip", make_zip([("deep/img.dcm", ct), ("img.dcm", ct)]))
    res = organise(paths, settings(paths), DAY, now=time.time())
    names = [p.name for p in (paths.process_dir("ns", DAY) / "x").iterdir()]
    assert len(names) == len(set(names)) == 4 == len(res.landed)
    epochs = [EPOCH_NAME.match(n) for n in names]
    assert all(m and m.group(3) == "img.dcm" for m in epochs)
    # Unix time with sub-second precision, close to now.
    assert all(abs(float(f"{m.group(1)}.{m.group(2)}") - time.time()) < 120 for m in epochs if m)


def test_unsettled_files_wait_for_the_next_run(paths: LakePaths) -> None:
    p = drop(paths, "ns/new.dcm", dcm(), age=0)
    res = organise(paths, settings(paths), DAY, now=time.time())
    assert (res.unsettled, res.landed) == (1, []) and p.exists()
    res = organise(paths, settings(paths), DAY, now=time.time() + 10)
    assert len(res.landed) == 1 and not p.exists()


def test_non_dicom_dcm_goes_to_failed_with_an_error_record(paths: LakePaths) -> None:
    content = b"PATIENT^SECRET not a dicom file"
    src = drop(paths, "ns/sub/bad.dcm", content)
    res = organise(paths, settings(paths), DAY, now=time.time())
    [failed] = res.failed
    fp = Path(failed.failed_path)
    assert fp.parent == paths.failed_dir("ns", DAY) / "sub" and strip_epoch(fp.name) == "bad.dcm"
    assert fp.read_bytes() == content and not src.exists()
    raw = Path(failed.error_json_path).read_text()
    rec = json.loads(raw)
    assert {"stage", "errorClass", "message", "originalPath", "detectedAt"} <= rec.keys()
    assert (rec["stage"], rec["errorClass"], rec["originalPath"]) == ("organise", "NotDicom", str(src))
    assert datetime.fromisoformat(rec["detectedAt"].replace("Z", "+00:00")).tzinfo == UTC
    assert "SECRET" not in raw  # no content (PHI) in records
    assert failed.sha256 == sha(content) and failed.size == len(content)


def test_zip_members_land_in_the_zip_folder_and_the_zip_is_deleted(paths: LakePaths) -> None:
    ct, mr, rt = dcm("CT_small.dcm"), dcm("MR_small.dcm"), dcm("rtplan.dcm")
    inner = make_zip([("rt.dcm", rt)])
    zp = drop(
        paths,
        "ns/sub/batch.zip",
        make_zip([("x/y/ct.dcm", ct), ("mr", mr), ("README.txt", b"r"), ("bad.dcm", b"nope"), ("in/inner.zip", inner)]),
    )
    res = organise(paths, settings(paths), DAY, now=time.time())
    assert not zp.exists()
    landed = {strip_epoch(k): sha(v) for k, v in files_under(paths.process_dir("ns", DAY)).items()}
    assert landed == {"sub/ct.dcm": sha(ct), "sub/mr": sha(mr), "sub/rt.dcm": sha(rt)}
    origins = sorted(r.original_path.removeprefix(str(zp)) for r in res.landed)
    assert origins == ["!in/inner.zip!rt.dcm", "!mr", "!x/y/ct.dcm"]
    [failed] = res.failed
    assert failed.original_path == f"{zp}!bad.dcm" and failed.error_class == "NotDicom"
    assert Path(failed.failed_path).read_bytes() == b"nope"
    assert Path(failed.failed_path).parent == paths.failed_dir("ns", DAY) / "sub"
    assert res.skipped_members == 1
    assert not any((paths.state_dir / "organise" / "staging").iterdir())


def test_zip_without_dicom_stays_in_ingest(paths: LakePaths) -> None:
    zp = drop(paths, "ns/report.docx", make_zip([("word/document.xml", b"<x/>")]))
    res = organise(paths, settings(paths), DAY, now=time.time())
    assert zp.exists() and res.ignored == 1 and not res.failed and not res.landed


def test_named_zip_that_is_not_a_zip_fails(paths: LakePaths) -> None:
    drop(paths, "ns/fake.zip", b"just text")
    [failed] = organise(paths, settings(paths), DAY, now=time.time()).failed
    assert failed.error_class == "CorruptZip"


def test_a_zip_with_one_unreadable_member_lands_the_good_ones_and_fails_whole(paths: LakePaths) -> None:
    ct = dcm()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("good.dcm", ct)
        zf.writestr("broken.dcm", ct)
    data = bytearray(buf.getvalue())
    data[data.index(b"broken.dcm") + 400] ^= 0xFF  # CRC error in the second member only
    zp = drop(paths, "ns/z.zip", bytes(data))
    res = organise(paths, settings(paths), DAY, now=time.time())
    [landed] = res.landed
    assert Path(landed.process_path).read_bytes() == ct and landed.original_path.endswith("z.zip!good.dcm")
    [failed] = res.failed
    assert failed.error_class == "CorruptZip" and "broken.dcm" in failed.message and not zp.exists()
    assert Path(failed.failed_path).read_bytes() == bytes(data)  # the archive is kept whole
    assert not any((paths.state_dir / "organise" / "staging").iterdir())


def test_a_refused_zip_publishes_none_of_its_members(paths: LakePaths) -> None:
    ct = dcm()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("good.dcm", ct)
        zf.writestr("../escape.dcm", ct)
    zp = drop(paths, "ns/z.zip", buf.getvalue())
    res = organise(paths, settings(paths), DAY, now=time.time())
    assert not res.landed and not paths.process_dir("ns", DAY).exists()
    [failed] = res.failed
    assert failed.error_class == "ZipSlip" and not zp.exists()
    assert not any((paths.state_dir / "organise" / "staging").iterdir())


def test_landed_journal_survives_compression_and_falls_back_without_it(paths: LakePaths) -> None:
    ct = dcm()
    drop(paths, "ns/s/a.dcm", ct)
    [rec] = organise(paths, settings(paths), DAY, now=time.time()).landed
    index = load_landed(paths, "ns", DAY)
    assert index[rec.process_path] == rec
    # The metastore step compresses <file> to <file>.zip with one member.
    zpath = Path(rec.process_path + ".zip")
    zpath.write_bytes(make_zip([(Path(rec.process_path).name, ct)]))
    os.unlink(rec.process_path)
    assert index[str(zpath)] == rec and str(zpath) in index
    [listed] = list_process_files(paths, DAY)
    assert listed.process_path == str(zpath)
    assert (listed.original_path, listed.sha256, listed.mtime) == (rec.original_path, rec.sha256, rec.mtime)
    # Without the journal the lineage is derived from the name.
    for j in (paths.state_dir / "organised").rglob("*.jsonl"):
        j.unlink()
    [derived] = list_process_files(paths, DAY)
    assert derived.process_path == str(zpath)
    assert derived.original_path == str(paths.ingest_root / "ns" / "s" / "a.dcm")
    assert derived.source_system == "ns" and derived.sha256 is None


def test_list_failed_rebuilds_failure_rows(paths: LakePaths) -> None:
    drop(paths, "ns/a.dcm", b"text")
    drop(paths, "other/b.zip", b"PK\x03\x04broken")
    res = organise(paths, settings(paths), DAY, now=time.time())
    listed = list_failed(paths, DAY)
    assert sorted(listed, key=lambda f: f.failed_path) == sorted(res.failed, key=lambda f: f.failed_path)
    assert [f.source_system for f in sorted(listed, key=lambda f: f.source_system)] == ["ns", "other"]
    assert set(listed[0].as_row()) == set(FAILURES_SCHEMA.names)
    assert list_failed(paths, "2024/03/06") == []


def test_move_to_failed_is_durable_and_idempotent(paths: LakePaths) -> None:
    ct = dcm()
    drop(paths, "ns/s/a.dcm", ct)
    [rec] = organise(paths, settings(paths), DAY, now=time.time()).landed
    kw = dict(
        ns="ns",
        day=DAY,
        original_path=rec.original_path,
        stage="metastore",
        error_class="MissingUid",
        message="no SOPInstanceUID (0008,0018)",
    )
    first = move_to_failed(paths, Path(rec.process_path), **kw)  # type: ignore[arg-type]
    target = paths.failed_dir("ns", DAY) / Path(rec.process_path).relative_to(paths.process_dir("ns", DAY))
    assert first.failed_path == str(target) and target.read_bytes() == ct
    assert not Path(rec.process_path).exists() and list_process_files(paths, DAY) == []
    again = move_to_failed(paths, Path(rec.process_path), **kw)  # type: ignore[arg-type]
    assert again == first  # detectedAt kept
    # A crash after a cross-filesystem copy left both: the call completes the move.
    Path(rec.process_path).write_bytes(ct)
    assert move_to_failed(paths, Path(rec.process_path), **kw) == first  # type: ignore[arg-type]
    assert not Path(rec.process_path).exists() and target.read_bytes() == ct
    assert [f.failed_path for f in list_failed(paths, DAY)] == [str(target)]


def test_rerun_changes_nothing(paths: LakePaths) -> None:
    drop(paths, "ns/a.dcm", dcm())
    drop(paths, "ns/z.zip", make_zip([("b.dcm", dcm("MR_small.dcm"))]))
    drop(paths, "ns/README", b"x")
    organise(paths, settings(paths), DAY, now=time.time())
    before = files_under(paths.files)
    res = organise(paths, settings(paths), DAY, now=time.time())
    assert (res.landed, res.failed, res.ignored) == ([], [], 1)
    assert files_under(paths.files) == before
    assert len(load_landed(paths, "ns", DAY)) == 2


def test_settled_candidates_and_fingerprint(paths: LakePaths) -> None:
    a = drop(paths, "ns/a.dcm", b"1")
    b = drop(paths, "b.dcm", b"2")
    drop(paths, "ns/fresh.dcm", b"3", age=0)
    drop(paths, "ns/.hidden", b"4")
    files, unsettled = settled_candidates(paths, settings(paths), time.time())
    assert sorted(files) == sorted([a, b]) and unsettled == 1
    fp = ingest_fingerprint(files)
    assert fp == ingest_fingerprint(list(reversed(files)))
    a.write_bytes(b"11")
    os.utime(a, (time.time() - 60, time.time() - 60))
    assert ingest_fingerprint(files) != fp


def test_namespaces_setting_limits_the_scan(paths: LakePaths) -> None:
    drop(paths, "keep/a.dcm", dcm())
    other = drop(paths, "skip/b.dcm", dcm())
    res = organise(paths, settings(paths, namespaces=("keep",)), DAY, now=time.time())
    assert [r.source_system for r in res.landed] == ["keep"] and other.exists()


@pytest.mark.parametrize("bad", ["2024-03-05", "../../etc", "2024/03/05/..", ""])
def test_partition_key_is_validated(paths: LakePaths, bad: str) -> None:
    with pytest.raises(ValueError):
        organise(paths, settings(paths), bad)


def test_an_io_error_keeps_the_plan_and_the_next_run_finishes_it(
    paths: LakePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_assets.lake import fileops

    ct, mr = dcm("CT_small.dcm"), dcm("MR_small.dcm")
    zp = drop(paths, "ns/z.zip", make_zip([("a.dcm", ct), ("b.dcm", mr)]))
    real = fileops.durable_move
    calls = {"n": 0}

    def flaky(src: Path, dst: Path, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fileops, "durable_move", flaky)
    first = organise(paths, settings(paths), DAY, now=time.time())
    assert len(first.landed) == 1 and first.deferred == 1 and zp.exists()
    assert len(list((paths.state_dir / "organise" / "intents").iterdir())) == 1
    monkeypatch.setattr(fileops, "durable_move", real)
    second = organise(paths, settings(paths), DAY, now=time.time())
    assert (len(second.landed), second.recovered, second.deferred) == (1, 1, 0)
    assert not zp.exists() and not any((paths.state_dir / "organise" / "intents").iterdir())
    assert sorted(sha(v) for v in files_under(paths.process_dir("ns", DAY)).values()) == sorted([sha(ct), sha(mr)])
    assert len(load_landed(paths, "ns", DAY)) == 2
    journal = (paths.state_dir / "organised" / "ns" / "2024-03-05.jsonl").read_text().splitlines()
    assert len(journal) == 2


@pytest.mark.parametrize("mode", ["syncfs", "fsync"])
def test_staged_members_that_cannot_be_synced_leave_their_batch_in_ingest(
    paths: LakePaths, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The plan syncs its staged ZIP members before its intent; an I/O error there moves nothing.

    ``syncfs``: one sync of the filesystem for the batch; ``fsync``: the
    fallback where there is none, each member on its own.
    """
    from dicom_assets.lake import fileops, fssync

    ct, mr = dcm("CT_small.dcm"), dcm("MR_small.dcm")
    zp = drop(paths, "ns/z.zip", make_zip([("a.dcm", ct)]))
    loose = drop(paths, "ns/loose.dcm", mr)
    real, real_syncfs = fileops.fsync_file, fssync._syncfs
    staging = str(paths.state_dir / "organise" / "staging")
    synced: list[str] = []

    def failing(path: str) -> BaseException | None:
        synced.append(str(path))
        return OSError(5, "Input/output error") if str(path).startswith(staging) else real(path)

    def failing_syncfs(fd: int) -> int:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        ctypes.set_errno(5)
        return -1

    if mode == "fsync":
        monkeypatch.setattr(fssync, "_syncfs", None)
        monkeypatch.setattr(fileops, "fsync_file", failing)
    elif not fssync.syncfs_available():
        pytest.skip("no syncfs with error reporting here (Linux >= 5.8)")
    else:
        monkeypatch.setattr(fssync, "_syncfs", failing_syncfs)
    first = organise(paths, settings(paths, batch_size=64), DAY, now=time.time())
    assert any(p.startswith(staging) for p in synced), synced
    assert (first.landed, first.failed, first.deferred) == ([], [], 2)
    assert zp.exists() and loose.exists() and not paths.process_dir("ns", DAY).exists()
    assert not (paths.state_dir / "organise" / "intents").exists()  # no intent was ever written
    assert not any((paths.state_dir / "organise" / "staging").iterdir())
    monkeypatch.setattr(fileops, "fsync_file", real)
    monkeypatch.setattr(fssync, "_syncfs", real_syncfs)
    second = organise(paths, settings(paths, batch_size=64), DAY, now=time.time())
    assert (len(second.landed), second.deferred) == (2, 0) and not zp.exists() and not loose.exists()
    assert sorted(sha(v) for v in files_under(paths.process_dir("ns", DAY)).values()) == sorted([sha(ct), sha(mr)])


def test_dcm_named_zip_without_dicom_fails(paths: LakePaths) -> None:
    drop(paths, "ns/odd.dcm", make_zip([("notes.txt", b"x")]))
    [failed] = organise(paths, settings(paths), DAY, now=time.time()).failed
    assert failed.error_class == "NotDicom"


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_emptied_folders_are_pruned_once_settled(paths: LakePaths) -> None:
    """Folders left empty go (deepest first) once older than the settle time; others stay."""
    drop(paths, "ns/study1/series1/a.dcm", dcm())
    drop(paths, "ns/study2/b.dcm", dcm())
    drop(paths, "ns/keep/notes.txt", b"not dicom")
    fresh = paths.ingest_root / "ns" / "fresh_copy"
    fresh.mkdir()
    first = organise(paths, settings(paths), DAY)
    assert len(first.landed) == 2
    # The emptied folders changed just now (the moves): kept within the settle time.
    assert (paths.ingest_root / "ns" / "study1" / "series1").is_dir()
    for d in ("study1/series1", "study1", "study2", "fresh_copy", "keep"):
        _age(paths.ingest_root / "ns" / d, 60)
    organise(paths, settings(paths), DAY)
    left = sorted(str(p.relative_to(paths.ingest_root)) for p in paths.ingest_root.rglob("*"))
    assert left == ["ns", "ns/keep", "ns/keep/notes.txt"]


def test_a_folder_just_created_for_a_copy_is_kept(paths: LakePaths) -> None:
    empty = paths.ingest_root / "ns" / "incoming"
    empty.mkdir(parents=True)
    organise(paths, settings(paths), DAY)
    assert empty.is_dir()
    organise(paths, Settings(lake=str(paths.root), settle_seconds=0), DAY)
    assert not empty.exists() and (paths.ingest_root / "ns").is_dir()
