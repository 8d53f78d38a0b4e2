"""The organise step's intent journal: plans written before anything moves, rolled forward after a crash.

A *plan* (a batch of plain files and whole ZIPs) lists every step: source,
target, expected SHA-256, source stat, and the record to write (landed
journal line or ``.error.json``). :func:`run_plan` writes it durably to
``_state/organise/intents`` before acting; :func:`execute` brings each step
to "target in place, source gone" idempotently, so :func:`recover` can roll
any leftover plan forward after a kill -9. See :mod:`dicom_assets.lake.organise`
for the rules that decide what a plan holds.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from dicom_assets.columnar import Rows
from dicom_assets.config import Settings
from dicom_assets.lake import fileops
from dicom_assets.lake.discover import IngestItem, LandedFile, append_landed, landed_rows, load_landed
from dicom_assets.lake.failures import FailedFile, error_json_for, error_record, write_error_json
from dicom_assets.lake.fssync import BatchSync
from dicom_assets.lake.paths import LakePaths

log = logging.getLogger("dicom_assets.lake.organise")
STAGE = "organise"


@dataclass
class OrganiseRun:
    paths: LakePaths
    settings: Settings
    day: str
    landed: Rows[LandedFile] = field(default_factory=landed_rows)
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
    # Plans run in a thread of their own (PlanRunner) and count their deferrals too.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def defer(self, n: int = 1) -> None:
        """Count ``n`` files left for the next run (safe from the plan thread too)."""
        with self._lock:
            self.deferred += n

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


def _plan_path(run: OrganiseRun) -> Path:
    return run.state / "intents" / f"{time.time_ns():020d}-{uuid.uuid4().hex}.json"


def plan_step(
    run: OrganiseRun,
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


def item_step(
    run: OrganiseRun, item: IngestItem, op: str, sha: str | None, error: tuple[str, str] = ("", "")
) -> dict[str, Any]:
    """:func:`plan_step` for a file found in Ingest (its stat is checked again before it moves)."""
    return plan_step(
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


def same_stat(src: Path, key: list[int] | None) -> bool:
    """True when ``src`` still has the (size, mtime_ns, inode) a plan recorded (``None``: not checked)."""
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
    if not same_stat(src, step["stat"]):
        return False  # changed since the plan was made: the next scan decides again
    fileops.remove_quietly(fileops.part_path(dst))
    fileops.durable_move(src, dst, expect_sha256=step["sha"], sync_dirs=sync)
    return True


def execute(run: OrganiseRun, plan: dict[str, Any], plan_file: Path) -> None:
    """Do every step, sync folders, write records, delete fully landed ZIPs, then remove the intent."""
    plan = _normalised(plan)
    sync: set[Path] = set()
    done: list[dict[str, Any]] = []
    retry = False
    for step in plan["steps"]:
        try:
            ok = _do_step(step, sync)
        except OSError as exc:
            log.warning("organise: could not move %s: %s", fileops.display_path(step["src"]), exc.strerror)
            ok, retry = False, True
        fileops.crash_point("organise:step")
        if ok:
            done.append(step)
    fileops.sync_all(sync)
    fileops.crash_point("organise:synced")
    for step in done:
        if step["op"] == "fail":
            run.failed.append(write_error_json(run.paths, error_json_for(Path(step["dst"])), step["record"]))
    landed = [LandedFile.from_json(run.paths, s["record"]) for s in done if s["op"] == "land"]
    append_landed(run.paths, _not_yet_journalled(run.paths, landed) if plan.get("recovering") else landed)
    run.landed.extend(landed)
    fileops.crash_point("organise:recorded")
    if retry:
        # An I/O error (disk full, permissions): keep the plan so the next run
        # finishes it; its sources are not planned again meanwhile. A ZIP whose
        # members all landed is deleted by that run (it has no step left).
        plan["recovering"] = True
        plan["steps"] = [s for s in plan["steps"] if s not in done]  # the done ones are recorded
        fileops.atomic_write_json(plan_file, plan, indent=None)
        run.pending.update(_plan_sources(plan))
        run.staging_in_use.update(plan["stagings"])
        run.defer(len(plan["steps"]))
        return
    _delete_landed_zips(plan, done)
    os.unlink(plan_file)
    for staging in plan["stagings"]:
        shutil.rmtree(staging, ignore_errors=True)


def _delete_landed_zips(plan: dict[str, Any], done: list[dict[str, Any]]) -> None:
    """Unlink each ZIP of the plan whose member steps are all done and which is unchanged."""
    finished = {id(s) for s in done}
    folders: set[Path] = set()
    for i, z in enumerate(plan["zips"]):
        members_done = all(id(s) in finished for s in plan["steps"] if s.get("zip") == i)
        if members_done and same_stat(Path(z["src"]), z["stat"]):
            os.unlink(z["src"])
            folders.add(Path(z["src"]).parent)
            fileops.crash_point("organise:zip_deleted")
        elif not members_done and os.path.lexists(z["src"]):
            log.error("organise: ZIP %s kept: not every member landed", fileops.display_path(z["src"]))
    fileops.sync_all(folders)


def _normalised(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan with ``zips`` and ``stagings`` lists (plans of earlier versions held one ``zip``/``staging``)."""
    if "zip" in plan:
        z = plan.pop("zip")
        plan["zips"] = [z] if z else []
        if z:
            for step in plan["steps"]:
                step.setdefault("zip", 0)
    if "staging" in plan:
        st = plan.pop("staging")
        plan["stagings"] = [st] if st else []
    plan.setdefault("zips", [])
    plan.setdefault("stagings", [])
    return plan


