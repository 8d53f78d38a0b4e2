"""The reader's per-file budget (SPEC §6): pathological files fail with a reason, never hang or blow up.

Hostile structures are written byte by byte after PS3.5 (§7.1 element
encoding, §7.5 sequences and items, A.5 deflate) on top of a valid file that
pydicom writes, so what each file contains is known independently of the
reader under test.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import signal
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

import dicom_assets.dicom.extract as extract_mod
from dicom_assets.config import Settings
from dicom_assets.dicom.budget import Budget, ReadLimits
from dicom_assets.dicom.extract import extract_batch, extract_batch_arrow, extract_dataset
from dicom_assets.dicom.records import DicomReadError, ExtractTask
from dicom_assets.engines.helper import init_worker

NOW = datetime(2024, 5, 6, tzinfo=UTC)
SOP = "1.2.826.0.1.3680043.8.498.1"
UNDEFINED = 0xFFFFFFFF
PS35_VRS = set(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


# --------------------------------------------------------------------------- builders (PS3.5)


def base_file(ts: str = ExplicitVRLittleEndian, **elements: Any) -> bytes:
    """A small valid Part 10 file written by pydicom."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = SOP
    ds.StudyInstanceUID = SOP + ".1"
    ds.SeriesInstanceUID = SOP + ".2"
    ds.PatientName = "Budget^Test"
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = SOP
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def element(tag: int, vr: str, value: bytes = b"", length: int | None = None) -> bytes:
    """One explicit VR little endian element (PS3.5 §7.1.2); ``length`` overrides the real one."""
    n = len(value) if length is None else length
    g, e = tag >> 16, tag & 0xFFFF
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", g, e, vr.encode(), 0, n) + value
    return struct.pack("<HH2sH", g, e, vr.encode(), n) + value


def implicit(tag: int, value: bytes = b"", length: int | None = None) -> bytes:
    """One implicit VR little endian element, or an item / delimiter (PS3.5 §7.1.3, §7.5)."""
    n = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, n) + value


ITEM = implicit(0xFFFEE000, length=UNDEFINED)
ITEM_DELIM = implicit(0xFFFEE00D, length=0)
SEQ_DELIM = implicit(0xFFFEE0DD, length=0)
EMPTY_ITEM = implicit(0xFFFEE000, length=0)
CONTENT_SEQ = 0x0040A730


def nested(depth: int, *, terminated: bool = True) -> bytes:
    """``depth`` Content Sequences, each of undefined length inside an undefined-length item."""
    opened = (element(CONTENT_SEQ, "SQ", length=UNDEFINED) + ITEM) * depth
    return opened + ((ITEM_DELIM + SEQ_DELIM) * depth if terminated else b"")


def nested_defined(depth: int) -> bytes:
    """The same nesting with defined lengths throughout."""
    inner = b""
    for _ in range(depth):
        item = implicit(0xFFFEE000, inner)
        inner = element(CONTENT_SEQ, "SQ", item)
    return inner


def item_flood(n: int) -> bytes:
    """One undefined-length sequence of ``n`` empty items (8 bytes each), delimited."""
    return element(CONTENT_SEQ, "SQ", length=UNDEFINED) + EMPTY_ITEM * n + SEQ_DELIM


def deflated_file(dataset: bytes) -> bytes:
    """A Deflated Explicit VR Little Endian file (PS3.5 A.5) whose dataset is ``dataset``."""
    full = base_file(DeflatedExplicitVRLittleEndian)
    group_length = struct.unpack_from("<L", full, 132 + 8)[0]  # (0002,0000) UL: 12-byte element
    meta = full[: 132 + 12 + group_length]
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return meta + z.compress(dataset) + z.flush()


