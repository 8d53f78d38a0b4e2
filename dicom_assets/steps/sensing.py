"""Pure decisions behind the file-arrival sensors (SPEC §4): which settled files are new.

A cursor maps each file already requested to its ``size:mtime_ns`` signature;
a file triggers once, and again only if it changes. Files that left the
folder (organised into Process) drop out of the cursor, so it stays as small
as the drop folder itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Temporary names our own writers and common copy tools use while writing.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart")


@dataclass(frozen=True)
class SensorDecision:
    new_files: list[str]
    unsettled: int
    cursor: str
    run_key: str | None


def iter_files(root: Path, *, follow_top_links: bool = False) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file under ``root`` with its stat, skipping hidden and partial files."""
    if not root.exists():
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_top_links):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.endswith(PARTIAL_SUFFIXES):
                continue
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue  # vanished between listing and stat: the next tick sees it
            yield p, st


def decide(root: Path, cursor: str | None, *, now: float, settle_seconds: float, follow_top_links: bool = False) -> SensorDecision:
    """New settled files under ``root`` since ``cursor``, and the next cursor.

    Settled = last modified at least ``settle_seconds`` ago: scanners and copy
    tools write in several chunks, and a half-written file must not be taken.
    """
    seen: dict[str, str] = json.loads(cursor).get("seen", {}) if cursor else {}
    current: dict[str, str] = {}
    new: list[str] = []
    unsettled = 0
    for p, st in iter_files(root, follow_top_links=follow_top_links):
        sig = f"{st.st_size}:{st.st_mtime_ns}"
        if now - st.st_mtime < settle_seconds:
            unsettled += 1
            continue
        current[p] = sig
        if seen.get(p) != sig:
            new.append(p)
    new.sort()
    run_key = None
    if new:
        h = hashlib.sha256("\n".join(f"{p}|{current[p]}" for p in new).encode("utf-8", "surrogateescape"))
        run_key = h.hexdigest()[:32]
    return SensorDecision(new_files=new, unsettled=unsettled, cursor=json.dumps({"seen": current}, sort_keys=True), run_key=run_key)
