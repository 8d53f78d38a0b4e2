"""Benchmark the DICOM metadata extractor against the peers' pydicom method.

Peers (Databricks Pixels, Fabric notebooks, most blog posts) read a file with
``pydicom.dcmread``, delete Pixel Data, call ``Dataset.to_json_dict()`` and
``json.dumps``. We walk raw elements straight into the DICOM JSON model and
also produce promoted columns, SHA-256 and lineage. Both run over the same
files of the shared corpus (every loose file, DICOM or not), each in its own
fresh ``spawn``-ed process so that its peak RSS is its own; the page cache is
warmed first so neither pays for the disk.

    .venv/bin/python benchmarks/bench_extract.py [--corpus DIR] [--workers N]

``run(corpus, workers)`` is the entry point for wider benchmarks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicom_assets.dicom.extract import extract_batch, extract_batch_arrow  # noqa: E402
from dicom_assets.dicom.records import ExtractTask  # noqa: E402

DEFAULT_CORPUS = Path(os.environ.get("DICOM_ASSETS_CORPUS", ROOT.parent / "shared" / "dicom-corpus"))
BATCH = 64
_CORPUS_DOCS = {"MANIFEST.tsv", "README.md", "SOURCES.tsv"}


def corpus_files(corpus: Path) -> list[Path]:
    """Every loose file of the corpus (ZIPs and non-DICOM included), not its docs or licences."""
    return [
        p
        for p in sorted(corpus.rglob("*"))
        if p.is_file()
        and p.relative_to(corpus).parts[0] != "LICENSES"
        and not (p.parent == corpus and p.name in _CORPUS_DOCS)
    ]


def tasks_for(files: list[Path]) -> list[ExtractTask]:
    # file_path == path: compression off, the corpus stays untouched.
    return [
        ExtractTask(
            path=str(p),
            file_path=str(p),
            original_path=str(p),
            source_system="bench",
            ingest_date="2024/01/01",
            source_modified_at=p.stat().st_mtime,
        )
        for p in files
    ]


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _warm(files: list[Path]) -> None:
    for p in files:
        with open(p, "rb") as fh:
            while fh.read(1 << 20):
                pass


def baseline_in_process(paths: list[str]) -> dict[str, Any]:
    """The peers' method, one file at a time, in this process."""
    import warnings

    import pydicom

    warnings.simplefilter("ignore")
    ok = failed = 0
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        try:
            ds = pydicom.dcmread(path, force=True)
            if "PixelData" in ds:
                del ds.PixelData
            json.dumps(ds.to_json_dict())
            ok += 1
        except Exception:  # noqa: BLE001 - count what the method cannot read
            failed += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "files": len(paths),
        "ok": ok,
        "failed": failed,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def ours_in_process(paths: list[str]) -> dict[str, Any]:
    """Our ``extract_batch`` over batches of :data:`BATCH` files, in this process."""
    tasks = tasks_for([Path(p) for p in paths])
    rows = failures = 0
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(tasks), BATCH):
        r, f = extract_batch(tasks[i : i + BATCH])
        rows += len(r)
        failures += len(f)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "files": len(paths),
        "ok": rows,
        "failed": failures,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _in_fresh_process(fn: Any, paths: list[str]) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        result: dict[str, Any] = pool.submit(fn, paths).result()
    return result


def _worker_batch(batch: list[ExtractTask]) -> tuple[int, int, float, int]:
    """One pool task: extract a batch to Arrow as the engine does; report counts, RSS and pid."""
    rows, fails = extract_batch_arrow(batch)
    return rows.num_rows, fails.num_rows, _peak_rss_mb(), os.getpid()


