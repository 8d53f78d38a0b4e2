"""FHIR NDJSON files of a partition (SPEC §2, §3.4): ``<prefix>-00000.ndjson``, ≤ 1000 resources each.

Files are written atomically (temporary file in the same folder, fsync, rename, fsync of the
folder) and named by position only, so re-materialising a partition rewrites the same names;
files of an earlier run that are not rewritten are removed afterwards. A crash at any point leaves
either the old or the new complete file under each name, never a torn one, and the next run
converges to the same folder content.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from dicom_assets.fhir.flatten import canonical_json
from dicom_assets.lake.fileops import crash_point

#: Temporary files start with this so readers globbing ``*.ndjson`` never see them.
_TMP_PREFIX = ".tmp-"


def _batches(resources: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(resources)
    while batch := list(islice(iterator, size)):
        yield batch


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            for line in lines:
                handle.write(line)
                handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        crash_point("ndjson:tmp_written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_ndjson(
    resources: Iterable[dict[str, Any]],
    folder: Path,
    *,
    max_per_file: int = 1000,
    prefix: str = "ImagingStudy",
) -> list[Path]:
    """Write ``resources`` (one canonical JSON line each, in the order given) into ``folder``.

    Returns the written paths, ``<prefix>-00000.ndjson``, ``<prefix>-00001.ndjson`` … in order.
    Stale ``<prefix>-NNNNN.ndjson`` files and leftover temporary files of this prefix are removed
    once the new files are in place. Pass resources in a stable order (e.g. sorted by ``id``) to
    get byte-identical files on a re-run. An empty input leaves no ``<prefix>`` file.
    """
    if max_per_file < 1:
        raise ValueError("write_ndjson: max_per_file must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError("write_ndjson: prefix must be a plain file-name part")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, batch in enumerate(_batches(resources, max_per_file)):
        path = folder / f"{prefix}-{index:05d}.ndjson"
        _write_atomic(path, [canonical_json(resource) for resource in batch])
        written.append(path)
    crash_point("ndjson:written")
    keep = {path.name for path in written}
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{5,}}\.ndjson")
    for entry in folder.iterdir():
        stale = pattern.fullmatch(entry.name) and entry.name not in keep
        leftover = entry.name.startswith(f"{_TMP_PREFIX}{prefix}-")
        if (stale or leftover) and entry.is_file():
            entry.unlink(missing_ok=True)
    _fsync_dir(folder)
    return written
