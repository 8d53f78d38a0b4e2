"""kill -9 at any point, then a re-run: same final state as an uninterrupted run (SPEC §3.1, §6).

Organise runs in a subprocess with ``DICOM_ASSETS_KILL_AT=<point>:<n>``, which
SIGKILLs it the n-th time it passes ``<point>``. The test checks it really
died there (return code -9), re-runs it cleanly, and compares Process, Failed,
Ingest and the landed journal with an uninterrupted run: same file contents
under the same names (epoch prefix aside), each exactly once, nothing left in
staging or the intent journal.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from dicom_assets.lake.paths import LakePaths

PROJECT = Path(__file__).resolve().parents[2]
DAY = "2024/03/05"
RUNNER = (
    "import sys\n"
    "from dicom_assets.config import Settings\n"
    "from dicom_assets.lake.paths import LakePaths\n"
    "from dicom_assets.lake.organise import organise\n"
    "root = sys.argv[1]\n"
    "batch = int(sys.argv[3]) if len(sys.argv) > 3 else 2\n"
    "organise(LakePaths.of(root), Settings(lake=root, settle_seconds=0, batch_size=batch), sys.argv[2])\n"
)
EPOCH = re.compile(r"(^|/)\d{10}\.\d{6}_")


def _dcm(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Ingest tree with loose files, nested ZIPs and refusals."""
    root = tmp_path_factory.mktemp("seed")
    ct, mr, rt = _dcm("CT_small.dcm"), _dcm("MR_small.dcm"), _dcm("rtplan.dcm")
    files = {
        "top.dcm": rt,
        "ns/a/ct.dcm": ct,
        "ns/a/MR0001": mr,
        "ns/b/rt.dcm": rt,
        "ns/b/ct copy.dcm": ct,
        "ns/z/batch.zip": _zip(
            [("s/ct.dcm", ct), ("mr", mr), ("bad.dcm", b"no"), ("README", b"r"), ("in.zip", _zip([("rt.dcm", rt)]))]
        ),
        "ns/z/second.zip": _zip([("ct.dcm", ct)]),
        "ns/bad.dcm": b"plain text",
        "ns/broken.zip": b"PK\x03\x04" + bytes(64),
        "ns/README.txt": b"stays",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _lake(tmp_path: Path, seed: Path, process_elsewhere: Path | None = None) -> Path:
    root = tmp_path / f"lake-{uuid.uuid4().hex[:8]}"
    paths = LakePaths.of(root)
    if process_elsewhere is not None:
        (root / "bronze" / "Files").mkdir(parents=True)
        (root / "bronze" / "Files" / "Process").symlink_to(process_elsewhere)
    shutil.copytree(seed, paths.ingest_root)
    return root


def _run(root: Path, kill: str | None = None, batch: int = 2) -> int:
    env = {k: v for k, v in os.environ.items() if k != "DICOM_ASSETS_KILL_AT"}
    if kill:
        env["DICOM_ASSETS_KILL_AT"] = kill
    env["PYTHONPATH"] = str(PROJECT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", RUNNER, str(root), DAY, str(batch)], env=env, cwd=PROJECT, capture_output=True, timeout=120
    )
    if r.returncode not in (0, -9):
        raise AssertionError(r.stderr.decode(errors="replace"))
    return r.returncode


def _files(top: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(top):
        for n in names:
            p = Path(dirpath) / n
            out[p.relative_to(top).as_posix()] = p.read_bytes()
    return out


def _state(root: Path) -> dict[str, Any]:
    paths = LakePaths.of(root)

    def strip(s: str) -> str:
        return EPOCH.sub(r"\1", s.replace(str(paths.root), "<lake>"))

    process = _files(paths.process_root)
    failed = _files(paths.failed_root)
    journal_lines = [
        json.loads(line)
        for f in (paths.state_dir / "organised").rglob("*.jsonl")
        for line in f.read_bytes().splitlines()
        if line.strip()
    ]
    journalled = Counter(rec["processPath"] for rec in journal_lines)
    process_rel = {(paths.process_root / rel).relative_to(paths.root).as_posix() for rel in process}
    # Every Process file journalled exactly once, nothing journalled that is not there.
    assert set(journalled) == process_rel and set(journalled.values()) <= {1}, journalled
    organise_state = paths.state_dir / "organise"
    leftovers = [p.name for p in (*organise_state.glob("intents/*"), *organise_state.glob("staging/*"))]
    parts = [k for k in list(process) + list(failed) if k.endswith(".part")]
    return {
        "process": Counter((strip(k), hashlib.sha256(v).hexdigest()) for k, v in process.items()),
        "failed": Counter(
            (strip(k), hashlib.sha256(v).hexdigest()) for k, v in failed.items() if not k.endswith(".error.json")
        ),
        "errors": Counter(
            (strip(k), json.loads(v)["errorClass"], strip(json.loads(v)["originalPath"]))
            for k, v in failed.items()
            if k.endswith(".error.json")
        ),
        "ingest": sorted(_files(paths.ingest_root)),
        "journal": Counter(
            (strip(r["processPath"]), strip(r["originalPath"]), r["contentSha256"], r["sourceModifiedAt"] > 0)
            for r in journal_lines
        ),
        "leftovers": leftovers + parts,
    }


@pytest.fixture(scope="module")
def baseline(seed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = _lake(tmp_path_factory.mktemp("base"), seed)
    assert _run(root) == 0
    state = _state(root)
    # The fixture exercises what it should: 5 loose files + 4 ZIP members landed,
    # 3 files in Failed (bad.dcm, broken.zip, the ZIP member bad.dcm).
    assert sum(state["process"].values()) == 9 and sum(state["failed"].values()) == 3
    assert state["ingest"] == ["ns/README.txt"] and state["leftovers"] == []
    return state


KILL_POINTS = [
    "organise:intent:1",
    "organise:intent:2",
    "organise:intent:4",
    "organise:staged:1",
    "organise:staged:2",
    "organise:step:1",
    "organise:step:2",
    "organise:step:4",
    "organise:synced:1",
    "organise:synced:3",
    "organise:recorded:1",
    "organise:recorded:2",
    "organise:zip_deleted:1",
    "organise:zip_deleted:2",
]


@pytest.mark.parametrize("kill", KILL_POINTS)
def test_kill_then_rerun_matches_an_uninterrupted_run(
    kill: str, seed: Path, baseline: dict[str, Any], tmp_path: Path
) -> None:
    root = _lake(tmp_path, seed)
    assert _run(root, kill) == -9, f"never reached {kill}"
    assert _run(root) == 0
    assert _state(root) == baseline


@pytest.mark.parametrize("kill", ["organise:zip_deleted:1", "organise:step:6", "organise:synced:1", "organise:recorded:1"])
def test_kill_inside_one_plan_of_every_file_and_zip(
    kill: str, seed: Path, baseline: dict[str, Any], tmp_path: Path
) -> None:
    """With a batch larger than the drop, both ZIPs and the loose files share one plan."""
    root = _lake(tmp_path, seed)
    assert _run(root, kill, batch=64) == -9, f"never reached {kill}"
    intents = list((LakePaths.of(root).state_dir / "organise" / "intents").iterdir())
    assert len(intents) == 1 and len(json.loads(intents[0].read_bytes())["zips"]) == 2
    assert _run(root, batch=64) == 0
    assert _state(root) == baseline


def test_a_plan_in_the_one_zip_format_of_earlier_versions_is_rolled_forward(
    seed: Path, baseline: dict[str, Any], tmp_path: Path
) -> None:
    """Intents left by a version that wrote ``zip``/``staging`` (one ZIP per plan) still recover."""
    for n in range(1, 12):
        root = _lake(tmp_path / str(n), seed)
        assert _run(root, f"organise:intent:{n}", batch=1) == -9
        (intent,) = (LakePaths.of(root).state_dir / "organise" / "intents").iterdir()
        plan = json.loads(intent.read_bytes())
        if plan["zips"]:
            break
    else:
        pytest.fail("no plan with a ZIP among the first intents")
    (z,), (staging,) = plan.pop("zips"), plan.pop("stagings")
    for step in plan["steps"]:
        assert step.pop("zip") == 0
    intent.write_text(json.dumps({**plan, "zip": z, "staging": staging}))
    assert _run(root) == 0
    assert _state(root) == baseline


def test_kill_during_recovery_too(seed: Path, baseline: dict[str, Any], tmp_path: Path) -> None:
    root = _lake(tmp_path, seed)
    assert _run(root, "organise:step:3") == -9
    assert _run(root, "organise:step:1") == -9  # dies again while rolling the plan forward
    assert _run(root) == 0
    assert _state(root) == baseline


@pytest.mark.parametrize("kill", ["fileops:copied:1", "fileops:copied:3", "organise:synced:1"])
def test_kill_during_a_cross_filesystem_move(kill: str, seed: Path, baseline: dict[str, Any], tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to move across")
    elsewhere = shm / f"dicom-assets-crash-{uuid.uuid4().hex}"
    elsewhere.mkdir()
    try:
        root = _lake(tmp_path, seed, process_elsewhere=elsewhere)
        assert _run(root, kill) == -9, f"never reached {kill}"
        assert _run(root) == 0
        assert _state(root) == baseline
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
