"""The CLI summary's file count equals pathlib's ``rglob`` + ``is_file`` on a tree with links."""

from __future__ import annotations

import os
from pathlib import Path

from dicom_assets.lake.fileops import count_files


def test_count_matches_rglob(tmp_path: Path) -> None:
    root = tmp_path / "Failed"
    (root / "ns" / "2026" / "01" / "02").mkdir(parents=True)
    day = root / "ns" / "2026" / "01" / "02"
    for name in ("a.dcm", "b.dcm.zip", ".hidden", "a.dcm.error.json"):
        (day / name).write_bytes(b"x")
    (day / "empty").mkdir()
    os.symlink(day / "a.dcm", day / "link_to_file")
    os.symlink(tmp_path / "nowhere", day / "broken_link")
    os.symlink(day, root / "link_to_dir")
    assert count_files(root) == sum(1 for p in root.rglob("*") if p.is_file()) == 5
    assert count_files(root, ".error.json") == sum(1 for p in root.rglob("*") if p.is_file() and not p.name.endswith(".error.json"))
    assert count_files(root, only_suffix=".error.json") == 1 == len(list(root.rglob("*.error.json")))
    assert count_files(tmp_path / "absent") == 0
