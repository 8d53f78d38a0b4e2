"""extract_batch / extract_batch_arrow: lineage, failure records, durable compression (SPEC §3.2, §6)."""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import shutil
import subprocess
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import dicom_assets.dicom.compress as compress_mod
import dicom_assets.dicom.extract as extract_mod
from dicom_assets.dicom.extract import extract_batch, extract_batch_arrow
from dicom_assets.dicom.records import ExtractTask
from dicom_assets.lake import fssync
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
MTIME = 1_700_000_000.25


def dicom_bytes(sop: str = "1.2.3.4.5", name: str = "Doe^Jane") -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientName = name
    ds.BitsAllocated = 8
    ds.Rows, ds.Columns = 4, 4
    ds.PixelData = bytes(range(16)) * 100
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def task(path: Path, *, compress: bool = False, member: str | None = None, file_path: str | None = None) -> ExtractTask:
    return ExtractTask(
        path=str(path),
        file_path=file_path or (str(path) + ".zip" if compress else str(path)),
        original_path=f"/ingest/{path.name}",
        source_system="ns1",
        ingest_date="2024/05/06",
        source_modified_at=MTIME,
        member=member,
    )


def test_rows_carry_lineage_and_content_facts(tmp_path: Path) -> None:
    data = dicom_bytes()
    f = tmp_path / "a.dcm"
    f.write_bytes(data)
    rows, failures = extract_batch([task(f)], now=NOW)
    assert failures == []
    (row,) = rows
    assert set(row) == set(METASTORE_SCHEMA.names)
    assert row["filePath"] == str(f)
    assert row["originalPath"] == "/ingest/a.dcm"
    assert (row["sourceSystem"], row["ingestDate"]) == ("ns1", "2024/05/06")
    assert row["sourceModifiedAt"] == datetime.fromtimestamp(MTIME, tz=UTC)
    assert row["createdDatetime"] == NOW
    assert row["fileSize"] == len(data) and row["contentSha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads(row["metadata_string"])["7FE00010"]["BulkDataURI"] == f"{f}#7FE00010"


def test_compression_replaces_the_file_by_a_single_member_zip(tmp_path: Path) -> None:
    data = dicom_bytes()
    f = tmp_path / "1700000000.1_b.dcm"
    f.write_bytes(data)
    rows, failures = extract_batch([task(f, compress=True)], now=NOW)
    assert failures == [] and len(rows) == 1
    z = Path(str(f) + ".zip")
    assert not f.exists() and z.exists()
    assert not Path(str(z) + ".part").exists()
    with zipfile.ZipFile(z) as zf:
        (info,) = zf.infolist()
        assert info.filename == f.name and info.compress_type == zipfile.ZIP_DEFLATED
        assert zf.read(info) == data
    assert rows[0]["filePath"] == str(z)
    assert json.loads(rows[0]["metadata_string"])["7FE00010"]["BulkDataURI"] == f"{z}#7FE00010"
    assert rows[0]["contentSha256"] == hashlib.sha256(data).hexdigest()


def test_rerun_after_compression_reads_the_zip(tmp_path: Path) -> None:
    data = dicom_bytes()
    f = tmp_path / "c.dcm"
    f.write_bytes(data)
    first, _ = extract_batch([task(f, compress=True)], now=NOW)
    again, failures = extract_batch([task(f, compress=True)], now=NOW)
    assert failures == []
    assert again[0]["metadata_string"] == first[0]["metadata_string"]
    assert again[0]["contentSha256"] == first[0]["contentSha256"]
    assert not f.exists() and Path(str(f) + ".zip").exists()


def test_crash_between_rename_and_unlink_converges(tmp_path: Path) -> None:
    data = dicom_bytes()
    f = tmp_path / "d.dcm"
    f.write_bytes(data)
    z = Path(str(f) + ".zip")
    with zipfile.ZipFile(z, "w") as zf:  # a complete zip and the original both present
        zf.writestr(f.name, data)
    Path(str(z) + ".part").write_bytes(b"stale partial zip")
    rows, failures = extract_batch([task(f, compress=True)], now=NOW)
    assert failures == [] and len(rows) == 1
    assert not f.exists() and not Path(str(z) + ".part").exists()
    assert zipfile.ZipFile(z).read(f.name) == data


def test_member_of_a_dcm_zip_is_read_in_memory(tmp_path: Path) -> None:
    data = dicom_bytes()
    z = tmp_path / "e.dcm.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("e.dcm", data)
    rows, failures = extract_batch([task(z, member="e.dcm")], now=NOW)
    assert failures == []
    assert rows[0]["filePath"] == str(z) and rows[0]["fileSize"] == len(data)
    assert z.exists()


def test_failures_never_stop_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.dcm"
    good.write_bytes(dicom_bytes("1.1"))
    text = tmp_path / "notes.dcm"
    text.write_bytes(b"just some text that is not DICOM\n")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(dicom_bytes("1.2")[:-100])
    gone = tmp_path / "gone.dcm"
    boom = tmp_path / "boom.dcm"
    boom.write_bytes(dicom_bytes("1.3", name="Secret^Patient"))

    real = extract_mod.extract_dataset

    def flaky(data: bytes, **kw: Any) -> dict[str, Any]:
        if b"Secret^Patient" in data:
            raise RuntimeError("value Secret^Patient leaked")
        return real(data, **kw)

    monkeypatch.setattr(extract_mod, "extract_dataset", flaky)
    tasks = [task(p, compress=True) for p in (good, text, cut, gone, boom)]
    rows, failures = extract_batch(tasks, now=NOW)
    assert [r["sopInstanceUid"] for r in rows] == ["1.1"]
    by_path = {Path(f["filePath"]).name: f for f in failures}
    assert {k: v["errorClass"] for k, v in by_path.items()} == {
        "notes.dcm": "NotDicom",
        "cut.dcm": "Truncated",
        "gone.dcm": "FileNotFound",
        "boom.dcm": "InternalError",
    }
    for f in failures:
        assert set(f) == set(FAILURES_SCHEMA.names)
        assert f["stage"] == "extract" and f["detectedAt"] == NOW and f["sourceSystem"] == "ns1"
        assert "Secret" not in f["message"]
    assert by_path["cut.dcm"]["fileSize"] == cut.stat().st_size
    assert by_path["gone.dcm"]["fileSize"] is None
    # Failed files are left in place, uncompressed, for the caller to move.
    assert text.exists() and cut.exists() and boom.exists()
    assert not Path(str(text) + ".zip").exists()


def test_compression_failure_keeps_the_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "f.dcm"
    f.write_bytes(dicom_bytes())

    def disk_full(*a: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compress_mod, "write_zip_durably", disk_full)
    rows, failures = extract_batch([task(f, compress=True)], now=NOW)
    assert rows == []
    assert failures[0]["stage"] == "compress" and failures[0]["errorClass"] == "Unreadable"
    assert f.exists()


def test_arrow_tables_have_exactly_the_schemas(tmp_path: Path) -> None:
    good = tmp_path / "g.dcm"
    good.write_bytes(dicom_bytes())
    bad = tmp_path / "h.dcm"
    bad.write_bytes(b"")
    rows, fails = extract_batch_arrow([task(good), task(bad)], now=NOW)
    assert rows.schema == METASTORE_SCHEMA and fails.schema == FAILURES_SCHEMA
    assert rows.num_rows == 1 and fails.num_rows == 1
    assert rows.column("createdDatetime").type == pa.timestamp("us", tz="UTC")
    empty_rows, empty_fails = extract_batch_arrow([], now=NOW)
    assert empty_rows.schema == METASTORE_SCHEMA and empty_rows.num_rows == 0
    assert empty_fails.schema == FAILURES_SCHEMA


def _record_file_ops(monkeypatch: pytest.MonkeyPatch, mode: str = "fsync") -> list[str]:
    """The names of the fsync/syncfs/replace/unlink calls made from now on, in order.

    ``mode``: ``"syncfs"`` (a batch's ZIPs made durable by one syncfs of
    their filesystem; skipped where there is none) or ``"fsync"`` (the
    fallback: each ZIP, then each folder).
    """
    calls: list[str] = []
    for name in ("fsync", "replace", "unlink"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _n=name, _f=real: (calls.append(_n), _f(*a))[1])
    if mode == "fsync":
        monkeypatch.setattr(fssync, "_syncfs", None)
    else:
        if not fssync.syncfs_available():
            pytest.skip("no syncfs with error reporting here (Linux >= 5.8)")
        real_syncfs = fssync._syncfs
        monkeypatch.setattr(fssync, "_syncfs", lambda fd: (calls.append("syncfs"), real_syncfs(fd))[1])
    return calls


@pytest.mark.parametrize("mode", ["syncfs", "fsync"])
def test_zip_write_is_durable_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The ZIP's data and its folder entry are synced after the rename and before the original is unlinked."""
    calls = _record_file_ops(monkeypatch, mode)
    f = tmp_path / "i.dcm"
    f.write_bytes(dicom_bytes())
    extract_batch([task(f, compress=True)], now=NOW)
    assert calls.index("replace") < calls.index("unlink")
    between = calls[calls.index("replace") + 1 : calls.index("unlink")]
    if mode == "syncfs":
        assert between == ["syncfs"], "the filesystem: file data and folder entries at once"
    else:
        assert between.count("fsync") == 2, "file, then folder"


@pytest.mark.parametrize("mode", ["syncfs", "fsync"])
def test_a_batch_syncs_its_zips_together_and_each_folder_once_per_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Every ZIP renamed and synced, and its folder synced, before any original is unlinked."""
    calls = _record_file_ops(monkeypatch, mode)
    files = []
    for i in range(5):
        f = tmp_path / f"b{i}.dcm"
        f.write_bytes(dicom_bytes())
        files.append(f)
    rows, failures = extract_batch([task(f, compress=True) for f in files], now=NOW)
    assert len(rows) == 5 and failures == []
    last_replace = max(i for i, c in enumerate(calls) if c == "replace")
    first_unlink = calls.index("unlink")
    assert last_replace < first_unlink
    if mode == "syncfs":
        assert calls[last_replace + 1 : first_unlink] == ["syncfs"]  # one for the whole batch
        assert calls.count("syncfs") == 1
    else:
        assert calls[last_replace:first_unlink].count("fsync") == 5 + 1  # each ZIP's data, then the folder
    assert calls[first_unlink:].count("fsync") == 1  # the folder after the unlinks
    assert all(not f.exists() and Path(str(f) + ".zip").exists() for f in files)


def test_a_zip_that_cannot_be_synced_keeps_its_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync failing (an I/O error) for one ZIP: that file is a compress failure, its original stays, its ZIP goes."""
    files = []
    for i in range(3):
        f = tmp_path / f"s{i}.dcm"
        f.write_bytes(dicom_bytes())
        files.append(f)
    from dicom_assets.lake import fileops

    real = fileops.fsync_file

    def flaky(path: str) -> BaseException | None:
        return OSError(5, "Input/output error") if str(path).endswith("s1.dcm.zip") else real(path)

    monkeypatch.setattr(fssync, "_syncfs", None)
    monkeypatch.setattr(fileops, "fsync_file", flaky)
    rows, failures = extract_batch([task(f, compress=True) for f in files], now=NOW)
    assert len(rows) == 2 and [f["stage"] for f in failures] == ["compress"]
    assert files[1].exists() and not Path(str(files[1]) + ".zip").exists()
    assert not files[0].exists() and Path(str(files[0]) + ".zip").exists()


def test_a_failed_syncfs_keeps_every_original_of_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """syncfs cannot say which file it could not write: every ZIP of the batch goes, every original stays."""
    if not fssync.syncfs_available():
        pytest.skip("no syncfs with error reporting here (Linux >= 5.8)")
    files = []
    for i in range(3):
        f = tmp_path / f"e{i}.dcm"
        f.write_bytes(dicom_bytes())
        files.append(f)

    def failing(fd: int) -> int:
        ctypes.set_errno(5)
        return -1

    monkeypatch.setattr(fssync, "_syncfs", failing)
    rows, failures = extract_batch([task(f, compress=True) for f in files], now=NOW)
    assert rows == [] and [f["stage"] for f in failures] == ["compress"] * 3
    assert all("Input/output error" in f["message"] for f in failures), failures
    assert all(f.exists() and not Path(str(f) + ".zip").exists() for f in files)


def test_big_files_are_memory_mapped_with_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = dicom_bytes()
    a, b = tmp_path / "j.dcm", tmp_path / "k.dcm"
    a.write_bytes(data)
    b.write_bytes(data)
    (read_row,), _ = extract_batch([task(a)], now=NOW)
    monkeypatch.setattr(extract_mod, "MMAP_MIN_BYTES", 1)
    (mapped_row,), failures = extract_batch([task(b, compress=True)], now=NOW)
    assert failures == []
    assert mapped_row["contentSha256"] == read_row["contentSha256"]
    assert json.loads(mapped_row["metadata_string"])["00100010"] == json.loads(read_row["metadata_string"])["00100010"]
    assert zipfile.ZipFile(str(b) + ".zip").read(b.name) == data


@pytest.mark.parametrize("name", ["CT_small.dcm", "ünïcode name.dcm"])
def test_isal_zip_is_a_valid_zip_with_the_same_member_as_zipfiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The hand-assembled one-member ZIP reads back through zipfile exactly as zipfile's own would."""
    if compress_mod._isal is None:
        pytest.skip("isal not installed")
    data = dicom_bytes() * 3
    ours, theirs = tmp_path / "ours.zip", tmp_path / "theirs.zip"
    compress_mod.write_zip_durably(data, name, str(ours), mtime=1_700_000_001)
    monkeypatch.setattr(compress_mod, "_isal", None)
    compress_mod.write_zip_durably(data, name, str(theirs), mtime=1_700_000_001)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.testzip() is None
        (ia,), (ib,) = a.infolist(), b.infolist()
        assert (ia.filename, ia.date_time, ia.file_size, ia.CRC, ia.compress_type, ia.flag_bits & 0x800) == (
            ib.filename, ib.date_time, ib.file_size, ib.CRC, ib.compress_type, ib.flag_bits & 0x800
        )
        assert a.read(name) == data == b.read(name)
        assert ia.external_attr == ib.external_attr
    assert compress_mod.read_single_member(str(ours)) == data
    if shutil.which("unzip"):  # an independent reader (Info-ZIP), where installed
        assert subprocess.run(["unzip", "-tq", str(ours)], capture_output=True).returncode == 0


def test_deferred_removal_unlinks_after_the_zips_are_durable_and_settles_on_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """defer_removal: the batch returns before its originals go; settle_removals waits for them, order kept."""
    import threading

    calls = _record_file_ops(monkeypatch)
    release = threading.Event()
    real_remove = compress_mod._remove_originals

    def held(paths: list[str], folders: list[str]) -> None:
        assert release.wait(10)
        real_remove(paths, folders)

    monkeypatch.setattr(compress_mod, "_remove_originals", held)
    files = []
    for i in range(4):
        f = tmp_path / f"d{i}.dcm"
        f.write_bytes(dicom_bytes())
        files.append(f)
    rows, failures = extract_batch([task(f, compress=True) for f in files], now=NOW, defer_removal=True)
    assert len(rows) == 4 and failures == []
    # Returned with every ZIP durable and every original still there.
    assert all(f.exists() and Path(str(f) + ".zip").exists() for f in files)
    assert "unlink" not in calls and calls.count("fsync") == 4 + 1
    release.set()
    compress_mod.settle_removals()
    assert all(not f.exists() and Path(str(f) + ".zip").exists() for f in files)
    assert calls[calls.index("unlink") :].count("fsync") == 1  # the folder, after the unlinks
    compress_mod.settle_removals()  # nothing pending: returns at once


def test_a_deferred_removal_error_is_raised_by_settle_and_the_original_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unlink failing in the background (not 'already gone') surfaces at settle_removals."""
    f, g = tmp_path / "keep.dcm", tmp_path / "gone.dcm"
    f.write_bytes(dicom_bytes())
    g.write_bytes(dicom_bytes(sop="1.2.3.4.6"))
    real_unlink = os.unlink

    def unlink(path: Any, *a: Any, **k: Any) -> None:
        if str(path).endswith("keep.dcm"):
            raise OSError(5, "Input/output error")
        real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", unlink)
    rows, failures = extract_batch([task(f, compress=True), task(g, compress=True)], now=NOW, defer_removal=True)
    assert len(rows) == 2 and failures == []
    with pytest.raises(OSError, match="Input/output error"):
        compress_mod.settle_removals()
    assert f.exists() and Path(str(f) + ".zip").exists()  # a re-run reads it again
    assert not g.exists()
    compress_mod.settle_removals()  # reported once
