"""What waits in Ingest and what has landed in Process (SPEC §2, §3.1, §4).

Walking Ingest never follows a symlink and never opens anything but regular
files: links and special files (FIFOs, sockets, devices) are reported as such,
so a hostile drop cannot make a scan hang or leave the lake. The namespace is
the first folder under ``Ingest/Imaging/DICOM``; files directly under it
belong to ``default``. Names are made safe (:func:`fileops.safe_component`)
for the Process/Failed side; the original path is kept as text for lineage.

Landed files are journalled per namespace and day in
``_state/organised/<ns>/<yyyy-mm-dd>.jsonl`` so that a later re-materialisation
of the metastore can recover ``originalPath`` and ``sourceModifiedAt`` for a
file in Process, also after it was compressed to ``<file>.zip``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dicom_assets.columnar import Rows
from dicom_assets.config import Settings
from dicom_assets.dicom.zipsafe import is_zip_magic
from dicom_assets.lake import fileops
from dicom_assets.lake.failures import check_day
from dicom_assets.lake.paths import DEFAULT_NAMESPACE, LakePaths

FILE, LINK, SPECIAL = "file", "link", "special"
EPOCH_PREFIX = re.compile(r"^\d+\.\d{6}_")


@dataclass(frozen=True)
class IngestItem:
    """One entry found under Ingest (``path`` may hold undecodable bytes as surrogates)."""

    path: Path
    ns: str
    sub: tuple[str, ...]
    kind: str
    size: int
    mtime_ns: int
    ino: int

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    def stat_key(self) -> list[int]:
        return [self.size, self.mtime_ns, self.ino]

    def settled(self, settle_seconds: float, now: float) -> bool:
        # Settle time: scanners and copy tools write in several chunks.
        return self.mtime <= now - settle_seconds


@dataclass(frozen=True)
class LandedFile:
    """A DICOM file organised into Process, with its lineage (metastore ``FILE_FIELDS``).

    ``process_path`` is where the bytes are now (``<…>.zip`` once compressed),
    ``original_path`` where they were dropped (``<zip>!<member>`` for ZIP
    members), ``mtime`` POSIX seconds of the source (``sourceModifiedAt``).
    """

    process_path: str
    original_path: str
    source_system: str
    sha256: str | None
    size: int
    mtime: float
    ingest_date: str = ""

    def to_json(self, paths: LakePaths) -> dict[str, Any]:
        # String prefix, not Path.relative_to: this runs for every landed file.
        root = str(paths.root).rstrip("/") + "/"
        p = self.process_path
        rel = p[len(root):] if p.startswith(root) and len(p) > len(root) else p
        return {
            "processPath": rel,
            "originalPath": self.original_path,
            "sourceSystem": self.source_system,
            "contentSha256": self.sha256,
            "fileSize": self.size,
            "sourceModifiedAt": self.mtime,
            "ingestDate": self.ingest_date,
        }

    @classmethod
    def from_json(cls, paths: LakePaths, rec: dict[str, Any]) -> LandedFile:
        p = str(rec["processPath"])
        return cls(
            process_path=p if os.path.isabs(p) else os.path.join(paths.root, p),
            original_path=str(rec.get("originalPath", "")),
            source_system=str(rec.get("sourceSystem", "")),
            sha256=rec.get("contentSha256"),
            size=int(rec.get("fileSize") or 0),
            mtime=float(rec.get("sourceModifiedAt") or 0.0),
            ingest_date=str(rec.get("ingestDate", "")),
        )


#: One column per :class:`LandedFile` field, in field order (text as bytes, see :class:`~dicom_assets.columnar.Rows`).
LANDED_SCHEMA = pa.schema(
    [
        pa.field("process_path", pa.binary(), nullable=False),
        pa.field("original_path", pa.binary(), nullable=False),
        pa.field("source_system", pa.binary(), nullable=False),
        pa.field("sha256", pa.binary()),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime", pa.float64(), nullable=False),
        pa.field("ingest_date", pa.binary(), nullable=False),
    ]
)


def landed_rows() -> Rows[LandedFile]:
    """An empty list of landed files kept as columns (a run may land a whole day's files)."""
    return Rows(LandedFile, LANDED_SCHEMA)


class LandedIndex(dict[str, LandedFile]):
    """Landed records keyed by ``process_path``; a key ``<path>.zip`` finds ``<path>``."""

    def __missing__(self, key: str) -> LandedFile:
        if key.endswith(".zip") and dict.__contains__(self, key[:-4]):
            return dict.__getitem__(self, key[:-4])
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (
            isinstance(key, str) and key.endswith(".zip") and dict.__contains__(self, key[:-4])
        )

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def _wanted(ns_name: str, settings: Settings) -> bool:
    return not settings.namespaces or ns_name in settings.namespaces


def _item(path: Path, ns: str, sub: tuple[str, ...], entry: os.DirEntry[str]) -> IngestItem:
    st = entry.stat(follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        kind = LINK
    elif stat.S_ISREG(st.st_mode):
        kind = FILE
    else:
        kind = SPECIAL
    return IngestItem(path, ns, sub, kind, st.st_size, st.st_mtime_ns, st.st_ino)


def _walk(folder: Path, ns: str, sub: tuple[str, ...], folders: list[Path] | None) -> Iterator[IngestItem]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue  # hidden files and our own temporaries
        path = folder / entry.name
        try:
            if not entry.is_symlink() and entry.is_dir(follow_symlinks=False):
                yield from _walk(path, ns, sub + (fileops.safe_component(entry.name),), folders)
                if folders is not None:
                    folders.append(path)  # after its contents: deepest folders come first
            else:
                yield _item(path, ns, sub, entry)
        except FileNotFoundError:
            continue  # vanished while we looked


def walk_ingest(paths: LakePaths, settings: Settings, folders: list[Path] | None = None) -> Iterator[IngestItem]:
    """Every entry under Ingest (regular files, symlinks, special files), sorted by path.

    ``folders`` collects the sub-folders walked (namespace folders excluded),
    each after the folders inside it.
    """
    root = paths.ingest_root
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = root / entry.name
        try:
            if not entry.is_symlink() and entry.is_dir(follow_symlinks=False):
                ns = fileops.safe_component(entry.name)
                if _wanted(ns, settings):
                    yield from _walk(path, ns, (), folders)
            elif _wanted(DEFAULT_NAMESPACE, settings):
                yield _item(path, DEFAULT_NAMESPACE, (), entry)
        except FileNotFoundError:
            continue


def prune_empty_folders(folders: list[Path], *, older_than: float) -> int:
    """Remove the empty ``folders`` last changed before ``older_than``; returns how many went.

    Organise moves files out of Ingest and leaves their folders behind; a drop
    of 100,000 files left 8,000 empty folders that every later scan (organise,
    the sensor's ticks) walked again. ``rmdir`` only removes an empty folder,
    and a folder changed within the settle time (just created for a copy in
    progress, or just emptied by this run) is kept for a later run.
    """
    # Ages are taken before anything goes: removing a sub-folder touches its parent.
    settled = []
    for folder in folders:
        try:
            if os.lstat(folder).st_mtime < older_than:
                settled.append(folder)
        except OSError:
            continue
    removed = 0
    for folder in settled:
        try:
            os.rmdir(folder)
        except OSError:
            continue  # not empty, gone, or not ours to remove
        removed += 1
    return removed


def settled_candidates(paths: LakePaths, settings: Settings, now: float) -> tuple[list[Path], int]:
    """Settled files and links under Ingest, and the count of unsettled ones (stat only).

    For the sensor: cheap enough for every tick. Ignored non-DICOM files are
    included (telling them apart needs a read); they stay the same from tick to
    tick, so they do not change :func:`ingest_fingerprint`.
    """
    settled: list[Path] = []
    unsettled = 0
    for item in walk_ingest(paths, settings):
        if item.kind == SPECIAL:
            continue
        if item.settled(settings.settle_seconds, now):
            settled.append(item.path)
        else:
            unsettled += 1
    return settled, unsettled


def ingest_fingerprint(files: Iterable[Path]) -> str:
    """Hex SHA-256 over (path, size, mtime) of ``files``: the sensor cursor.

    Equal sets of unchanged files give equal fingerprints, whatever the order.
    """
    lines: list[bytes] = []
    for f in files:
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            continue
        lines.append(os.fsencode(str(f)) + b"\0" + f"{st.st_size}\0{st.st_mtime_ns}".encode())
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line + b"\n")
    return h.hexdigest()


def journal_file(paths: LakePaths, ns: str, day: str) -> Path:
    return paths.state_dir / "organised" / ns / (check_day(day).replace("/", "-") + ".jsonl")


def append_landed(paths: LakePaths, records: Iterable[LandedFile]) -> None:
    """Append landed records to their (namespace, day) journals, fsynced."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in records:
        line = json.dumps(r.to_json(paths), ensure_ascii=True, sort_keys=True)
        groups.setdefault((r.source_system, r.ingest_date), []).append(line)
    for (ns, day), lines in groups.items():
        fileops.append_lines(journal_file(paths, ns, day), lines)


def load_landed(paths: LakePaths, ns: str, day: str) -> LandedIndex:
    """Landed records of one namespace and day, keyed by absolute ``process_path``.

    Looking up ``<process_path>.zip`` (the compressed file) finds the same
    record. A torn last line (crash during append) is skipped; later lines win.
    """
    out = LandedIndex()
    jf = journal_file(paths, ns, day)
    try:
        raw = jf.read_bytes()
    except FileNotFoundError:
        return out
    for line in raw.splitlines():
        try:
            rec = LandedFile.from_json(paths, json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue
        dict.__setitem__(out, rec.process_path, rec)
    return out


def _is_compressed(path: Path, name: str) -> bool:
    if not name.endswith(".zip"):
        return False
    try:
        return is_zip_magic(fileops.read_head(path, 4))
    except OSError:
        return False


def list_process_files(paths: LakePaths, day: str) -> list[LandedFile]:
    """Every organised DICOM file of partition ``day`` in Process, across namespaces.

    ``process_path`` is the file as it is now (``<file>.zip`` when compressed).
    Lineage comes from the landed journal; without it ``original_path`` is
    derived from the name (``<epoch>_`` prefix and ``.zip`` removed, Ingest
    folder restored), ``mtime`` is the file's own and ``sha256`` is ``None``.
    """
    return list(iter_process_files(paths, day))


def iter_process_files(paths: LakePaths, day: str) -> Iterator[LandedFile]:
    """:func:`list_process_files` one file at a time, a folder's files together and in name order.

    Only one namespace's landed journal is held at a time, so a caller that
    keeps a compact form of each file never holds the day as Python objects.
    """
    check_day(day)
    if not paths.process_root.is_dir():
        return
    for ns_dir in sorted(paths.process_root.iterdir()):
        day_dir = ns_dir / day
        if ns_dir.name.startswith(".") or not day_dir.is_dir():
            continue
        ns = ns_dir.name
        index = load_landed(paths, ns, day)
        for dirpath, dirnames, filenames in os.walk(day_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name.endswith(fileops.PART_SUFFIX):
                    continue
                # os.path, not pathlib: a Path interns every part of its name, so each
                # file of the day would grow the interpreter's table of interned strings.
                key = os.path.join(dirpath, name)
                rec = dict.get(index, key)
                if rec is None and name.endswith(".zip"):
                    rec = dict.get(index, key[:-4])
                if rec is not None:
                    yield _with_path(rec, key)
                    continue
                try:
                    st = os.lstat(key)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                base = name[:-4] if _is_compressed(Path(key), name) else name
                base = EPOCH_PREFIX.sub("", base, count=1)
                sub = Path(dirpath).relative_to(day_dir)
                original = paths.ingest_root / ns / sub / base
                yield LandedFile(key, fileops.display_path(original), ns, None, st.st_size, st.st_mtime, day)


def _with_path(rec: LandedFile, path: str) -> LandedFile:
    if rec.process_path == path:
        return rec
    return LandedFile(path, rec.original_path, rec.source_system, rec.sha256, rec.size, rec.mtime, rec.ingest_date)


__all__ = [
    "IngestItem",
    "LandedFile",
    "LandedIndex",
    "LANDED_SCHEMA",
    "landed_rows",
    "walk_ingest",
    "settled_candidates",
    "ingest_fingerprint",
    "journal_file",
    "append_landed",
    "load_landed",
    "list_process_files",
    "iter_process_files",
    "FILE",
    "LINK",
    "SPECIAL",
]