def _plan_sources(plan: dict[str, Any]) -> set[str]:
    return {s["src"] for s in plan["steps"]} | {z["src"] for z in plan["zips"]}


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


def _sync_staged(
    run: OrganiseRun, steps: list[dict[str, Any]], zips: list[dict[str, Any]], stagings: list[str], sync: BatchSync
) -> bool:
    """Make the plan's staged ZIP members durable, then their folders, before the intent names them.

    ``sync`` watched the staging folders before the members were written (one
    ``syncfs`` then covers members and folders alike; else each member and
    each folder is fsynced). False when a sync failed (an I/O error): nothing
    of the plan has moved and no intent is written; its staging folders go
    and its Ingest files (loose files and ZIPs) stay for the next run,
    counted as deferred.
    """
    roots = tuple(os.path.join(folder, "") for folder in stagings)
    staged = [step["src"] for step in steps if step["src"].startswith(roots)]
    errors = [e for e in sync.sync(staged) if e is not None]
    if not errors and not sync.whole_filesystems:
        try:
            for folder in stagings:
                fileops.fsync_dir(Path(folder))
        except OSError as exc:
            errors.append(exc)
    if errors:
        log.warning(
            "organise: cannot sync the extraction of %d ZIP(s): %s; their batch is left for the next run",
            len(stagings), getattr(errors[0], "strerror", errors[0]),
        )
        for folder in stagings:
            shutil.rmtree(folder, ignore_errors=True)
        run.defer(len(steps) - len(staged) + len(zips))
        return False
    for _folder in stagings:
        fileops.crash_point("organise:staged")
    return True


def run_plan(run: OrganiseRun, steps: list[dict[str, Any]], *, sync: BatchSync | None = None, **extra: Any) -> None:
    """Write the plan durably, then execute it (``zips``/``stagings`` in ``extra``: see :class:`PlanBatch`).

    Staged ZIP members are synced first (:func:`_sync_staged`, through
    ``sync`` if the batch watched its staging folders): a plan's sources are
    durable before its intent exists.
    """
    with sync or BatchSync() as batch_sync:
        if not steps and not extra.get("zips"):
            return
        stagings = extra.get("stagings") or []
        if stagings and not _sync_staged(run, steps, extra.get("zips") or [], stagings, batch_sync):
            return
    plan = {"steps": steps, **extra}
    plan_file = _plan_path(run)
    fileops.atomic_write_json(plan_file, plan, indent=None)
    fileops.crash_point("organise:intent")
    execute(run, plan, plan_file)