def uid_elements() -> bytes:
    return element(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.7\x00") + element(0x00080018, "UI", SOP.encode())


def error_of(data: bytes, **limits: Any) -> DicomReadError:
    with pytest.raises(DicomReadError) as info:
        extract_dataset(data, bulk_data_uri="f.dcm", budget=Budget.start(ReadLimits(**limits)))
    return info.value


def task(path: Path, **kw: Any) -> ExtractTask:
    return ExtractTask(str(path), str(path), f"/in/{path.name}", "ns", "2024/05/06", 1.7e9, **kw)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------- nesting


@pytest.mark.parametrize("terminated", [True, False])
def test_deep_nesting_is_too_deep_and_quick(terminated: bool) -> None:
    data = base_file() + nested(100_000, terminated=terminated)  # 3.6 MB, would overflow the stack
    t = time.monotonic()
    err = error_of(data)
    assert err.error_class == "TooDeep" and "64" in err.message
    assert time.monotonic() - t < 1.0


def test_nesting_within_the_limit_reads_like_pydicom() -> None:
    data = base_file() + nested_defined(60)
    model = json.loads(extract_dataset(data, bulk_data_uri="f.dcm")["metadata_string"])
    ds = pydicom.dcmread(io.BytesIO(data))
    depth, ours, theirs = 0, model, ds
    while "0040A730" in ours:
        ours = ours["0040A730"]["Value"][0]
        theirs = theirs.ContentSequence[0]
        depth += 1
    assert depth == 60 and "ContentSequence" not in theirs


def test_depth_limit_is_a_setting_of_the_budget() -> None:
    data = base_file() + nested_defined(10)
    assert error_of(data, max_depth=9).error_class == "TooDeep"
    extract_dataset(data, bulk_data_uri="f", budget=Budget.start(ReadLimits(max_depth=10)))


# --------------------------------------------------------------------------- lengths and values


@pytest.mark.parametrize(
    ("el", "cls"),
    [
        (element(0x00111010, "UT", b"abcd", length=0xFFFFFFFE), "Truncated"),  # 4 GiB declared, 4 bytes there
        (element(0x00111010, "OB", b"abcd", length=0xFFFFFFF0), "Truncated"),
        (element(0x00100020, "LO", b"ab", length=0xFFFF), "Truncated"),
        (element(0x00111010, "OB", b"\x00" * 64, length=UNDEFINED), "Truncated"),  # no delimiter ever
        (element(CONTENT_SEQ, "SQ", ITEM + b"\x00" * 16, length=UNDEFINED), "Truncated"),
    ],
)
def test_declared_lengths_past_the_end_are_truncated(el: bytes, cls: str) -> None:
    err = error_of(base_file() + el)
    assert err.error_class == cls
    assert "abcd" not in err.message


def test_a_huge_decoded_value_is_refused_but_bulk_data_is_not() -> None:
    text = element(0x00111010, "UT", b"a" * 5000)
    assert error_of(base_file() + text, max_value_bytes=4096).error_class == "TooLarge"
    blob = element(0x00111011, "OB", b"\x01" * 5000)
    pixels = element(0x7FE00010, "OW", b"\x02" * 5000)
    row = extract_dataset(
        base_file() + blob + pixels, bulk_data_uri="f", budget=Budget.start(ReadLimits(max_value_bytes=4096))
    )
    model = json.loads(row["metadata_string"])
    assert model["00111011"]["length"] == 5000 and model["7FE00010"]["length"] == 5000


def test_an_inline_value_of_an_undefined_length_element_counts_too() -> None:
    # A Basic Offset Table (first fragment) is not bulk-data length: it must not sneak in inline.
    value = implicit(0xFFFEE000, b"\x00" * 6000) + SEQ_DELIM
    data = base_file() + element(0x00111010, "OB", value, length=UNDEFINED)
    assert error_of(data, max_value_bytes=4096).error_class == "TooLarge"


# --------------------------------------------------------------------------- work and time


@pytest.mark.parametrize(
    "flood",
    [
        item_flood(50_000),
        element(0x00111010, "LO", b"") * 50_000,  # the same empty element again and again
        element(0x00111010, "OB", length=UNDEFINED) + implicit(0xFFFEE000, length=0) * 50_000 + SEQ_DELIM,
    ],
    ids=["empty items", "repeated element", "empty fragments"],
)
def test_floods_hit_the_element_budget(flood: bytes) -> None:
    err = error_of(base_file() + flood, max_elements=20_000)
    assert err.error_class == "TooLarge" and "20000" in err.message


def test_a_slow_file_times_out_within_its_budget() -> None:
    data = base_file() + item_flood(2_000_000)
    t = time.monotonic()
    err = error_of(data, timeout_seconds=0.2, max_elements=10**9)
    assert err.error_class == "Timeout" and "0.2" in err.message
    assert time.monotonic() - t < 1.0


def test_charset_re_reads_at_every_level_stay_bounded() -> None:
    # A Specific Character Set after other elements makes a dataset be read
    # again; at every nesting level that doubles the work (2**depth).
    level = b""
    for i in range(40):
        charset = element(0x00080005, "CS", b"ISO_IR 192" if i % 2 else b"ISO_IR 100")
        item = implicit(0xFFFEE000, element(0x00100010, "PN", b"A^B ") + level + charset)
        level = element(CONTENT_SEQ, "SQ", item)
    data = base_file() + level
    t = time.monotonic()
    err = error_of(data, max_elements=100_000)
    assert err.error_class == "TooLarge"
    assert time.monotonic() - t < 3.0
    assert error_of(data, timeout_seconds=0.3).error_class == "Timeout"


def test_deflate_bomb_is_refused_before_inflating() -> None:
    bomb = deflated_file(uid_elements() + element(0x00111010, "OB", length=64 << 20) + bytes(64 << 20))
    assert len(bomb) < 100_000  # over 650x
    t = time.monotonic()
    err = error_of(bomb)
    assert err.error_class == "TooLarge" and "inflates past" in err.message
    assert time.monotonic() - t < 3.0
    # A ratio as high as a blank image may reach is still read.
    ok = deflated_file(uid_elements() + element(0x00111010, "OB", bytes(100_000)))
    assert json.loads(extract_dataset(ok, bulk_data_uri="f")["metadata_string"])["00111010"]["length"] == 100_000


def test_deflated_stream_that_looks_like_a_vr_is_not_read_as_file_meta() -> None:
    # Bytes right after file meta are deflate output; when bytes 4-5 happen
    # to be two upper-case letters that are no VR (about 1 stream in 100;
    # the fuzz run found one), they must end the meta group, not fail it as
    # an unknown VR. Built here as one stored block (RFC 1951 §3.2.4): byte 0
    # BFINAL/BTYPE, LEN, NLEN, then the dataset, so byte 4 is NLEN's high byte
    # ("Q" for LEN 0xAE00) and byte 5 the dataset's first byte ("Z" of group 005A).
    size = 0xAE00
    head = element(0x005A0010, "LO", b"x ") + uid_elements()
    dataset = head + element(0x00111010, "OB", bytes(size - len(head) - 12))
    assert len(dataset) == size
    stored = struct.pack("<BHH", 1, size, size ^ 0xFFFF) + dataset
    full = base_file(DeflatedExplicitVRLittleEndian)
    meta = full[: 132 + 12 + struct.unpack_from("<L", full, 132 + 8)[0]]
    assert stored[4:6] == b"QZ"
    model = json.loads(extract_dataset(meta + stored, bulk_data_uri="f")["metadata_string"])
    assert model["005A0010"] == {"vr": "LO", "Value": ["x"]}


def test_limits_come_from_the_settings() -> None:
    limits = ReadLimits.from_settings(Settings(max_zip_ratio=5000.0, file_timeout_seconds=7.0, max_file_bytes=1 << 30))
    assert (limits.max_inflate_ratio, limits.timeout_seconds, limits.max_file_bytes) == (5000.0, 7.0, 1 << 30)
    bomb = deflated_file(uid_elements() + element(0x00111010, "OB", length=4 << 20) + bytes(4 << 20))
    assert error_of(bomb).error_class == "TooLarge"
    extract_dataset(bomb, bulk_data_uri="f", budget=Budget.start(limits))


# --------------------------------------------------------------------------- extract_batch


def test_files_over_max_file_bytes_are_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = base_file()
    data = small + element(0x00111010, "OB", bytes(1000))
    big = write(tmp_path, "big.dcm", data)
    ok = write(tmp_path, "ok.dcm", small)
    parsed: list[int] = []
    real = extract_mod.extract_dataset
    monkeypatch.setattr(extract_mod, "extract_dataset", lambda d, **kw: (parsed.append(len(d)), real(d, **kw))[1])
    rows, fails = extract_batch([task(big), task(ok)], now=NOW, limits=ReadLimits(max_file_bytes=len(small)))
    assert [r["filePath"] for r in rows] == [str(ok)] and parsed == [len(small)]
    (f,) = fails
    assert (f["filePath"], f["errorClass"], f["fileSize"], f["contentSha256"]) == (
        str(big),
        "TooLarge",
        len(data),
        None,
    )
    assert f"limit max_file_bytes={len(small)}" in f["message"]


def test_a_dcm_zip_member_over_the_limit_is_refused_by_its_declared_size(tmp_path: Path) -> None:
    data = base_file()
    z = tmp_path / "m.dcm.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m.dcm", data + bytes(100_000))
    rows, fails = extract_batch([task(z, member="m.dcm")], now=NOW, limits=ReadLimits(max_file_bytes=50_000))
    assert not rows and fails[0]["errorClass"] == "TooLarge" and fails[0]["fileSize"] == len(data) + 100_000


