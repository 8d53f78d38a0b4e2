"""Peak memory and bytes read of a workload and every process it starts.

A workload runs as a child interpreter (``python -m benchmarks.bench_memory
child module:function '<json kwargs>' <out.json>``) in its own session. A
thread of the harness samples ``/proc`` every :data:`INTERVAL` seconds and
sums over the child and all its descendants (the ``spawn`` workers of the
local engine, Spark's JVM and its Python workers):

* RSS (``VmRSS``): the sum is an upper bound of the tree's real footprint,
  since pages shared between processes are counted once per process;
* ``VmHWM`` of each process: its exact own peak, even between samples;
* ``rchar`` / ``read_bytes`` from ``/proc/<pid>/io``: bytes returned by read
  calls (page-cache hits included, memory-mapped reads excluded) and bytes
  fetched from storage. A process's counters move to its parent when it is
  reaped, so the sums stay monotone.

On exit, ``wait4`` gives the child's own rusage (``ru_maxrss`` of the
largest process in its tree). A tree whose RSS passes ``rss_limit`` is
killed (its whole session) so a runaway never endangers the machine.

The memory section of ``make bench`` (peak RSS at N files in one partition)
is :func:`summarize` over the base-lake builds of :mod:`benchmarks.bench_incremental`.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
INTERVAL = 0.1
#: Default ceiling for any measured tree (the machine has 24 GiB; targets are ~1 GiB).
DEFAULT_RSS_LIMIT = int(os.environ.get("BENCH_RSS_LIMIT_MB", "12288")) * MiB
_IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields resume after the last ')'.
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) > 1:
            kids[int(rest[1])].append(int(name))
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant."""
    kids = _children_map()
    out, stack = [root], [root]
    while stack:
        for child in kids.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes; (0, 0) for a process that is gone or a zombie."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """I/O counters of ``pid`` (its reaped children included); zeros when unreadable."""
    out = dict.fromkeys(_IO_KEYS, 0)
    try:
        with open(f"/proc/{pid}/io", "rb") as fh:
            for line in fh:
                key, _, value = line.decode().partition(":")
                if key in out:
                    out[key] = int(value)
    except (OSError, ValueError):
        pass
    return out


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Counter differences in MiB."""
    return {f"{k}_mb": round((after[k] - before[k]) / MiB, 2) for k in _IO_KEYS}


