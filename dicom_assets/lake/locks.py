"""Inter-process locks inside the lake (``_state/locks``), for read-modify-write sections.

Delta's optimistic commits make blind appends always succeed, so two runs
assigning ``max(id) + 1`` at once would both win. Id assignment is therefore
serialised with an ``flock`` on a file in the lake: cheap, released by the
kernel if the holder is killed, and valid across every process on the host.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def lake_lock(state_dir: Path, name: str) -> Iterator[None]:
    folder = state_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