def _spin(*_a: Any, **_kw: Any) -> dict[str, Any]:
    while True:  # a reader stuck in Python code that never checks its budget
        pass


def test_the_alarm_stops_code_that_never_checks_and_the_batch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = write(tmp_path, "stuck.dcm", base_file(PatientID="STUCK"))
    ok = write(tmp_path, "ok.dcm", base_file())
    real = extract_mod.extract_dataset

    def maybe_spin(data: bytes, **kw: Any) -> dict[str, Any]:
        return _spin() if b"STUCK" in bytes(data) else real(data, **kw)

    monkeypatch.setattr(extract_mod, "extract_dataset", maybe_spin)
    previous = signal.getsignal(signal.SIGALRM)
    t = time.monotonic()
    rows, fails = extract_batch([task(stuck), task(ok)], now=NOW, limits=ReadLimits(timeout_seconds=0.3))
    assert time.monotonic() - t < 2.0
    assert [f["errorClass"] for f in fails] == ["Timeout"] and len(rows) == 1
    assert fails[0]["fileSize"] == stuck.stat().st_size
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_an_alarm_someone_else_set_is_left_alone(tmp_path: Path) -> None:
    fired: list[int] = []

    def theirs(signum: int, frame: FrameType | None) -> None:
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, theirs)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        f = write(tmp_path, "slow.dcm", base_file() + item_flood(2_000_000))
        rows, fails = extract_batch([task(f)], now=NOW, limits=ReadLimits(timeout_seconds=0.2, max_elements=10**9))
        assert fails[0]["errorClass"] == "Timeout"  # the walker's own clock still applies
        assert signal.getsignal(signal.SIGALRM) is theirs
        assert 25.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


