"""Organise (asset 1, SPEC §3.1): Ingest → Process, ZIPs extracted, refusals to Failed.

Crash safety rests on an intent journal in ``_state/organise/intents``. Work
is done in *plans*: a batch of plain files and whole ZIPs. A plan lists every
step (source, target, expected SHA-256, source stat, the record to write) and
is written and fsynced **before** anything moves; ZIP members are first
extracted into a staging folder, which the plan fsyncs before it writes its
intent, so a plan's sources are always durable. Executing a plan moves each
step (atomic rename, or copy + fsync + rename + unlink across filesystems),
fsyncs the touched folders, then writes
the records (landed journal, ``.error.json``), deletes each ZIP whose members all landed, and last
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
from collections.abc import Sequence
from dataclasses import dataclass
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
    ingest_fingerprint,
    iter_process_files,
    list_process_files,
    load_landed,
    prune_empty_folders,
    settled_candidates,
    walk_ingest,
)
from dicom_assets.lake.failures import (
    FailedFile,
    check_day,
    list_failed,
    move_to_failed,
)
from dicom_assets.lake.intents import OrganiseRun, PlanBatch, PlanRunner, item_step, plan_step, recover, same_stat
from dicom_assets.lake.paths import LakePaths

log = logging.getLogger(__name__)


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

    landed: Sequence[LandedFile]
    failed: list[FailedFile]
    ignored: int
    unsettled: int
    skipped_members: int = 0
    deferred: int = 0
    recovered: int = 0


# --------------------------------------------------------------------------- items


def _classify(run: OrganiseRun, item: IngestItem, batch: PlanBatch) -> None:
    original = fileops.display_path(item.path)

    def fail(error_class: str, message: str, sha: str | None = None) -> None:
        batch.add(item_step(run, item, "fail", sha, (error_class, message)))

    if item.kind == LINK:
        if run.paths.is_inside(item.path):
            fail("SymlinkNotFollowed", "symlinks in Ingest are not followed; the link itself was moved")
        else:
            fail("SymlinkOutsideLake", "symlink resolves outside the lake; not followed, the link itself was moved")
        return
    try:
        # One open for the sniff and the hash: a second open per file cost more than the read.
        fd = fileops.open_regular(item.path)
    except OSError as exc:
        log.warning("organise: cannot read %s: %s", original, exc.strerror)
        run.defer()
        return
    sha: str | None = None
    try:
        head = os.pread(fd, SNIFF_BYTES, 0)
        if zipsafe.is_zip_magic(head):
            verdict = "zip"
        else:
            lower = os.fsdecode(item.path.name).lower()
            is_dicom = looks_like_dicom(head)
            if not (is_dicom or lower.endswith(".dcm") or lower.endswith(".zip")):
                verdict = "ignore"
            elif item.size > run.settings.max_file_bytes:
                verdict = "TooLarge"
            else:
                sha = fileops.sha256_fd(fd)
                verdict = "land" if is_dicom else "NotDicom" if lower.endswith(".dcm") else "CorruptZip"
    except OSError as exc:
        log.warning("organise: cannot read %s: %s", original, exc.strerror)
        run.defer()
        return
    finally:
        os.close(fd)
    if verdict == "zip":
        _organise_zip(run, item, batch)
    elif verdict == "ignore":
        run.ignored += 1
    elif verdict == "TooLarge":
        fail("TooLarge", f"{item.size} bytes, limit max_file_bytes={run.settings.max_file_bytes}")
    elif verdict == "land":
        batch.add(item_step(run, item, "land", sha))
    elif verdict == "NotDicom":
        fail("NotDicom", "named .dcm but no DICM prefix at byte 128 and no dataset start", sha)
    else:
        fail("CorruptZip", "named .zip but not a ZIP archive", sha)


def _organise_zip(run: OrganiseRun, item: IngestItem, batch: PlanBatch) -> None:
    """Extract to staging, check everything, then add all members to the batch's plan."""
    original = fileops.display_path(item.path)
    staging = run.state / "staging" / uuid.uuid4().hex
    fileops.ensure_dir(staging)
    batch.watch_staging(str(staging.parent))
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
        batch.add(item_step(run, item, "fail", sha, (exc.error_class, fileops.display_path(exc.message))))
        return
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        log.warning("organise: cannot extract %s: %s", original, exc.strerror)
        run.defer()
        return
    kept = [m for m in members if m.staged_path is not None]
    if corrupt and not kept:
        shutil.rmtree(staging, ignore_errors=True)
        sha = fileops.sha256_file(item.path)
        batch.add(item_step(run, item, "fail", sha, ("CorruptZip", fileops.display_path(corrupt[0][1]))))
        return
    if not kept:
        shutil.rmtree(staging, ignore_errors=True)
        if os.fsdecode(item.path.name).lower().endswith(".dcm"):
            sha = fileops.sha256_file(item.path)
            batch.add(item_step(run, item, "fail", sha, ("NotDicom", "named .dcm but a ZIP without DICOM")))
        else:
            run.ignored += 1  # a ZIP without DICOM (an office document, a README bundle) is not ours
        return
    if not same_stat(item.path, item.stat_key()):
        shutil.rmtree(staging, ignore_errors=True)
        run.unsettled += 1
        return
    # The staged members are made durable by the plan, before it writes its
    # intent (intents.run_plan), together with the other ZIPs of the batch.
    steps: list[dict[str, Any]] = []
    for m in kept:
        assert m.staged_path is not None
        dicom = m.kind == zipsafe.DICOM
        steps.append(
            plan_step(
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
        steps.append(item_step(run, item, "fail", fileops.sha256_file(item.path), ("CorruptZip", fileops.display_path(message))))
        batch.add_staged(steps, str(staging))
        return
    batch.add_zip(steps, src=str(item.path), stat=item.stat_key(), staging=str(staging))


def organise(paths: LakePaths, settings: Settings, day: str, *, now: float | None = None) -> OrganiseResult:
    """Move every settled DICOM file in Ingest to ``Process/<ns>/<day>/`` (SPEC §3.1).

    DICOM is decided by content (:func:`looks_like_dicom`), whatever the name.
    ZIPs (by content) are extracted, nested ones too, members flattened into
    the ZIP's own folder; the ZIP is deleted once every member landed. ``.dcm``
    files that are not DICOM, refused ZIPs, oversized files and symlinks go to
    ``Failed/<ns>/<day>/`` with an ``.error.json``; other files stay, counted
    as ignored; files changed within ``settle_seconds`` stay, counted as
    unsettled. Every target is ``<epoch>_<basename>`` under the source's
    sub-folders. Sub-folders of Ingest left empty for the settle time are
    removed (:func:`prune_empty_folders`); namespace folders always stay.
    """
    check_day(day)
    now = time.time() if now is None else now
    run = OrganiseRun(paths, settings, day)
    folders: list[Path] = []
    with fileops.exclusive_lock(run.state / "lock"):
        recover(run)
        batch = PlanBatch()
        # Each batch's plan runs in the background while the next batch is read.
        with PlanRunner() as runner:
            for item in walk_ingest(paths, settings, folders):
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
                    batch.flush(run, runner)
            batch.flush(run, runner)
        prune_empty_folders(folders, older_than=time.time() - settings.settle_seconds)
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
    "iter_process_files",
    "list_failed",
    "move_to_failed",
    "settled_candidates",
    "ingest_fingerprint",
]
