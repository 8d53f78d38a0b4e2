"""Safe ZIP extraction: limits, hostile names, corrupt and nested archives (SPEC §3.1, §6)."""

from __future__ import annotations

import calendar
import hashlib
import io
import struct
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_assets.dicom import zipsafe
from dicom_assets.dicom.zipsafe import ExtractedMember, ZipLimits, ZipRefused, extract_zip_safely


def _dicom_bytes(name: str = "CT_small.dcm") -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _is_dicom(head: bytes) -> bool:
    # Independent of the project's sniffer: Part 10 prefix only.
    return head[128:132] == b"DICM"


def _zip(members: list[tuple[str, bytes]], *, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _extract(tmp_path: Path, data: bytes, limits: ZipLimits | None = None) -> tuple[list[ExtractedMember], Path]:
    zp = tmp_path / "in.zip"
    zp.write_bytes(data)
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    return extract_zip_safely(zp, staging, limits or ZipLimits(), _is_dicom, head_bytes=512), staging


def test_extracts_dicom_members_and_bad_dcm_skips_the_rest(tmp_path: Path) -> None:
    ct, mr = _dicom_bytes("CT_small.dcm"), _dicom_bytes("MR_small.dcm")
    data = _zip([("a/ct.dcm", ct), ("b/noext", mr), ("README.txt", b"hello"), ("x/bad.dcm", b"not dicom")])
    members, staging = _extract(tmp_path, data)
    by_name = {m.chain[-1]: m for m in members}
    assert by_name["a/ct.dcm"].kind == zipsafe.DICOM
    assert by_name["b/noext"].kind == zipsafe.DICOM  # by content, not by name
    assert by_name["x/bad.dcm"].kind == zipsafe.NOT_DICOM
    assert by_name["README.txt"].kind == zipsafe.SKIPPED and by_name["README.txt"].staged_path is None
    for name, content in [("a/ct.dcm", ct), ("b/noext", mr), ("x/bad.dcm", b"not dicom")]:
        m = by_name[name]
        assert m.staged_path is not None and m.staged_path.read_bytes() == content
        assert m.sha256 == hashlib.sha256(content).hexdigest() and m.size == len(content)
    assert by_name["a/ct.dcm"].basename == "ct.dcm"
    assert sorted(p.name for p in staging.iterdir()) == ["m000001", "m000002", "m000003"]


def test_nested_zips_are_extracted_with_their_chain(tmp_path: Path) -> None:
    ct = _dicom_bytes()
    inner2 = _zip([("deep/ct2.dcm", ct)])
    inner = _zip([("inner2.zip", inner2), ("ct1.dcm", ct)], method=zipfile.ZIP_STORED)
    members, staging = _extract(tmp_path, _zip([("sub/inner.zip", inner), ("top.dcm", ct)]))
    chains = sorted(m.chain for m in members)
    assert chains == [("sub/inner.zip", "ct1.dcm"), ("sub/inner.zip", "inner2.zip", "deep/ct2.dcm"), ("top.dcm",)]
    # The nested archives themselves are not left in staging: only the three members.
    assert len(list(staging.iterdir())) == 3


@pytest.mark.parametrize("name", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm", "..\\evil.dcm"])
def test_escaping_member_names_refuse_the_whole_zip(tmp_path: Path, name: str) -> None:
    data = _zip([("ok.dcm", _dicom_bytes()), (name, _dicom_bytes())])
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, data)
    assert exc.value.error_class == "ZipSlip"
    assert list((tmp_path / "staging").iterdir()) == []  # refused before anything was written


def test_member_name_problem_accepts_plain_names() -> None:
    for ok in ["a.dcm", "a/b/c.dcm", "..a/b..c.dcm", "dir with space/é.dcm"]:
        assert zipsafe.member_name_problem(ok) is None


def test_high_ratio_member_is_a_bomb(tmp_path: Path) -> None:
    data = _zip([("zeros.dcm", bytes(8 * 1024 * 1024))])  # deflate: ~1000x
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, data)
    assert exc.value.error_class == "ZipBomb"


def test_small_highly_compressible_members_are_not_bombs(tmp_path: Path) -> None:
    data = _zip([("zeros.bin", bytes(512 * 1024))])  # below the 1 MiB ratio floor
    members, _ = _extract(tmp_path, data)
    assert [m.kind for m in members] == [zipsafe.SKIPPED]


def test_total_uncompressed_limit(tmp_path: Path) -> None:
    ct = _dicom_bytes()
    data = _zip([("a.dcm", ct), ("b.dcm", ct)], method=zipfile.ZIP_STORED)
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, data, ZipLimits(max_uncompressed_bytes=len(ct) + 10))
    assert exc.value.error_class == "ZipBomb"


def test_nested_bomb_is_caught_by_the_shared_budget(tmp_path: Path) -> None:
    # Each level holds several copies of the level below: small archive, big total.
    level = _zip([("z.bin", bytes(900 * 1024))])
    for _ in range(3):
        level = _zip([(f"copy{i}.zip", level) for i in range(8)], method=zipfile.ZIP_STORED)
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, level, ZipLimits(max_uncompressed_bytes=64 * 1024 * 1024))
    assert exc.value.error_class == "ZipBomb"