def test_outside_the_main_thread_the_walker_clock_still_applies(tmp_path: Path) -> None:
    f = write(tmp_path, "slow.dcm", base_file() + item_flood(2_000_000))
    out: list[Any] = []
    th = threading.Thread(
        target=lambda: out.append(
            extract_batch([task(f)], now=NOW, limits=ReadLimits(timeout_seconds=0.2, max_elements=10**9))
        )
    )
    th.start()
    th.join(10)
    assert not th.is_alive()
    rows, fails = out[0]
    assert not rows and fails[0]["errorClass"] == "Timeout"


@pytest.mark.parametrize(("exc", "cls"), [(MemoryError(), "TooLarge"), (RecursionError(), "TooDeep")])
def test_memory_and_recursion_errors_become_failure_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException, cls: str
) -> None:
    def boom(*_a: Any, **_kw: Any) -> dict[str, Any]:
        raise exc

    monkeypatch.setattr(extract_mod, "extract_dataset", boom)
    f = write(tmp_path, "a.dcm", base_file())
    rows, fails = extract_batch([task(f)], now=NOW)
    assert not rows and fails[0]["errorClass"] == cls


def test_non_utf8_file_names_give_valid_path_columns(tmp_path: Path) -> None:
    raw = bytes(tmp_path) + b"/caf\xe9 \xff.dcm"
    with open(raw, "wb") as fh:
        fh.write(base_file())
    bad = tmp_path / "caf\xe9.dcm"  # named like the first, but a different (valid UTF-8) file
    bad.write_bytes(b"not dicom at all")
    path = raw.decode("utf-8", "surrogateescape")
    rows, fails = extract_batch_arrow([task(Path(path)), task(bad)], now=NOW)
    (row,) = rows.to_pylist()
    assert row["filePath"] == str(tmp_path) + "/caf\\xe9 \\xff.dcm"
    assert json.loads(row["metadata_string"])["00100010"]["Value"][0]["Alphabetic"] == "Budget^Test"
    assert fails.to_pylist()[0]["filePath"] == str(bad)


def test_a_promoted_tag_with_a_corrupt_vr_is_kept_as_text(tmp_path: Path) -> None:
    # Modality (0008,0060) written as US: PS3.5 little endian 0x5443 is 21571.
    data = base_file() + element(0x00080060, "US", b"CT")
    rows, fails = extract_batch_arrow([task(write(tmp_path, "m.dcm", data))], now=NOW)
    assert fails.num_rows == 0 and rows.column("modality").to_pylist() == ["21571"]


# --------------------------------------------------------------------------- worker memory cap


def _extract_in_worker(paths: list[str], cap: int) -> tuple[list[str], list[str]]:
    init_worker(cap)
    rows, fails = extract_batch(
        [task(Path(p)) for p in paths], now=NOW, limits=ReadLimits(max_value_bytes=1 << 40, max_elements=10**9)
    )
    return [r["sopInstanceUid"] for r in rows], [f"{f['errorClass']}: {f['message']}" for f in fails]


@pytest.fixture()
def spawn_pool() -> Iterator[Any]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        yield pool


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the worker's size")
def test_a_capped_worker_turns_out_of_memory_into_a_failure(tmp_path: Path, spawn_pool: Any) -> None:
    # A 48 MiB UV value (explicit VR, 4-byte length: PS3.5 Table 7.1-1) is 6M numbers:
    # about 450 MB as Python ints plus JSON, while the worker may grow by 200 MB.
    value = bytes(range(256)) * (48 * 4096)
    f = write(tmp_path, "uv.dcm", base_file() + element(0x00111010, "UV", value))
    ok = write(tmp_path, "ok.dcm", base_file())
    baseline = spawn_pool.submit(_vm_size).result()
    assert baseline > 0
    sops, errors = spawn_pool.submit(_extract_in_worker, [str(f), str(ok)], baseline + (200 << 20)).result()
    assert errors == ["TooLarge: out of memory while reading the file (MemoryError)"] and sops == [SOP]


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0
