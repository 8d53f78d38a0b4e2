"""Organise the real corpus (SPEC §3.1, §11): every DICOM file accounted for, byte for byte.

Expectations come from MANIFEST.tsv and the standard library's ``zipfile``,
not from the code under test: what ``valid_dicom=yes`` says must land, every
``.dcm`` and ``.zip`` must leave Ingest, corrupt archives (per ``zipfile``)
must be in Failed, and the SHA-256 multiset of what left Ingest must equal
that of Process + Failed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from dicom_assets.config import Settings
from dicom_assets.lake.organise import list_failed, list_process_files, organise
from dicom_assets.lake.paths import LakePaths

CORPUS = Path(
    os.environ.get("DICOM_ASSETS_CORPUS") or Path(__file__).resolve().parents[2].parent / "shared" / "dicom-corpus"
)
DAY = "2024/03/05"
NS = "corpus"

pytestmark = pytest.mark.skipif(not (CORPUS / "MANIFEST.tsv").is_file(), reason="DICOM corpus not available")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except Exception:  # BadZipFile, zlib.error, EOFError…: any failure to read it whole
        return False


def zip_members(scratch: Path, path: Path, valid: set[str], prefix: str) -> list[bytes]:
    """Members that must land (valid per manifest) or fail (named .dcm), nested archives opened."""
    out: list[bytes] = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            data = zf.read(info)
            if data[:4] == b"PK\x03\x04":
                nested = scratch / f"nested-{sha(data)}.zip"
                nested.write_bytes(data)
                out += zip_members(scratch, nested, valid, f"{prefix}!{info.filename}")
                nested.unlink()
            elif f"{prefix}!{info.filename}" in valid or info.filename.lower().endswith(".dcm"):
                out.append(data)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_organise_accounts_for_every_corpus_file(tmp_path: Path) -> None:
    with open(CORPUS / "MANIFEST.tsv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    valid = {r["path"] for r in rows if r["valid_dicom"] == "yes"}

    paths = LakePaths.of(tmp_path / "lake").ensure()
    ingest = paths.ingest_root / NS
    shutil.copytree(CORPUS, ingest)
    for p in ingest.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)  # the corpus is read-only; a real drop is not
    dropped = files(ingest)

    t0 = time.perf_counter()
    res = organise(paths, Settings(lake=str(paths.root), settle_seconds=0), DAY, now=time.time() + 1)
    elapsed = time.perf_counter() - t0

    remaining = files(ingest)
    left = {k: v for k, v in dropped.items() if k not in remaining}
    # Only non-DICOM files that are neither .dcm nor .zip stay in Ingest.
    for rel in remaining:
        assert rel not in valid, f"valid DICOM left in Ingest: {rel}"
        assert not rel.lower().endswith((".dcm", ".zip")), rel
    assert {"README.md", "MANIFEST.tsv", "SOURCES.tsv"} <= set(remaining)
    assert valid.isdisjoint(remaining)
    assert res.unsettled == 0 and res.deferred == 0

    process = files(paths.process_dir(NS, DAY))
    failed_all = files(paths.failed_dir(NS, DAY))
    failed = {k: v for k, v in failed_all.items() if not k.endswith(".error.json")}
    assert set(failed_all) - set(failed) == {k + ".error.json" for k in failed}  # every failure has a record

    # Byte-for-byte accounting: what left Ingest (ZIPs opened when good) == Process + Failed.
    expected: Counter[str] = Counter()
    good_zips = []
    for rel, data in left.items():
        if rel.lower().endswith(".zip") and zip_ok(CORPUS / rel):
            good_zips.append(rel)
            expected.update(sha(m) for m in zip_members(tmp_path, CORPUS / rel, valid, rel))
        else:
            expected[sha(data)] += 1
            if rel.lower().endswith(".zip"):
                # A broken archive goes to Failed whole; its members that still
                # read back (valid per the manifest) are salvaged into Process.
                try:
                    with zipfile.ZipFile(CORPUS / rel) as zf:
                        for name in zf.namelist():
                            if f"{rel}!{name}" in valid:
                                expected[sha(zf.read(name))] += 1
                except zipfile.BadZipFile:
                    pass
    got = Counter(sha(v) for v in process.values()) + Counter(sha(v) for v in failed.values())
    assert got == expected

    # Every valid loose file and valid ZIP member is in Process.
    process_hashes = Counter(sha(v) for v in process.values())
    for r in rows:
        if r["valid_dicom"] != "yes":
            continue
        if "!" in r["path"]:
            archive, member = r["path"].split("!", 1)
            with zipfile.ZipFile(CORPUS / archive) as zf:
                assert process_hashes[sha(zf.read(member))] > 0, r["path"]
        else:
            assert process_hashes[sha(dropped[r["path"]])] > 0, r["path"]

    # Corrupt archives (per zipfile) and non-DICOM .dcm files are in Failed with a reason.
    failed_records = {f.original_path: f for f in list_failed(paths, DAY)}
    assert len(failed_records) == len(failed)
    for rel in dropped:
        if rel.lower().endswith(".zip") and not zip_ok(CORPUS / rel):
            rec = failed_records[str(ingest / rel)]
            assert rec.error_class == "CorruptZip" and rec.stage == "organise"
    assert failed_records[str(ingest / "generated-invalid" / "text_renamed.dcm")].error_class == "NotDicom"
    assert failed_records[str(ingest / "generated-invalid" / "empty.dcm")].error_class == "NotDicom"
    member = f"{ingest}/generated-invalid/nested_siemens_study.zip!export/20180918Si/mr_0003/extra/deeper/not_dicom.dcm"
    assert failed_records[member].error_class == "NotDicom"
    for f in failed_records.values():
        rec = json.loads(Path(f.error_json_path).read_text())
        assert {"stage", "errorClass", "message", "originalPath", "detectedAt"} <= rec.keys()

    # Lineage for the metastore step: every Process file listed once, ZIP members as <zip>!<member>.
    listed = list_process_files(paths, DAY)
    assert len(listed) == len(process) == len(res.landed)
    by_origin = {r.original_path: r for r in listed}
    cine = by_origin[f"{ingest}/deid-data/ultrasounds/GREYSCALE_CINE.zip!GREYSCALE_CINE.dcm"]
    assert Path(cine.process_path).parent == paths.process_dir(NS, DAY) / "deid-data" / "ultrasounds"
    assert all(r.sha256 == sha(Path(r.process_path).read_bytes()) for r in listed)
    assert set(good_zips) == {"deid-data/ultrasounds/GREYSCALE_CINE.zip", "generated-invalid/nested_siemens_study.zip"}

    mb = sum(len(v) for v in dropped.values()) / 1e6
    print(f"\norganise: {len(dropped)} files, {mb:.0f} MB in {elapsed:.2f} s ({len(dropped) / elapsed:.0f} files/s)")