def test_nesting_depth_limit(tmp_path: Path) -> None:
    level = _zip([("ct.dcm", _dicom_bytes())])
    for i in range(3):
        level = _zip([(f"l{i}.zip", level)])
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, level, ZipLimits(max_depth=2))
    assert exc.value.error_class == "ZipTooDeep"
    (tmp_path / "ok").mkdir()
    members, _ = _extract(tmp_path / "ok", level, ZipLimits(max_depth=3))
    assert [m.chain[-1] for m in members] == ["ct.dcm"]


def test_member_count_limit(tmp_path: Path) -> None:
    data = _zip([(f"f{i}.txt", b"x") for i in range(5)])
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, data, ZipLimits(max_members=4))
    assert exc.value.error_class == "ZipTooManyMembers"


def test_member_over_file_limit(tmp_path: Path) -> None:
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, _zip([("ct.dcm", _dicom_bytes())]), ZipLimits(max_file_bytes=100))
    assert exc.value.error_class == "TooLarge"


def test_archive_over_zip_limit(tmp_path: Path) -> None:
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, _zip([("ct.dcm", _dicom_bytes())]), ZipLimits(max_zip_bytes=100))
    assert exc.value.error_class == "ZipTooLarge"


def test_encrypted_member_is_refused(tmp_path: Path) -> None:
    data = bytearray(_zip([("secret.dcm", b"x" * 100)]))
    # PKWARE APPNOTE 4.4.4: general purpose flag bit 0 = encrypted; set it in the
    # local header (offset 6) and the central directory entry (offset 8).
    data[6] |= 0x1
    data[data.rindex(b"PK\x01\x02") + 8] |= 0x1
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, bytes(data))
    assert exc.value.error_class == "ZipEncrypted"


def test_bzip2_member_is_refused_as_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, _zip([("ct.dcm", _dicom_bytes())], method=zipfile.ZIP_BZIP2))
    assert exc.value.error_class == "ZipUnsupported"


def test_bad_crc_is_corrupt_and_staging_is_left_to_the_caller(tmp_path: Path) -> None:
    ct = _dicom_bytes()
    data = bytearray(_zip([("a.dcm", ct), ("b.dcm", ct)], method=zipfile.ZIP_STORED))
    second = data.index(b"b.dcm") + len(b"b.dcm") + 200  # inside b.dcm's stored bytes
    data[second] ^= 0xFF
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, bytes(data))
    assert exc.value.error_class == "CorruptZip"
    assert "CRC" in exc.value.message


def test_header_that_lies_about_size_is_refused(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40
    data = bytearray(_zip([("a.bin", payload)], method=zipfile.ZIP_STORED))
    # Declare a smaller uncompressed size in the local header (offset 22) and central directory (offset 24).
    struct.pack_into("<I", data, 22, 100)
    cd = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 100)
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, bytes(data))
    assert exc.value.error_class in {"CorruptZip", "ZipBomb"}


@pytest.mark.parametrize("data", [b"PK\x03\x04" + b"\x00" * 50, b"not a zip at all", b""])
def test_unreadable_archives_are_corrupt(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, data)
    assert exc.value.error_class == "CorruptZip"


def test_truncated_archive_is_corrupt(tmp_path: Path) -> None:
    data = _zip([("a.dcm", _dicom_bytes()), ("b.dcm", _dicom_bytes("MR_small.dcm"))])
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, data[: int(len(data) * 0.6)])
    assert exc.value.error_class == "CorruptZip"


def test_is_zip_magic() -> None:
    assert zipsafe.is_zip_magic(_zip([("a", b"b")]))
    assert zipsafe.is_zip_magic(_zip([]))  # empty archive: end record only
    assert not zipsafe.is_zip_magic(_dicom_bytes())


def test_member_mtime_prefers_extended_timestamp() -> None:
    info = zipfile.ZipInfo("a", date_time=(2020, 1, 2, 3, 4, 6))
    assert zipsafe.member_mtime(info) == calendar.timegm((2020, 1, 2, 3, 4, 6, 0, 0, 0))
    # Info-ZIP extended timestamp 0x5455: flags (bit 0 = mtime), int32 UTC seconds.
    info.extra = struct.pack("<HHBi", 0x5455, 5, 1, 1_600_000_000)
    assert zipsafe.member_mtime(info) == 1_600_000_000.0


def test_nested_small_members_are_held_to_the_ratio_of_the_outer_archive(tmp_path: Path) -> None:
    # Each leaf (900 KiB of zeros, ~1000x) stays under the per-archive ratio floor;
    # summed over the nesting they exceed max_ratio times the outer archive's size.
    level = _zip([("z.bin", bytes(900 * 1024))])
    for _ in range(2):
        level = _zip([(f"copy{i}.zip", level) for i in range(12)], method=zipfile.ZIP_STORED)
    with pytest.raises(ZipRefused) as exc:
        _extract(tmp_path, level, ZipLimits(max_ratio=50))
    assert exc.value.error_class == "ZipBomb" and "nested archives expand" in exc.value.message