def machine_cpu_ticks() -> int:
    """Busy clock ticks of all CPUs since boot (``/proc/stat``: everything but idle and iowait)."""
    with open("/proc/stat", "rb") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` plus that of its reaped children (cutime + cstime), in ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return 0
    rest = data[data.rfind(b")") + 2 :].split()
    return sum(int(x) for x in rest[11:15])


TICK = os.sysconf("SC_CLK_TCK")


def machine_busy(seconds: float = 3.0) -> float:
    """CPUs kept busy by *everyone* over ``seconds`` (call it while nothing of ours runs)."""
    a, t0 = machine_cpu_ticks(), time.monotonic()
    time.sleep(seconds)
    return (machine_cpu_ticks() - a) / TICK / (time.monotonic() - t0)


def wait_quiet(max_wait: float, threshold: float = 0.3) -> dict[str, float]:
    """Wait (at most ``max_wait`` s) until other processes keep fewer than ``threshold`` CPUs busy."""
    start = time.monotonic()
    busy = machine_busy()
    while busy >= threshold and time.monotonic() - start < max_wait:
        time.sleep(7)
        busy = machine_busy()
    return {"waited_s": round(time.monotonic() - start, 1), "busy_cpus": round(busy, 2)}


@dataclass
class Sample:
    t: float
    rss: int
    procs: int
    rchar: int
    read_bytes: int
    #: CPU ticks of the tree and of the whole machine, to tell how busy *other* processes kept the CPUs.
    tree_ticks: int = 0
    machine_ticks: int = 0


class TreeSampler(threading.Thread):
    """Samples the RSS and I/O of a process tree until :meth:`stop`."""

    def __init__(self, pid: int, *, interval: float = INTERVAL, rss_limit: int | None = None) -> None:
        super().__init__(daemon=True, name=f"sampler-{pid}")
        self.pid, self.interval, self.rss_limit = pid, interval, rss_limit
        self.samples: list[Sample] = []
        self.hwm: dict[int, int] = {}
        self.exceeded = False
        self._halt = threading.Event()

    def sample(self) -> Sample:
        rss = rchar = read_bytes = ticks = 0
        machine = machine_cpu_ticks()
        pids = tree_pids(self.pid)
        for pid in pids:
            ticks += proc_cpu_ticks(pid)
            r, h = proc_status(pid)
            rss += r
            if h:
                self.hwm[pid] = max(self.hwm.get(pid, 0), h)
            io = proc_io(pid)
            rchar += io["rchar"]
            read_bytes += io["read_bytes"]
        s = Sample(time.time(), rss, len(pids), rchar, read_bytes, ticks, machine)
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._halt.is_set():
            s = self.sample()
            if self.rss_limit and s.rss > self.rss_limit and not self.exceeded:
                self.exceeded = True
                kill_session(self.pid)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    @property
    def peak_rss(self) -> int:
        """The tree's peak RSS: the largest sample, or the largest process's own peak if higher.

        The tree at its peak holds at least its largest process at that
        process's peak (``VmHWM``, exact), which samples 0.1 s apart can miss:
        a 10,000-file build once sampled 555.6 MiB for a process that peaked
        at 584.3 MiB.
        """
        return max(max((s.rss for s in self.samples), default=0), self.peak_process_hwm)

    @property
    def peak_process_hwm(self) -> int:
        return max(self.hwm.values(), default=0)

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Peak tree RSS, the RSS at the start, and bytes read between wall-clock times ``t0`` and ``t1``.

        The start tells a step's own growth from what the process already held.
        """
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        before = [s for s in self.samples if s.t <= t0]
        after = [s for s in self.samples if s.t <= t1]
        first = before[-1] if before else (self.samples[0] if self.samples else None)
        last = after[-1] if after else first
        peak = max((s.rss for s in inside), default=last.rss if last else 0)
        return {
            "peak_rss_mb": round(peak / MiB, 1),
            "start_rss_mb": round((inside[0].rss if inside else peak) / MiB, 1),
            "rchar_mb": round(max(0, (last.rchar - first.rchar)) / MiB, 2) if first and last else 0.0,
            "samples": len(inside),
        }

    def other_load(self) -> float | None:
        """Average number of CPUs kept busy by processes outside the tree while it ran.

        Non-zero means someone else shared the machine: wall times are then
        pessimistic (CPU-time figures are less affected).
        """
        if len(self.samples) < 2:
            return None
        a, b = self.samples[0], self.samples[-1]
        if b.t <= a.t:
            return None
        other = (b.machine_ticks - a.machine_ticks) - (b.tree_ticks - a.tree_ticks)
        return round(max(0, other) / TICK / (b.t - a.t), 2)


def kill_session(pid: int) -> None:
    """Kill the session (process group) of a child this harness started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class ChildRun:
    """What :func:`measured_child` observed; ``result`` is what the child function returned."""

    target: str
    returncode: int | None
    wall_s: float
    result: dict[str, Any] | None
    sampler: TreeSampler
    maxrss_mb: float
    log: str
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None and "error" not in self.result

    def memory(self) -> dict[str, Any]:
        return {
            "peak_rss_tree_mb": round(self.sampler.peak_rss / MiB, 1),
            "peak_rss_largest_process_mb": round(self.sampler.peak_process_hwm / MiB, 1),
            "rusage_maxrss_mb": self.maxrss_mb,
            "max_processes": max((s.procs for s in self.sampler.samples), default=0),
            "other_load_cpus": self.sampler.other_load(),
        }


def measured_child(
    target: str,
    kwargs: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 1800.0,
    rss_limit: int | None = DEFAULT_RSS_LIMIT,
    log_dir: Path | None = None,
) -> ChildRun:
    """Run ``module:function(**kwargs)`` in a fresh interpreter, sampling its process tree."""
    log_dir = log_dir or Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, out = tempfile.mkstemp(prefix="bench_child_", suffix=".json", dir=log_dir)
    os.close(fd)
    log_path = Path(out).with_suffix(".log")
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "child", target, json.dumps(kwargs), out]
    notes: list[str] = []
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=log, start_new_session=True)
        sampler = TreeSampler(proc.pid, rss_limit=rss_limit)
        sampler.start()
        status, rusage = _wait(proc.pid, timeout)
        if status is None:
            notes.append(f"timed out after {timeout:.0f} s: killed")
            kill_session(proc.pid)
            _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    if sampler.exceeded:
        notes.append(f"killed: tree RSS passed {rss_limit // MiB if rss_limit else 0} MiB")
    kill_session(proc.pid)  # leftovers of the session (none when the child cleaned up)
    result = None
    try:
        text = Path(out).read_text()
        result = json.loads(text) if text.strip() else None
    except (OSError, json.JSONDecodeError):
        result = None
    os.unlink(out)
    log_text = log_path.read_text(errors="replace")
    log_path.unlink()
    return ChildRun(
        target=target,
        returncode=proc.returncode,
        wall_s=round(wall, 3),
        result=result,
        sampler=sampler,
        maxrss_mb=round(rusage.ru_maxrss / 1024, 1) if rusage else 0.0,
        log=log_text[-4000:],
        notes=notes,
    )


def _wait(pid: int, timeout: float) -> tuple[int | None, Any]:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        wpid, status, rusage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return status, rusage
        if time.monotonic() > deadline:
            return None, None
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def summarize(points: list[dict[str, Any]], *, limit_mb: float = 1024.0) -> dict[str, Any]:
    """Peak RSS against file count, from base-lake builds (one partition of N files each).

    Each point holds ``instances`` and a ``run`` from
    :func:`benchmarks.bench_pipeline.measured_materialize`. Reported: the tree
    peak of the whole run and of the extraction step alone, and how much they
    grow from the smallest to the largest N (memory must not follow N).
    """
    rows = []
    for p in sorted(points, key=lambda p: p["instances"]):
        run = p["run"]
        steps = {s["step"]: s for s in run.get("steps", [])}
        ext = steps.get("bronze__dicomimagingmetastore", {})
        by_step = sorted(
            ((s["step"], s.get("peak_rss_mb", 0.0)) for s in run.get("steps", [])), key=lambda x: -x[1]
        )
        rows.append({
            "instances": p["instances"],
            "files_on_disk": p.get("files_on_disk"),
            "success": run.get("success"),
            "peak_rss_tree_mb": run.get("peak_rss_tree_mb"),
            "peak_rss_largest_process_mb": run.get("peak_rss_largest_process_mb"),
            "extraction_peak_rss_tree_mb": ext.get("peak_rss_mb"),
            "peak_step": by_step[0][0] if by_step else None,
            "peak_rss_by_step_mb": dict(by_step),
        })
    out: dict[str, Any] = {"points": rows, "limit_mb": limit_mb}
    if len(rows) >= 2 and rows[0]["peak_rss_tree_mb"] and rows[-1]["peak_rss_tree_mb"]:
        # Three decimals: a target of x1.25 must not be met by rounding 1.2507 down.
        out["growth_whole_run"] = round(rows[-1]["peak_rss_tree_mb"] / rows[0]["peak_rss_tree_mb"], 3)
        if rows[0]["extraction_peak_rss_tree_mb"] and rows[-1]["extraction_peak_rss_tree_mb"]:
            out["growth_extraction"] = round(
                rows[-1]["extraction_peak_rss_tree_mb"] / rows[0]["extraction_peak_rss_tree_mb"], 3
            )
        out["files_ratio"] = round(rows[-1]["instances"] / rows[0]["instances"], 1)
    return out


def _child_main(target: str, kwargs_json: str, out: str) -> int:
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        result = fn(**json.loads(kwargs_json))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - the parent records any failure
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        code = 1
    with open(out, "w") as fh:
        json.dump(result, fh, default=str)
    return code


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "child":
        sys.exit(_child_main(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit("usage: python -m benchmarks.bench_memory child module:function '<json kwargs>' OUT.json")
