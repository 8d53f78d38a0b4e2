"""A comparable snapshot of a whole lake, for kill-and-rerun and order-independence tests.

Two lakes built from the same input must give equal snapshots. What is left
out or normalised, and why it legitimately differs between two correct runs:

* Wall-clock columns: ``createdDatetime`` (metastore, bronze ImagingStudy, id
  maps), ``detectedAt`` (failures), ``msftCreatedDatetime`` /
  ``msftModifiedDatetime`` (silver, gold), ``lastUpdated`` (bronze/silver
  ImagingStudy, derived from ``msftModifiedDatetime``) and the resource's
  ``meta.lastUpdated`` inside ``fhirContent`` and the NDJSON lines. They record
  *when* a row was written, so a run that was killed and resumed writes later
  times. ``sourceModifiedAt`` (the file's own mtime) is compared.
* The ``<epoch>_`` prefix of organised file names (SPEC §2: the time of the
  move, unique per file), which also appears in every column holding a path
  (``filePath``, ``msftFilePath``, ``local_path``, BulkDataURIs in
  ``metadata_string``, the ZIP member name) and the lake root folder (each run
  has its own). Both are replaced by placeholders, never dropped, so a file
  organised twice still shows up as two entries.

Everything else is compared exactly: file contents by SHA-256 (``.zip``
compressed files by their single member's bytes), every row of every table
(sorted), the ids of every id map, the NDJSON content, ``.error.json``
reasons, the landed journal, and what is left in Ingest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from deltalake import DeltaTable

from dicom_assets.lake import delta, delta_read
from dicom_assets.lake.paths import TABLES, LakePaths
from dicom_assets.lake.schemas import TABLE_SCHEMAS

#: Timestamp columns that record when a row was written (see module doc).
WALL_CLOCK_COLUMNS = frozenset(
    {"createdDatetime", "detectedAt", "msftCreatedDatetime", "msftModifiedDatetime", "lastUpdated"}
)
EPOCH = re.compile(r"(?<![0-9])\d{10}\.\d{6}_")
#: Names our writers (and delta-rs) use for files that are not finished yet.
TEMP_NAME = re.compile(r"(\.part$|\.tmp$|^\.tmp-|^_commit_.*\.tmp$)")


def _norm_text(text: str, root: str) -> str:
    return EPOCH.sub("<epoch>_", text.replace(root, "<lake>"))


def _norm(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return _norm_text(value, root)
    if isinstance(value, list):
        return [_norm(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v, root) for k, v in value.items()}
    return value


def _without_last_updated(resource: dict[str, Any]) -> dict[str, Any]:
    meta = resource.get("meta")
    if isinstance(meta, dict):
        resource["meta"] = {k: v for k, v in meta.items() if k != "lastUpdated"}
    return resource


def table_rows(paths: LakePaths, name: str) -> list[str]:
    """Every row of table ``name`` as canonical JSON, wall-clock columns dropped, sorted."""
    root = str(paths.root)
    t = delta_read.read(paths.table_uri(name), TABLE_SCHEMAS[name])
    out = []
    for row in t.to_pylist():
        row = {k: v for k, v in row.items() if k not in WALL_CLOCK_COLUMNS}
        if isinstance(row.get("fhirContent"), str):
            row["fhirContent"] = _without_last_updated(json.loads(row["fhirContent"]))
        out.append(json.dumps(_norm(row, root), sort_keys=True, default=str))
    return sorted(out)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _walk(top: Path) -> list[Path]:
    out: list[Path] = []
    if not top.exists():
        return out
    for dirpath, _dirs, names in os.walk(top):
        out.extend(Path(dirpath) / n for n in names)
    return sorted(out)


def process_files(paths: LakePaths) -> Counter[tuple[str, str, str]]:
    """(normalised path, member name, SHA-256 of the DICOM bytes) of every Process file.

    A ``.zip`` must be complete (CRC-checked) and hold exactly one member.
    """
    root = str(paths.root)
    out: Counter[tuple[str, str, str]] = Counter()
    for p in _walk(paths.process_root):
        rel = _norm_text(str(p), root)
        if p.name.endswith(".zip"):
            with zipfile.ZipFile(p) as zf:
                assert zf.testzip() is None, f"corrupt member in {p}"
                names = zf.namelist()
                assert len(names) == 1, f"{p} holds {names}"
                out[(rel, _norm_text(names[0], root), _sha(zf.read(names[0])))] += 1
        else:
            out[(rel, "", _sha(p.read_bytes()))] += 1
    return out


def failed_files(paths: LakePaths) -> tuple[Counter[tuple[str, str]], Counter[str]]:
    """Failed files by content, and their ``.error.json`` records (``detectedAt`` dropped)."""
    root = str(paths.root)
    files: Counter[tuple[str, str]] = Counter()
    errors: Counter[str] = Counter()
    for p in _walk(paths.failed_root):
        rel = _norm_text(str(p), root)
        if p.name.endswith(".error.json"):
            rec = json.loads(p.read_bytes())
            rec = {k: v for k, v in rec.items() if k not in WALL_CLOCK_COLUMNS}
            errors[json.dumps(_norm(rec, root), sort_keys=True)] += 1
        else:
            files[(rel, _sha(p.read_bytes()))] += 1
    return files, errors


def ndjson_content(paths: LakePaths) -> dict[str, list[str]]:
    root = str(paths.root)
    out = {}
    for p in _walk(paths.ndjson_root()):
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        out[_norm_text(str(p), root)] = [
            json.dumps(_norm(_without_last_updated(json.loads(ln)), root), sort_keys=True) for ln in lines
        ]
    return out


def landed_journal(paths: LakePaths) -> Counter[str]:
    root = str(paths.root)
    out: Counter[str] = Counter()
    for p in _walk(paths.state_dir / "organised"):
        for line in p.read_bytes().splitlines():
            if line.strip():
                out[json.dumps(_norm(json.loads(line), root), sort_keys=True)] += 1
    return out


def leftovers(paths: LakePaths) -> list[str]:
    """Unfinished files anywhere in the lake, and intents or staging folders not cleaned up."""
    found = [str(p) for p in _walk(paths.root) if TEMP_NAME.search(p.name)]
    organise_state = paths.state_dir / "organise"
    for sub in ("intents", "staging"):
        d = organise_state / sub
        if d.is_dir():
            found.extend(str(p) for p in d.iterdir())
    return sorted(found)


def unreferenced_parquet(paths: LakePaths) -> dict[str, int]:
    """Parquet files in a table folder that no commit ever added (a writer died before committing).

    Readers never see them (Delta reads only what the log adds) and a VACUUM
    removes them; they are counted, not compared.
    """
    out: dict[str, int] = {}
    for name in TABLES:
        folder = paths.table(name)
        if not delta.exists(folder):
            continue
        added: set[str] = set()
        for log in (folder / "_delta_log").glob("*.json"):
            for line in log.read_text(encoding="utf-8").splitlines():
                action = json.loads(line) if line.strip() else {}
                if "add" in action:
                    added.add(action["add"]["path"])
        on_disk = {p.name for p in folder.glob("*.parquet")}
        orphans = on_disk - added
        if orphans:
            out[name] = len(orphans)
    return out


def snapshot(root: Path | str) -> dict[str, Any]:
    """Everything two equivalent lakes must agree on (see module doc)."""
    paths = LakePaths.of(root)
    failed, errors = failed_files(paths)
    tables = {}
    for name in TABLES:
        uri = paths.table_uri(name)
        if delta.exists(uri):
            DeltaTable(uri).version()  # readable, log intact
        tables[name] = table_rows(paths, name)
    return {
        "process": process_files(paths),
        "failed": failed,
        "errors": errors,
        "ingest": sorted(_norm_text(str(p), str(paths.root)) for p in _walk(paths.ingest_root)),
        "ndjson": ndjson_content(paths),
        "journal": landed_journal(paths),
        "tables": tables,
    }


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    out = []
    for key in a:
        if key == "tables":
            for name in a[key]:
                x, y = a[key][name], b[key].get(name)
                if x != y:
                    only_a = [r[:400] for r in sorted(set(x) - set(y or []))[:2]]
                    only_b = [r[:400] for r in sorted(set(y or []) - set(x))[:2]]
                    out.append(f"table {name}: {len(x)} vs {len(y or [])} rows; only first: {only_a}; only second: {only_b}")
        elif a[key] != b[key]:
            if isinstance(a[key], Counter):
                out.append(f"{key}: only first {list((a[key] - b[key]).items())[:3]}; only second {list((b[key] - a[key]).items())[:3]}")
            else:
                out.append(f"{key} differs")
    return out
