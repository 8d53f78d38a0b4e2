"""Organise (asset 1, SPEC §3.1): Ingest → Process, ZIPs extracted, refusals to Failed.

Crash safety rests on an intent journal in ``_state/organise/intents``. Work
is done in *plans*: a batch of plain files, or one ZIP. A plan lists every
step (source, target, expected SHA-256, source stat, the record to write) and
is written and fsynced **before** anything moves; ZIP members are first
extracted into a staging folder (and fsynced) so a plan's sources are always
durable. Executing a plan moves each step (atomic rename, or copy + fsync +
rename + unlink across filesystems), fsyncs the touched folders, then writes
the records (landed journal, ``.error.json``), deletes the ZIP, and last
removes the intent. Each step is idempotent by the state on disk:

* target there, source gone → done; target and source there → a cross-fs copy
  finished (checked by hash), unlink the source; only the source there → move
  it, if it still has the stat the plan saw (else the next scan decides anew).

At start, :func:`organise` rolls every leftover intent forward this way and
removes staging folders no intent refers to. So a kill -9 anywhere, followed
by a re-run, ends where an uninterrupted run ends: no file lost, none twice.
A step that hits an I/O error (disk full) keeps its plan for the next run,
whose scan leaves that plan's sources alone. Runs are serialised by a
``flock`` on ``_state/organise/lock``.

Error classes in Failed: ``NotDicom`` (``.dcm`` that is not DICOM),
``TooLarge``, ``SymlinkOutsideLake`` / ``SymlinkNotFollowed`` (the link itself
is moved, never its target), and for archives ``CorruptZip``, ``ZipTooLarge``,
``ZipSlip``, ``ZipBomb``, ``ZipTooDeep``, ``ZipTooManyMembers``,
``ZipEncrypted``, ``ZipUnsupported`` (see :mod:`dicom_assets.dicom.zipsafe`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_assets.config import Settings
from dicom_assets.dicom import zipsafe
from dicom_assets.dicom.sniff import SNIFF_BYTES, looks_like_dicom
from dicom_assets.lake import fileops
from dicom_assets.lake.discover import (
    FILE,
    LINK,
    SPECIAL,
    IngestItem,
    LandedFile,
    append_landed,
    ingest_fingerprint,
    list_process_files,
    load_landed,
    settled_candidates,
    walk_ingest,
)
from dicom_assets.lake.failures import (
    FailedFile,
    check_day,
    error_json_for,
    error_record,
    list_failed,
    move_to_failed,
    write_error_json,
)
from dicom_assets.lake.paths import LakePaths

log = logging.getLogger(__name__)
STAGE = "organise"
_crash_point = fileops.crash_point


@dataclass(frozen=True)
class OrganiseResult:
    """What one organise run did.

    ``landed``/``failed``: files moved to Process/Failed by this call (plans
    rolled forward from an interrupted run included, counted in ``recovered``).
    ``ignored``: non-DICOM files (and ZIPs without DICOM) left in Ingest;
    ``unsettled``: files still changing, left for the next run;
    ``skipped_members``: non-DICOM ZIP members not extracted;
    ``deferred``: left after an I/O error, retried next run.
    """

    landed: list[LandedFile]
    failed: list[FailedFile]
    ignored: int
    unsettled: int
    skipped_members: int = 0
    deferred: int = 0
    recovered: int = 0


@dataclass
class _Run:
    paths: LakePaths
    settings: Settings
    day: str
    landed: list[LandedFile] = field(default_factory=list)
    failed: list[FailedFile] = field(default_factory=list)
    ignored: int = 0
    unsettled: int = 0
    skipped_members: int = 0
    deferred: int = 0
    recovered: int = 0
    last_us: int = 0
    #: Sources held by a plan kept for retry: not planned twice.
    pending: set[str] = field(default_factory=set)
    staging_in_use: set[str] = field(default_factory=set)

    @property
    def state(self) -> Path:
        return self.paths.state_dir / "organise"

    def epoch(self) -> str:
        """Unix time in microseconds, strictly increasing within the run."""
        self.last_us = max(time.time_ns() // 1000, self.last_us + 1)
        return f"{self.last_us // 1_000_000}.{self.last_us % 1_000_000:06d}"

    def target(self, base: Path, sub: tuple[str, ...], name: str) -> Path:
        # "<10-digit seconds>.<6 digits>_" takes 18 bytes of the name budget.
        safe = fileops.fit_name(fileops.safe_component(name), fileops.MAX_NAME_BYTES - 18)
        folder = base.joinpath(*sub)
        while True:
            t = folder / f"{self.epoch()}_{safe}"
            if not os.path.lexists(t):
                return t


# --------------------------------------------------------------------------- plans


def _plan_path(run: _Run) -> Path:
    return run.state / "intents" / f"{time.time_ns():020d}-{uuid.uuid4().hex}.json"


def _step(
    run: _Run,
    op: str,
    src: Path,
    stat_key: list[int] | None,
    *,
    ns: str,
    sub: tuple[str, ...],
    name: str,
    original: str,
    size: int,
    sha: str | None,
    mtime: float = 0.0,
    error: tuple[str, str] = ("", ""),
) -> dict[str, Any]:
    """One plan step: ``op`` is ``land`` (to Process) or ``fail`` (to Failed, ``error`` = class, message)."""
    base = run.paths.process_dir(ns, run.day) if op == "land" else run.paths.failed_dir(ns, run.day)
    dst = run.target(base, sub, name)
    if op == "land":
        record = LandedFile(str(dst), original, ns, sha, size, mtime, run.day).to_json(run.paths)
    else:
        record = error_record(
            run.paths,
            failed_path=dst,
            original_path=original,
            ns=ns,
            day=run.day,
            stage=STAGE,
            error_class=error[0],
            message=error[1],
            size=size,
            sha256=sha,
        )
    return {"op": op, "src": str(src), "dst": str(dst), "stat": stat_key, "sha": sha, "record": record}


def _item_step(
    run: _Run, item: IngestItem, op: str, sha: str | None, error: tuple[str, str] = ("", "")
) -> dict[str, Any]:
    return _step(
        run,
        op,
        item.path,
        item.stat_key(),
        ns=item.ns,
        sub=item.sub,
        name=os.fsdecode(item.path.name),
        original=fileops.display_path(item.path),
        size=item.size,
        sha=sha,
        mtime=item.mtime,
        error=error,
    )


def _same_stat(src: Path, key: list[int] | None) -> bool:
    if key is None:
        return True
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return False
    return [st.st_size, st.st_mtime_ns, st.st_ino] == key


def _do_step(step: dict[str, Any], sync: set[Path]) -> bool:
    """Bring one step to 'target in place, source gone'. False when it cannot (see module doc)."""
    src, dst = Path(step["src"]), Path(step["dst"])
    src_there, dst_there = os.path.lexists(src), os.path.lexists(dst)
    if dst_there and not src_there:
        return True
    if dst_there:
        same = os.path.islink(dst) if step["sha"] is None else fileops.sha256_file(dst) == step["sha"]
        if not same and step["sha"] is None:
            same = os.lstat(dst).st_size == os.lstat(src).st_size
        if not same:
            log.error("organise: %s exists with other content; %s left in place", dst, src)
            return False
        os.unlink(src)
        sync.add(src.parent)
        return True
    if not src_there:
        log.error("organise: neither %s nor %s exists", src, dst)
        return False
    if not _same_stat(src, step["stat"]):
        return False  # changed since the plan was made: the next scan decides again
    fileops.remove_quietly(fileops.part_path(dst))
    fileops.durable_move(src, dst, expect_sha256=step["sha"], sync_dirs=sync)
    return True


def _execute(run: _Run, plan: dict[str, Any], plan_file: Path) -> None:
    sync: set[Path] = set()
    done: list[dict[str, Any]] = []
    retry = False
    for step in plan["steps"]:
        try:
            ok = _do_step(step, sync)
        except OSError as exc:
            log.warning("organise: could not move %s: %s", fileops.display_path(step["src"]), exc.strerror)
            ok, retry = False, True
        _crash_point("organise:step")
        if ok:
            done.append(step)
    fileops.sync_all(sync)
    _crash_point("organise:synced")
    for step in done:
        if step["op"] == "fail":
            run.failed.append(write_error_json(run.paths, error_json_for(Path(step["dst"])), step["record"]))
    landed = [LandedFile.from_json(run.paths, s["record"]) for s in done if s["op"] == "land"]
    append_landed(run.paths, _not_yet_journalled(run.paths, landed) if plan.get("recovering") else landed)
    run.landed.extend(landed)
    _crash_point("organise:recorded")
    if retry:
        # An I/O error (disk full, permissions): keep the plan so the next run
        # finishes it; its sources are not planned again meanwhile.
        plan["recovering"] = True
        plan["steps"] = [s for s in plan["steps"] if s not in done]  # the done ones are recorded
        fileops.atomic_write_json(plan_file, plan)
        run.pending.update(_plan_sources(plan))
        if plan.get("staging"):
            run.staging_in_use.add(plan["staging"])
        run.deferred += len(plan["steps"])
        return
    z = plan.get("zip")
    if z and len(done) == len(plan["steps"]) and _same_stat(Path(z["src"]), z["stat"]):
        os.unlink(z["src"])
        fileops.fsync_dir(Path(z["src"]).parent)
        _crash_point("organise:zip_deleted")
    elif z and os.path.lexists(z["src"]) and len(done) != len(plan["steps"]):
        log.error("organise: ZIP %s kept: not every member landed", fileops.display_path(z["src"]))
    os.unlink(plan_file)
    if plan.get("staging"):
        shutil.rmtree(plan["staging"], ignore_errors=True)


def _plan_sources(plan: dict[str, Any]) -> set[str]:
    out = {s["src"] for s in plan["steps"]}
    if plan.get("zip"):
        out.add(plan["zip"]["src"])
    return out


def _not_yet_journalled(paths: LakePaths, landed: list[LandedFile]) -> list[LandedFile]:
    out = []
    cache: dict[tuple[str, str], Any] = {}
    for rec in landed:
        key = (rec.source_system, rec.ingest_date)
        if key not in cache:
            cache[key] = load_landed(paths, *key)
        if rec.process_path not in cache[key]:
            out.append(rec)
    return out


def _run_plan(run: _Run, steps: list[dict[str, Any]], **extra: Any) -> None:
    if not steps and not extra.get("zip"):
        return
    plan = {"steps": steps, **extra}
    plan_file = _plan_path(run)
    fileops.atomic_write_json(plan_file, plan)
    _crash_point("organise:intent")
    _execute(run, plan, plan_file)


def _recover(run: _Run) -> None:
    intents = run.state / "intents"
    if intents.is_dir():
        for f in sorted(intents.iterdir()):
            if f.name.startswith("."):
                f.unlink()  # a torn intent write: nothing was acted on yet
                continue
            try:
                plan = fileops.read_json(f)
            except ValueError as exc:
                # Cannot happen with atomic writes short of disk corruption; guessing could duplicate files.
                raise RuntimeError(f"organise: intent {f} is unreadable; inspect it, then remove it") from exc
            plan["recovering"] = True
            log.warning("organise: rolling forward interrupted plan %s", f.name)
            _execute(run, plan, f)
            run.recovered += 1
    # Staging folders of kept plans are still referenced; any other is a
    # half-done extraction whose ZIP is still in Ingest.
    keep = {Path(p).name for p in run.staging_in_use}
    staging = run.state / "staging"
    if staging.is_dir():
        for d in staging.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- items


def _classify(run: _Run, item: IngestItem, batch: list[dict[str, Any]]) -> None:
    original = fileops.display_path(item.path)

    def fail(error_class: str, message: str, sha: str | None = None) -> None:
        batch.append(_item_step(run, item, "fail", sha, (error_class, message)))

    if item.kind == LINK:
        if run.paths.is_inside(item.path):
            fail("SymlinkNotFollowed", "symlinks in Ingest are not followed; the link itself was moved")
        else:
            fail("SymlinkOutsideLake", "symlink resolves outside the lake; not followed, the link itself was moved")
        return
    try:
        head = fileops.read_head(item.path, SNIFF_BYTES)
    except OSError as exc:
        log.warning("organise: cannot read %s: %s", original, exc.strerror)
        run.deferred += 1
        return
    if zipsafe.is_zip_magic(head):
        _organise_zip(run, item, batch)
        return
    lower = os.fsdecode(item.path.name).lower()
    is_dicom = looks_like_dicom(head)
    if not (is_dicom or lower.endswith(".dcm") or lower.endswith(".zip")):
        run.ignored += 1
        return
    if item.size > run.settings.max_file_bytes:
        fail("TooLarge", f"{item.size} bytes, limit max_file_bytes={run.settings.max_file_bytes}")
        return
    try:
        sha = fileops.sha256_file(item.path)
    except OSError as exc:
        log.warning("organise: cannot read %s: %s", original, exc.strerror)
        run.deferred += 1
        return
    if is_dicom:
        batch.append(_item_step(run, item, "land", sha))
    elif lower.endswith(".dcm"):
        fail("NotDicom", "named .dcm but no DICM prefix at byte 128 and no dataset start", sha)
    else:
        fail("CorruptZip", "named .zip but not a ZIP archive", sha)


def _organise_zip(run: _Run, item: IngestItem, batch: list[dict[str, Any]]) -> None:
    """Extract to staging, check everything, then publish all members in one plan."""
    original = fileops.display_path(item.path)
    staging = run.state / "staging" / uuid.uuid4().hex
    fileops.ensure_dir(staging)
    limits = zipsafe.ZipLimits.from_settings(run.settings)
    corrupt: list[tuple[tuple[str, ...], str]] = []
    try:
        members = zipsafe.extract_zip_safely(
            item.path, staging, limits, looks_like_dicom, head_bytes=SNIFF_BYTES, label=item.path.name,
            corrupt_members=corrupt,
        )
    except zipsafe.ZipRefused as exc:
        shutil.rmtree(staging, ignore_errors=True)
        sha = fileops.sha256_file(item.path) if item.size <= run.settings.max_zip_bytes else None
        batch.append(_item_step(run, item, "fail", sha, (exc.error_class, fileops.display_path(exc.message))))
        return
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        log.warning("organise: cannot extract %s: %s", original, exc.strerror)
        run.deferred += 1
        return
    kept = [m for m in members if m.staged_path is not None]
    if corrupt and not kept:
        shutil.rmtree(staging, ignore_errors=True)
        sha = fileops.sha256_file(item.path)
        batch.append(_item_step(run, item, "fail", sha, ("CorruptZip", fileops.display_path(corrupt[0][1]))))
        return
    if not kept:
        shutil.rmtree(staging, ignore_errors=True)
        if os.fsdecode(item.path.name).lower().endswith(".dcm"):
            sha = fileops.sha256_file(item.path)
            batch.append(_item_step(run, item, "fail", sha, ("NotDicom", "named .dcm but a ZIP without DICOM")))
        else:
            run.ignored += 1  # a ZIP without DICOM (an office document, a README bundle) is not ours
        return
    if not _same_stat(item.path, item.stat_key()):
        shutil.rmtree(staging, ignore_errors=True)
        run.unsettled += 1
        return
    fileops.fsync_dir(staging)
    _crash_point("organise:staged")
    steps: list[dict[str, Any]] = []
    for m in kept:
        assert m.staged_path is not None
        dicom = m.kind == zipsafe.DICOM
        steps.append(
            _step(
                run,
                "land" if dicom else "fail",
                m.staged_path,
                None,
                ns=item.ns,
                sub=item.sub,
                name=m.basename,
                original="!".join([original, *(fileops.display_path(c) for c in m.chain)]),
                size=m.size,
                sha=m.sha256,
                mtime=m.mtime if m.mtime is not None else item.mtime,
                error=("", "") if dicom else ("NotDicom", "ZIP member named .dcm is not DICOM"),
            )
        )
    run.skipped_members += len(members) - len(kept)
    if corrupt:
        # Good members land; the archive, with its unreadable member(s), goes to
        # Failed whole, so no byte is lost and the reason is on record.
        names = ", ".join(repr("!".join(c)) for c, _m in corrupt[:5])
        message = f"{len(corrupt)} unreadable member(s) ({names}); {len(kept)} member(s) extracted: {corrupt[0][1]}"
        steps.append(_item_step(run, item, "fail", fileops.sha256_file(item.path), ("CorruptZip", fileops.display_path(message))))
        _run_plan(run, steps, staging=str(staging))
        return
    _run_plan(run, steps, zip={"src": str(item.path), "stat": item.stat_key()}, staging=str(staging))


def organise(paths: LakePaths, settings: Settings, day: str, *, now: float | None = None) -> OrganiseResult:
    """Move every settled DICOM file in Ingest to ``Process/<ns>/<day>/`` (SPEC §3.1).

    DICOM is decided by content (:func:`looks_like_dicom`), whatever the name.
    ZIPs (by content) are extracted, nested ones too, members flattened into
    the ZIP's own folder; the ZIP is deleted once every member landed. ``.dcm``
    files that are not DICOM, refused ZIPs, oversized files and symlinks go to
    ``Failed/<ns>/<day>/`` with an ``.error.json``; other files stay, counted
    as ignored; files changed within ``settle_seconds`` stay, counted as
    unsettled. Every target is ``<epoch>_<basename>`` under the source's
    sub-folders.
    """
    check_day(day)
    now = time.time() if now is None else now
    run = _Run(paths, settings, day)
    with fileops.exclusive_lock(run.state / "lock"):
        _recover(run)
        batch: list[dict[str, Any]] = []
        for item in walk_ingest(paths, settings):
            if item.kind == SPECIAL:
                run.ignored += 1  # FIFOs, sockets, devices: never opened
                continue
            if not item.settled(settings.settle_seconds, now):
                run.unsettled += 1
                continue
            if str(item.path) in run.pending:
                continue  # already counted as deferred
            assert item.kind in (FILE, LINK)
            _classify(run, item, batch)
            if len(batch) >= max(1, settings.batch_size):  # one intent per batch
                _run_plan(run, batch)
                batch = []
        _run_plan(run, batch)
    return OrganiseResult(
        landed=run.landed,
        failed=run.failed,
        ignored=run.ignored,
        unsettled=run.unsettled,
        skipped_members=run.skipped_members,
        deferred=run.deferred,
        recovered=run.recovered,
    )


__all__ = [
    "OrganiseResult",
    "LandedFile",
    "FailedFile",
    "organise",
    "load_landed",
    "list_process_files",
    "list_failed",
    "move_to_failed",
    "settled_candidates",
    "ingest_fingerprint",
]