@dataclass
class PlanBatch:
    """Steps gathered into one plan: plain files, and whole ZIPs whose archive goes once all members landed.

    One plan (and its intent file, folder syncs and journal append) per batch
    rather than per ZIP: with archives of a dozen files, the per-plan fsyncs
    cost more than the moves. Every staging folder listed, and the members
    staged in it, is synced before the plan is written (:func:`run_plan`).
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    zips: list[dict[str, Any]] = field(default_factory=list)
    stagings: list[str] = field(default_factory=list)
    sync: BatchSync = field(default_factory=BatchSync)

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: dict[str, Any]) -> None:
        """A file found in Ingest (or a ZIP refused whole)."""
        self.steps.append(step)

    def watch_staging(self, folder: str) -> None:
        """Call before ZIP members are written into or below ``folder``: the plan syncs them."""
        self.sync.watch(folder)

    def add_zip(self, steps: list[dict[str, Any]], *, src: str, stat: list[int], staging: str) -> None:
        """A ZIP's staged members; the archive is deleted once they all landed and it is unchanged."""
        index = len(self.zips)
        self.zips.append({"src": src, "stat": stat})
        for step in steps:
            step["zip"] = index
        self.steps.extend(steps)
        self.stagings.append(staging)

    def add_staged(self, steps: list[dict[str, Any]], staging: str) -> None:
        """Staged members whose archive has its own step (a partly corrupt ZIP going to Failed)."""
        self.steps.extend(steps)
        self.stagings.append(staging)

    def flush(self, run: OrganiseRun, runner: PlanRunner | None = None) -> None:
        """Run the gathered plan (through ``runner`` if given), then start empty."""
        steps, zips, stagings, sync = self.steps, self.zips, self.stagings, self.sync
        self.steps, self.zips, self.stagings, self.sync = [], [], [], BatchSync()
        if runner is None:
            run_plan(run, steps, sync=sync, zips=zips, stagings=stagings)
        else:
            runner.submit(run, steps, sync=sync, zips=zips, stagings=stagings)


class PlanRunner:
    """Runs plans one after the other in a thread of its own, while the caller gathers the next.

    Organising a batch has two halves of like cost: reading, hashing and
    extracting the files (the caller's :class:`PlanBatch`), then writing the
    intent, moving, syncing and journalling them (:func:`run_plan`). Most of
    the second half waits for the disk or runs in the kernel, so the halves
    overlap well on two cores. A plan starts only once the one before it has
    finished, so plans keep their order and at most one runs at a time; each
    still writes its intent before it moves anything, so :func:`recover` rolls
    forward whatever a kill interrupts. Use it as a context manager: leaving
    the block waits for the last plan (the caller holds the organise lock
    until then) and raises its error, unless the block is already raising.
    """

    def __init__(self) -> None:
        self._running: Future[None] | None = None

    def submit(self, run: OrganiseRun, steps: list[dict[str, Any]], **extra: Any) -> None:
        """Wait for the plan before (raising its error), then start :func:`run_plan` on this one."""
        self.wait()
        self._running = fileops.shared_thread_pool("organise-plan", 1).submit(run_plan, run, steps, **extra)

    def wait(self) -> None:
        """Wait until no plan runs; raise the error of the one that ran last, if any."""
        running, self._running = self._running, None
        if running is not None:
            running.result()

    def __enter__(self) -> PlanRunner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            self.wait()
            return
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the error already raising is the one to report
            log.exception("organise: a plan failed while the run was already failing")


def recover(run: OrganiseRun) -> None:
    """Roll every leftover intent forward, then drop staging folders no kept plan refers to."""
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
            execute(run, plan, f)
            run.recovered += 1
    # Staging folders of kept plans are still referenced; any other is a
    # half-done extraction whose ZIP is still in Ingest.
    keep = {Path(p).name for p in run.staging_in_use}
    staging = run.state / "staging"
    if staging.is_dir():
        for d in staging.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
