"""Hostile files through the whole bronze path: organise, then extract (SPEC §3.1, §3.2, §6).

Complements ``lake/test_organise_hostile.py`` (ZIP slip, ZIP bombs,
symlinks, oversized drops, odd names at organise): here the files pass
organise as DICOM and are hostile to the *reader* — nesting past any sane
depth, a 4 GiB value length, undefined-length items that never end or never
stop coming, a deflate bomb inside the Deflated transfer syntax — plus odd
names and oversized files that only the extractor sees (External folders are
read in place). Each must end in Failed with an ``.error.json`` and a
``dicom_failures`` row that names the reason, the good files beside them must
get their rows, the run must stay within the per-file time budget, and
nothing outside the lake (the External storage included) may change.
Expected error classes follow from how each file is built (PS3.5), not from
the reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_assets.config import Settings
from dicom_assets.lake import delta_read
from dicom_assets.lake.failures import FailedFile, list_failed
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA
from dicom_assets.steps.bronze import extract_metastore, organise_ingest
from dicom_assets_tests.core.test_dicom_budget import (
    CONTENT_SEQ,
    SOP,
    UNDEFINED,
    base_file,
    deflated_file,
    element,
    item_flood,
    nested,
    uid_elements,
)

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = NOW.strftime("%Y/%m/%d")
TIMEOUT = 0.5


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p == skip:
                continue
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p)] = f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}:{digest}"
    return out


class Lake:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.paths = LakePaths.of(tmp_path / "lake").ensure()
        self.storage = tmp_path / "pacs-export"  # External storage: outside the lake, never written
        self.storage.mkdir()
        (self.paths.external_root / "ext").mkdir(parents=True)
        (self.paths.external_root / "ext" / "store").symlink_to(self.storage, target_is_directory=True)
        (tmp_path / "sentinel").mkdir()
        (tmp_path / "sentinel" / "keep.txt").write_text("outside the lake")

    def drop(self, rel: str | bytes, data: bytes, *, external: bool = False) -> None:
        root = os.fsencode(self.storage if external else self.paths.ingest_root / "ns")
        raw = os.path.join(root, rel if isinstance(rel, bytes) else os.fsencode(rel))
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        with open(raw, "wb") as fh:
            fh.write(data)
        t = NOW.timestamp() - 120
        os.utime(raw, (t, t))

    def outside(self) -> dict[str, str]:
        return snapshot(self.tmp, self.paths.root)

    def run(self, **kw: object) -> tuple[dict[str, dict[str, str]], list[dict[str, object]], float]:
        settings = Settings(lake=str(self.paths.root), settle_seconds=5, file_timeout_seconds=TIMEOUT, **kw)  # type: ignore[arg-type]
        organise_ingest(self.paths, settings, DAY, now=NOW.timestamp())
        t = time.monotonic()
        extract_metastore(self.paths, settings, DAY, now=NOW)
        seconds = time.monotonic() - t
        failed = {Path(f.original_path).name: _failure(f) for f in list_failed(self.paths, DAY)}
        rows = delta_read.read_day(self.paths.table_uri("dicomimagingmetastore"), METASTORE_SCHEMA, DAY).to_pylist()
        table = delta_read.read_day(self.paths.table_uri("dicom_failures"), FAILURES_SCHEMA, DAY).to_pylist()
        assert sorted(r["errorClass"] for r in table) == sorted(f["errorClass"] for f in failed.values())
        return failed, rows, seconds


def _failure(f: FailedFile) -> dict[str, str]:
    record = json.loads(Path(f.error_json_path).read_text())
    assert record["errorClass"] and record["message"] and record["stage"] and record["detectedAt"]
    assert f.in_place or Path(f.failed_path).exists()
    return {"errorClass": record["errorClass"], "message": record["message"], "stage": record["stage"]}


@pytest.fixture()
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path)


def _items_without_end() -> bytes:
    """Undefined-length items (PS3.5 §7.5.2) that never meet an Item or Sequence Delimitation Item."""
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + element(0x00100020, "LO", b"ID")
    return element(CONTENT_SEQ, "SQ", length=UNDEFINED) + item * 50


@pytest.mark.parametrize("workers", [1, 2])
def test_hostile_files_fail_with_a_reason_and_the_rest_is_read(lake: Lake, workers: int) -> None:
    good = base_file()
    lake.drop("good.dcm", good)
    lake.drop("deep.dcm", base_file(SOPInstanceUID="1.2.3.1") + nested(100_000))
    lake.drop("len4g.dcm", base_file(SOPInstanceUID="1.2.3.2") + element(0x00111010, "UT", b"abcd", length=0xFFFFFFFE))
    lake.drop("endless.dcm", base_file(SOPInstanceUID="1.2.3.3") + _items_without_end())
    lake.drop("flood.dcm", base_file(SOPInstanceUID="1.2.3.4") + item_flood(1_500_000))
    bomb = deflated_file(uid_elements() + element(0x00111010, "OB", length=64 << 20) + bytes(64 << 20))
    lake.drop("bomb.dcm", bomb)
    lake.drop("with space.dcm", base_file(SOPInstanceUID="1.2.3.5"))
    lake.drop("Ünïcödé 名前.dcm", base_file(SOPInstanceUID="1.2.3.6"))
    lake.drop(b"caf\xe9.dcm", base_file(SOPInstanceUID="1.2.3.7"))
    lake.drop(b"ext caf\xe9 \xff.dcm", base_file(SOPInstanceUID="1.2.3.8"), external=True)
    big = base_file(SOPInstanceUID="1.2.3.9") + element(0x00111011, "OB", bytes(21 << 20))
    lake.drop("ext-big.dcm", big, external=True)  # only the extractor sees External files
    lake.drop("ext-deep.dcm", base_file(SOPInstanceUID="1.2.3.10") + nested(1000), external=True)
    before = lake.outside()

    failed, rows, seconds = lake.run(workers=workers, batch_size=3, max_file_bytes=20 << 20)

    assert {k: v["errorClass"] for k, v in failed.items()} == {
        "deep.dcm": "TooDeep",
        "len4g.dcm": "Truncated",
        "endless.dcm": "Truncated",
        "flood.dcm": "Timeout",
        "bomb.dcm": "TooLarge",
        "ext-deep.dcm": "TooDeep",
        "ext-big.dcm": "TooLarge",
    }
    assert "4294967294" in failed["len4g.dcm"]["message"]
    assert f"{len(big)} bytes, limit max_file_bytes={20 << 20}" in failed["ext-big.dcm"]["message"]
    assert "inflates past" in failed["bomb.dcm"]["message"]
    assert all(v["stage"] == "extract" for v in failed.values())
    assert sorted(r["sopInstanceUid"] for r in rows) == sorted([SOP, "1.2.3.5", "1.2.3.6", "1.2.3.7", "1.2.3.8"])
    ext = next(r for r in rows if r["sopInstanceUid"] == "1.2.3.8")
    assert ext["filePath"].endswith("/ext caf\\xe9 \\xff.dcm")
    assert json.loads(ext["metadata_string"])["00100010"]["Value"][0]["Alphabetic"] == "Budget^Test"
    assert seconds < 60  # the flood alone would take seconds; it is cut at TIMEOUT
    assert lake.outside() == before, "something outside the lake changed"
    assert not any(p.is_file() for p in lake.paths.ingest_root.rglob("*"))


def test_an_external_file_with_an_undecodable_name_that_fails_is_recorded(lake: Lake) -> None:
    lake.drop(b"deep \xe9.dcm", base_file() + nested(1000), external=True)
    before = lake.outside()
    failed, rows, _ = lake.run()
    assert rows == []
    assert {k: v["errorClass"] for k, v in failed.items()} == {"deep \\xe9.dcm": "TooDeep"}
    assert lake.outside() == before