def run(corpus: Path, workers: int) -> dict[str, Any]:
    """Extract every loose corpus file with ``workers`` processes; return throughput and memory.

    ``workers`` <= 1 runs in this process; more uses a ``spawn`` process pool
    over batches of :data:`BATCH` tasks (never fork), building Arrow tables in
    the workers as the embedded engine does. Worker start-up (interpreter and
    imports) is timed apart from the extraction itself.
    """
    files = corpus_files(corpus)
    tasks = tasks_for(files)
    _warm(files)
    batches = [tasks[i : i + BATCH] for i in range(0, len(tasks), BATCH)]
    rows = failures = 0
    peaks: dict[int, float] = {}
    startup = 0.0
    if workers <= 1:
        start = time.perf_counter()
        for b in batches:
            r, f, peak, pid = _worker_batch(b)
            rows, failures, peaks[pid] = rows + r, failures + f, peak
        seconds = time.perf_counter() - start
    else:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(_worker_batch, [[] for _ in range(workers * 2)]))  # start and import everywhere
            startup = time.perf_counter() - t0
            start = time.perf_counter()
            for r, f, peak, pid in pool.map(_worker_batch, batches):
                rows, failures = rows + r, failures + f
                peaks[pid] = max(peaks.get(pid, 0.0), peak)
            seconds = time.perf_counter() - start
    return {
        "files": len(files),
        "rows": rows,
        "failures": failures,
        "workers": max(1, workers),
        "startup_seconds": round(startup, 3),
        "seconds": round(seconds, 3),
        "files_per_s": round(len(files) / seconds, 1),
        "mb_per_s": round(sum(p.stat().st_size for p in files) / 1e6 / seconds, 1),
        "peak_rss_mb_per_process": round(max(peaks.values(), default=0.0), 1),
    }


def compare(corpus: Path) -> dict[str, Any]:
    """Peers' method vs ours, each single-process, same files, same run."""
    files = corpus_files(corpus)
    _warm(files)
    paths = [str(p) for p in files]
    base = _in_fresh_process(baseline_in_process, paths)
    ours = _in_fresh_process(ours_in_process, paths)
    base["files_per_s"] = base["files"] / base["seconds"]
    ours["files_per_s"] = ours["files"] / ours["seconds"]
    return {
        "baseline": base,
        "ours": ours,
        "speedup_per_core": ours["files_per_s"] / base["files_per_s"],
        # CPU time is steadier than wall time on shared machines.
        "speedup_cpu": base["cpu_seconds"] / ours["cpu_seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--workers", type=int, default=0, help="also run ours with N processes (0: skip)")
    args = ap.parse_args(argv)
    if not (args.corpus / "MANIFEST.tsv").exists():
        sys.exit(f"corpus not found at {args.corpus}")
    res = compare(args.corpus)
    b, o = res["baseline"], res["ours"]
    print(f"files: {b['files']} (loose files of {args.corpus})")
    print(
        f"peers  (dcmread + del PixelData + to_json_dict + json.dumps): {b['files_per_s']:8.1f} files/s  "
        f"{b['seconds']:6.2f} s  read {b['ok']}, failed {b['failed']}  peak RSS {b['peak_rss_mb']:.0f} MB"
    )
    print(
        f"ours   (extract_batch: JSON model + promoted + sha256):      {o['files_per_s']:8.1f} files/s  "
        f"{o['seconds']:6.2f} s  rows {o['ok']}, failures {o['failed']}  peak RSS {o['peak_rss_mb']:.0f} MB"
    )
    print(
        f"speed-up per core: {res['speedup_per_core']:.1f}x wall, {res['speedup_cpu']:.1f}x CPU "
        f"(CPU s: peers {b['cpu_seconds']:.2f}, ours {o['cpu_seconds']:.2f})"
    )
    if args.workers > 1:
        par = run(args.corpus, args.workers)
        print(
            f"ours with {par['workers']} spawn workers: {par['files_per_s']} files/s, {par['mb_per_s']} MB/s "
            f"(after {par['startup_seconds']} s worker start-up), peak RSS per worker {par['peak_rss_mb_per_process']} MB"
        )


if __name__ == "__main__":
    main()
