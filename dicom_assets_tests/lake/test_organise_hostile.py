"""Hostile drops (SPEC §6): zip slip, bombs, symlinks leaving the lake, oversized files, odd names.

Every test keeps a sentinel folder beside the lake and checks that nothing
outside the lake was written, moved or deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_assets.config import Settings
from dicom_assets.lake.organise import OrganiseResult, list_failed, organise
from dicom_assets.lake.paths import LakePaths

DAY = "2024/03/05"


def dcm(name: str = "CT_small.dcm") -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def make_zip(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data, compress_type=method)
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.paths = LakePaths.of(tmp_path / "lake").ensure()
        self.sentinel = tmp_path / "sentinel"
        (self.sentinel / "inside").mkdir(parents=True)
        (self.sentinel / "keep.txt").write_text("outside the lake")
        (self.sentinel / "inside" / "keep.dcm").write_bytes(dcm())

    def outside(self) -> dict[str, str]:
        snap = snapshot(self.tmp)
        return {k: v for k, v in snap.items() if not k.startswith(str(self.paths.root))}

    def drop(self, rel: str | bytes, data: bytes) -> Path:
        root = os.fsencode(str(self.paths.ingest_root))
        raw = os.path.join(root, rel if isinstance(rel, bytes) else os.fsencode(rel))
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        with open(raw, "wb") as fh:
            fh.write(data)
        self.age(raw)
        return Path(os.fsdecode(raw))

    def link(self, rel: str, target: str | Path) -> Path:
        p = self.paths.ingest_root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
        return p

    @staticmethod
    def age(p: str | bytes | Path) -> None:
        t = time.time() - 60
        os.utime(p, (t, t), follow_symlinks=False)

    def run(self, **kw: object) -> OrganiseResult:
        s = Settings(lake=str(self.paths.root), settle_seconds=5, **kw)  # type: ignore[arg-type]
        return organise(self.paths, s, DAY, now=time.time())


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    before = e.outside()
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    yield e
    assert e.outside() == before, "something outside the lake changed"
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd


def only_failure(res: OrganiseResult) -> tuple[str, str]:
    assert not res.landed, res.landed
    [f] = res.failed
    return f.error_class, f.message


@pytest.mark.parametrize(
    "evil", ["../../../sentinel/evil.dcm", "/tmp/evil.dcm", "a/../../evil.dcm", "C:\\evil.dcm", "..\\..\\evil.dcm"]
)
def test_zip_slip_is_refused(env: Env, evil: str) -> None:
    zp = env.drop("ns/slip.zip", make_zip([("ok.dcm", dcm()), (evil, dcm())]))
    res = env.run()
    assert only_failure(res)[0] == "ZipSlip"
    assert not zp.exists() and not Path("/tmp/evil.dcm").exists()
    assert not env.paths.process_dir("ns", DAY).exists()  # the good member is not published either


def test_zip_bomb_is_refused(env: Env) -> None:
    env.drop("ns/bomb.zip", make_zip([("big.dcm", bytes(16 * 1024 * 1024))]))
    cls, msg = only_failure(env.run())
    assert cls == "ZipBomb" and "big.dcm" in msg


def test_nested_zip_bomb_is_refused(env: Env) -> None:
    # 42.zip-style: copies of copies of an archive holding one huge, highly compressed member.
    level = make_zip([("z.dcm", bytes(4 * 1024 * 1024))])
    for _ in range(3):
        level = make_zip([(f"c{i}.zip", level) for i in range(10)], method=zipfile.ZIP_STORED)
    env.drop("ns/nested.zip", level)
    cls, msg = only_failure(env.run())
    assert cls == "ZipBomb" and "z.dcm" in msg


def test_nested_bomb_of_small_members_hits_the_total_budget(env: Env) -> None:
    # Leaves under the ratio floor one by one; the shared budget still stops them.
    level = make_zip([("z.dcm", bytes(1000 * 1024))])
    for _ in range(3):
        level = make_zip([(f"c{i}.zip", level) for i in range(6)], method=zipfile.ZIP_STORED)
    env.drop("ns/nested.zip", level)
    cls, _ = only_failure(env.run(max_zip_uncompressed_bytes=16 * 1024 * 1024))
    assert cls == "ZipBomb"
    assert not any((env.paths.state_dir / "organise" / "staging").iterdir())


def test_zip_nested_too_deep_is_refused(env: Env) -> None:
    level = make_zip([("ct.dcm", dcm())])
    for i in range(4):
        level = make_zip([(f"l{i}.zip", level)])
    env.drop("ns/deep.zip", level)
    assert only_failure(env.run(max_zip_depth=2))[0] == "ZipTooDeep"


def test_encrypted_zip_is_refused(env: Env) -> None:
    data = bytearray(make_zip([("secret.dcm", dcm())]))
    data[6] |= 1
    data[data.rindex(b"PK\x01\x02") + 8] |= 1
    env.drop("ns/enc.zip", bytes(data))
    assert only_failure(env.run())[0] == "ZipEncrypted"


def test_symlink_to_etc_passwd_is_refused_and_the_link_itself_moved(env: Env) -> None:
    link = env.link("ns/passwd.dcm", "/etc/passwd")
    env.age(link)
    res = env.run()
    cls, _ = only_failure(res)
    assert cls == "SymlinkOutsideLake"
    moved = Path(res.failed[0].failed_path)
    assert moved.is_symlink() and os.readlink(moved) == "/etc/passwd" and not os.path.lexists(link)
    assert json.loads(Path(res.failed[0].error_json_path).read_text())["errorClass"] == "SymlinkOutsideLake"


def test_symlinked_folder_leaving_the_lake_is_not_followed(env: Env) -> None:
    link = env.link("ns/mounted", env.sentinel / "inside")
    env.age(link)
    res = env.run()
    assert only_failure(res)[0] == "SymlinkOutsideLake"
    assert (env.sentinel / "inside" / "keep.dcm").exists()  # its DICOM file was not taken


def test_symlinked_namespace_folder_is_not_followed(env: Env) -> None:
    link = env.link("evilns", env.sentinel / "inside")
    env.age(link)
    assert only_failure(env.run())[0] == "SymlinkOutsideLake"


def test_symlink_inside_the_lake_is_not_followed_either(env: Env) -> None:
    target = env.drop("ns/real.dcm", dcm())
    link = env.link("ns/alias.dcm", target)
    env.age(link)
    res = env.run()
    assert [f.error_class for f in res.failed] == ["SymlinkNotFollowed"]
    assert len(res.landed) == 1  # the real file, once


def test_file_over_the_size_limit_is_refused(env: Env) -> None:
    env.drop("ns/big.dcm", dcm())
    cls, msg = only_failure(env.run(max_file_bytes=1000))
    assert cls == "TooLarge" and "1000" in msg


def test_zip_over_the_size_limit_is_refused(env: Env) -> None:
    env.drop("ns/big.zip", make_zip([("a.dcm", dcm())]))
    assert only_failure(env.run(max_zip_bytes=1000))[0] == "ZipTooLarge"


def test_non_utf8_and_unicode_names(env: Env) -> None:
    latin1 = env.drop(b"ns/caf\xe9 dir/caf\xe9.dcm", dcm())  # Latin-1 bytes: not valid UTF-8
    env.drop("ns/Ünïcödé file 名前.dcm", dcm("MR_small.dcm"))
    env.drop("ns/new\nline.dcm", dcm("rtplan.dcm"))
    env.drop(b"ns/bad\xff.zip", make_zip([("m\xe9mber.dcm", dcm())]))
    res = env.run()
    assert len(res.landed) == 4 and not res.failed
    names = sorted(Path(r.process_path).relative_to(env.paths.process_dir("ns", DAY)).as_posix() for r in res.landed)
    stripped = sorted(re.sub(r"(^|/)\d{10}\.\d{6}_", r"\1", n) for n in names)
    assert stripped == sorted(["caf_ dir/caf_.dcm", "Ünïcödé file 名前.dcm", "new_line.dcm", "m\xe9mber.dcm"])
    originals = {r.original_path for r in res.landed}
    assert any(o.endswith("caf\\xe9 dir/caf\\xe9.dcm") for o in originals)
    for r in res.landed:  # every recorded path is valid UTF-8 for the Delta tables
        (r.process_path + r.original_path).encode("utf-8")
    assert not os.path.lexists(latin1)


def test_very_long_name_is_shortened(env: Env) -> None:
    env.drop("ns/" + "a" * 240 + ".dcm", dcm())
    [rec] = env.run().landed
    name = Path(rec.process_path).name
    assert name.endswith(".dcm") and len(name.encode()) <= 220


def test_fifo_and_other_special_files_are_never_opened(env: Env) -> None:
    fifo = env.paths.ingest_root / "ns" / "pipe.dcm"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    env.age(fifo)
    res = env.run()  # would hang if the FIFO were opened for reading
    assert res.ignored == 1 and fifo.exists() and not res.failed


def test_failed_records_are_listed(env: Env) -> None:
    env.drop("ns/slip.zip", make_zip([("../x.dcm", dcm())]))
    env.link("ns/l.dcm", "/etc/passwd")
    env.age(env.paths.ingest_root / "ns" / "l.dcm")
    env.run()
    assert sorted(f.error_class for f in list_failed(env.paths, DAY)) == ["SymlinkOutsideLake", "ZipSlip"]
