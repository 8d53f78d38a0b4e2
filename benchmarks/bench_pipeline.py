"""Ingest → gold through the real Dagster path, with per-step times from the event log.

``measured_materialize`` runs ``runner.materialize_partition`` in a child
process (see :mod:`benchmarks.bench_memory`) against a Dagster instance in a
temporary ``DAGSTER_HOME``, then reads the run's ``STEP_START`` /
``STEP_SUCCESS`` events: one run gives the total and the per-asset split.
Each step's peak tree RSS and bytes read come from the harness's samples
in that step's time window.

Also here: the fabric-sample benchmark (:func:`run_fabric`), a cProfile of
every step function and check (:func:`profile_steps`, run in a child), and
the extraction-engine measurements the extraction section needs
(:func:`engine_extraction`, :func:`tag_coverage`).

    .venv/bin/python -m benchmarks.bench_pipeline [--profile]   # fabric sample only
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_memory import MiB, io_delta, measured_child, proc_io  # noqa: E402

#: Dagster step key → the plain step function (dicom_assets/steps) the asset calls.
STEP_FUNCTIONS = {
    "bronze__dicom_files": "steps.bronze.organise_ingest",
    "bronze__dicomimagingmetastore": "steps.bronze.extract_metastore",
    "silver__ImagingMetastore": "steps.silver.merge_instances",
    "bronze__ImagingStudy_ndjson": "steps.fhir_steps.write_ndjson_files",
    "bronze__ImagingStudy": "steps.fhir_steps.load_bronze",
    "silver__ImagingStudy": "steps.fhir_steps.merge_silver",
    "omop_gold": "steps.gold.build_gold",
}
FABRIC_INSTANCES = 7739


def new_dagster_home(folder: Path) -> Path:
    """A throwaway instance (SQLite under ``folder``): bench runs never reach the UI's instance."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return folder


# ---------------------------------------------------------------------------- child side


def materialize(lake: str, partition: str, engine: str = "local", workers: int = 0) -> dict[str, Any]:
    """(Child) one ``materialize_partition`` run; its summary, step events and I/O."""
    import resource
    import warnings

    warnings.simplefilter("ignore")
    import dicom_assets.definitions  # noqa: F401 - imported before the clock starts, as in a long-lived process
    from dicom_assets import runner
    from dicom_assets.config import Settings

    io0, t0 = proc_io(), time.time()
    summary = runner.materialize_partition(
        Settings(lake=lake, settle_seconds=0, engine=engine, workers=workers), partition=partition, progress=False
    )
    io1, t1 = proc_io(), time.time()
    return {
        "summary": summary,
        "started_at": t0,
        "ended_at": t1,
        "io": io_delta(io0, io1),
        "steps": step_events(),
        "maxrss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "maxrss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def step_events() -> list[dict[str, Any]]:
    """Start/end wall-clock time and outcome of every step of the instance's latest run."""
    import dagster as dg

    instance = dg.DagsterInstance.get()
    run = instance.get_runs(limit=1)[0]
    steps: dict[str, dict[str, Any]] = {}
    for rec in instance.all_logs(run.run_id):
        ev = rec.dagster_event
        if ev is None or not ev.step_key:
            continue
        kind = ev.event_type_value
        s = steps.setdefault(ev.step_key, {"step": ev.step_key})
        if kind == "STEP_START":
            s["start"] = rec.timestamp
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED"):
            s["end"] = rec.timestamp
            s["status"] = kind.removeprefix("STEP_").lower()
            if kind == "STEP_FAILURE":
                err = getattr(ev.event_specific_data, "error", None)
                s["error"] = (err.message if err else "")[:400]
    out = []
    for s in steps.values():
        if "start" in s and "end" in s:
            s["seconds"] = round(s["end"] - s["start"], 3)
        s["function"] = STEP_FUNCTIONS.get(s["step"], "check")
        out.append(s)
    return sorted(out, key=lambda s: s.get("start", float("inf")))


# ---------------------------------------------------------------------------- parent side


def measured_materialize(
    lake: Path, partition: str, dagster_home: Path, *, instances: int, timeout: float = 1800.0,
    log_dir: Path | None = None, engine: str = "local",
) -> dict[str, Any]:
    """Materialise ``partition`` of ``lake`` in a measured child; figures for the report."""
    run = measured_child(
        "benchmarks.bench_pipeline:materialize",
        {"lake": str(lake), "partition": partition, "engine": engine},
        env={"DAGSTER_HOME": str(dagster_home), "DAGSTER_TELEMETRY_DISABLED": "1"},
        timeout=timeout,
        log_dir=log_dir,
    )
    out: dict[str, Any] = {"partition": partition, "child_wall_s": run.wall_s, **run.memory()}
    if run.notes:
        out["notes"] = run.notes
    res = run.result or {}
    if not run.ok:
        out["success"] = False
        out["error"] = res.get("error") or f"child exited {run.returncode}"
        out["log_tail"] = (res.get("traceback") or run.log)[-1500:]
        if "steps" not in res:
            return out
    summary = res["summary"]
    seconds = float(summary["seconds"])
    steps = res["steps"]
    for s in steps:
        if "start" in s and "end" in s:
            s.update(run.sampler.window(s["start"], s["end"]))
    assets = [s for s in steps if s["function"] != "check"]
    checks = [s for s in steps if s["function"] == "check"]
    whole = run.sampler.window(res["started_at"], res["ended_at"])
    out.update({
        "success": bool(summary["success"]),
        "seconds": round(seconds, 2),
        "instances": instances,
        "instances_per_s": round(instances / seconds, 1) if seconds else None,
        "assets_s": round(sum(s.get("seconds", 0.0) for s in assets), 2),
        "checks_s": round(sum(s.get("seconds", 0.0) for s in checks), 2),
        "steps": steps,
        "io": res["io"],
        "rchar_sampled_mb": whole["rchar_mb"],
        "maxrss_self_mb": res["maxrss_self_mb"],
        "maxrss_children_mb": res["maxrss_children_mb"],
        "tables": summary["tables"],
        "files": summary["files"],
        "partition_rows": summary["partition_rows"],
    })
    out["orchestration_s"] = round(seconds - out["assets_s"] - out["checks_s"], 2)
    failed = [s["step"] for s in steps if s.get("status") not in ("success",)]
    if failed:
        out["failed_steps"] = failed
    return out


def check_partition(result: dict[str, Any], *, rows: int, failed: int) -> None:
    """Flag a run whose partition does not hold what was dropped (its figures then mean little)."""
    got = result.get("partition_rows") or {}
    if got.get("dicomimagingmetastore") != rows or got.get("dicom_failures") != failed:
        result.setdefault("warnings", []).append(
            f"partition holds {got.get('dicomimagingmetastore')} metastore rows and "
            f"{got.get('dicom_failures')} failures; expected {rows} and {failed}"
        )


def run_fabric(tmp_root: Path, partition: str, *, timeout: float = 900.0) -> dict[str, Any]:
    """The ``fabric`` sample (7,739 instances, 340 studies), Ingest → gold, compression on."""
    from dicom_assets.sample import generate_sample

    work = Path(tempfile.mkdtemp(prefix="fabric_", dir=tmp_root))
    try:
        lake = work / "lake"
        t0 = time.perf_counter()
        sample = generate_sample(lake, "fabric")
        gen_s = time.perf_counter() - t0
        settle_writes()
        result = measured_materialize(
            lake, partition, new_dagster_home(work / "dagster_home"), instances=sample.instances,
            timeout=timeout, log_dir=work,
        )
        check_partition(result, rows=sample.instances, failed=sample.invalid_files)
        result["sample"] = {
            "instances": sample.instances, "studies": sample.studies, "series": sample.series,
            "native_files": sample.native_files, "zip_files": sample.zip_files,
            "nested_zip_files": sample.nested_zip_files, "generate_s": round(gen_s, 2),
            "bytes": _tree_bytes(lake / "bronze" / "Files" / "Process"),
        }
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def settle_writes() -> None:
    """Flush the sample generator's writes before the clock starts.

    Files that settled in Ingest were written back by the kernel long ago; a
    sample written a second before the run would otherwise charge its own
    writeback to the pipeline's first fsyncs (organise took 12.5 s instead
    of 7 s that way).
    """
    os.sync()
    time.sleep(1.0)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


# ---------------------------------------------------------------------------- profiles


def profile_steps(lake: str, partition: str, workers: int = 1, top: int = 10) -> dict[str, Any]:
    """(Child) every step function and check of one partition under cProfile, in order.

    ``workers=1`` keeps extraction in this process so the profile sees it.
    Times include cProfile's overhead (large for pure-Python code such as the
    DICOM walker); use them to rank functions, not as the step's speed.
    """
    import warnings

    warnings.simplefilter("ignore")
    from dicom_assets.config import Settings
    from dicom_assets.lake.paths import LakePaths
    from dicom_assets.steps import bronze, fhir_steps, gold, reconcile, silver

    paths = LakePaths.of(lake)
    settings = Settings(lake=lake, settle_seconds=0, workers=workers)
    day = partition
    # The checks get the partition when they take one, as the Dagster asset checks pass it.
    plan: list[tuple[str, Callable[[], Any]]] = [
        ("organise_ingest", lambda: bronze.organise_ingest(paths, settings, day)),
        ("extract_metastore", lambda: bronze.extract_metastore(paths, settings, day)),
        ("check metastore_reconciles", lambda: _check(reconcile.metastore_reconciles, paths, day)),
        ("check metastore_unique", lambda: _check(reconcile.metastore_unique, paths, day)),
        ("merge_instances", lambda: silver.merge_instances(paths, day)),
        ("check silver_instances_unique", lambda: _check(reconcile.silver_instances_unique, paths, day)),
        ("write_ndjson_files", lambda: fhir_steps.write_ndjson_files(paths, day)),
        ("load_bronze", lambda: fhir_steps.load_bronze(paths, day)),
        ("merge_silver", lambda: fhir_steps.merge_silver(paths, day)),
        ("check silver_studies_consistent", lambda: _check(reconcile.silver_studies_consistent, paths, day)),
        ("build_gold", lambda: gold.build_gold(paths, settings, day)),
        ("check image_occurrence", lambda: _check(gold.check_image_occurrence, paths, day)),
        ("check procedure_occurrence", lambda: _check(gold.check_procedure_occurrence, paths, day)),
        ("check idmaps_stable", lambda: _check(gold.check_idmaps_stable, paths, day)),
    ]
    out = []
    for name, fn in plan:
        prof = cProfile.Profile()
        io0 = proc_io()
        t0 = time.perf_counter()
        error = None
        try:
            prof.runcall(fn)
        except Exception as exc:  # noqa: BLE001 - later steps are still worth profiling
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
        seconds = time.perf_counter() - t0
        out.append({
            "step": name,
            "seconds_profiled": round(seconds, 3),
            "rchar_mb": round((proc_io()["rchar"] - io0["rchar"]) / MiB, 2),
            "top": top_functions(prof, top),
            **({"error": error} if error else {}),
        })
    return {"partition": partition, "workers": workers, "steps": out}


def _check(fn: Callable[..., Any], paths: Any, day: str) -> Any:
    import inspect

    return fn(paths, day) if "day" in inspect.signature(fn).parameters else fn(paths)


def top_functions(prof: cProfile.Profile, n: int) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time (tottime), with their inclusive time."""
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, cumtime, ncalls, _short(file, line, func)))
    rows.sort(reverse=True)
    return [
        {"function": name, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3), "calls": nc}
        for tt, ct, nc, name in rows[:n]
    ]


def _short(file: str, line: int, func: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line}({func})" if file != "~" else func


def profile_fabric(tmp_root: Path, partition: str, *, timeout: float = 900.0) -> dict[str, Any]:
    """cProfile of every step on a fresh fabric lake (extraction in-process)."""
    from dicom_assets.sample import generate_sample

    work = Path(tempfile.mkdtemp(prefix="profile_", dir=tmp_root))
    try:
        lake = work / "lake"
        generate_sample(lake, "fabric")
        settle_writes()
        run = measured_child(
            "benchmarks.bench_pipeline:profile_steps", {"lake": str(lake), "partition": partition},
            timeout=timeout, log_dir=work,
        )
        if not run.ok:
            return {"error": (run.result or {}).get("error") or run.log[-1500:]}
        return run.result or {}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- extraction engine


def engine_extraction(corpus: str, workers: int, repeat: int, batch_size: int = 64) -> dict[str, Any]:
    """(Child) the local engine over the corpus's loose files ``repeat`` times, ``workers`` processes.

    The corpus alone is ~1 s of work: too short to see a 1→2 worker
    speed-up past pool start-up and the last, unbalanced batch. Files are
    read in place (no compression) into a throwaway metastore; the time
    includes spawning the pool, extraction, part files and the commit.
    """
    import warnings
    from datetime import UTC, datetime

    warnings.simplefilter("ignore")
    from benchmarks.bench_extract import _warm, corpus_files, tasks_for
    from dicom_assets.config import Settings
    from dicom_assets.engines import local

    files = corpus_files(Path(corpus))
    _warm(files)
    tasks = tasks_for(files) * repeat
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        settings = Settings(lake=tmp, workers=workers, batch_size=batch_size, compression_enabled=False)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        outcome = local.run_extraction(
            tasks, settings, metastore_uri=str(Path(tmp) / "metastore"), day="2024/01/01", now=datetime.now(UTC)
        )
        seconds = time.perf_counter() - t0
    return {
        "workers": workers,
        "files": len(tasks),
        "repeat": repeat,
        "rows": outcome.rows_written,
        "failures": outcome.failures.num_rows,
        "seconds": round(seconds, 3),
        "files_per_s": round(len(tasks) / seconds, 1),
        "parent_cpu_s": round(time.process_time() - cpu0, 3),
        "details": {k: round(v, 3) for k, v in outcome.details.items()},
    }


def steady_extraction(corpus: str, workers: int, repeat: int, tmp: str) -> dict[str, Any]:
    """(Child) ``bench_extract.run`` unchanged, over a folder linking the corpus's files ``repeat`` times.

    ``run`` times the pool's work apart from its start-up, so this is the
    extractor's steady-state scaling (the engine figure includes start-up).
    """
    from benchmarks.bench_extract import corpus_files, run

    files = corpus_files(Path(corpus))
    folder = Path(tempfile.mkdtemp(prefix="linked_corpus_", dir=tmp))
    try:
        for r in range(repeat):
            for i, f in enumerate(files):
                link = folder / f"r{r}" / f"{i:05d}_{f.name}"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f)
        return {**run(folder, workers), "repeat": repeat}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tag_coverage(corpus: str) -> dict[str, Any]:
    """(Child) does ``metadata_string`` hold every element the peers' method outputs?

    For each loose file our extractor reads, the tag paths (sequence items
    included) of ``pydicom.dcmread(...).to_json_dict()`` without Pixel Data
    must all be in our DICOM JSON model. Ours also holds group 0002 (file
    meta), which the peers' method drops.
    """
    import warnings

    import pydicom

    warnings.simplefilter("ignore")
    from benchmarks.bench_extract import corpus_files, tasks_for
    from dicom_assets.dicom.extract import extract_batch

    files = corpus_files(Path(corpus))
    rows, failures = extract_batch(tasks_for(files))
    ours_by_path = {r["filePath"]: json.loads(r["metadata_string"]) for r in rows}
    compared = missing_files = missing_tags = peers_tags = ours_tags = 0
    examples: list[str] = []
    for path, ours in ours_by_path.items():
        try:
            ds = pydicom.dcmread(path, force=True)
            if "PixelData" in ds:
                del ds.PixelData
            peers = ds.to_json_dict()
        except Exception:  # noqa: BLE001 - files the peers cannot read are not compared
            continue
        compared += 1
        p, o = _tag_paths(peers), _tag_paths(ours)
        peers_tags += len(p)
        ours_tags += len(o)
        lost = p - o
        if lost:
            missing_files += 1
            missing_tags += len(lost)
            if len(examples) < 5:
                examples.append(f"{Path(path).name}: {sorted(lost)[:3]}")
    return {
        "files": len(files),
        "ours_rows": len(rows),
        "ours_failures": len(failures),
        "compared": compared,
        "files_missing_tags": missing_files,
        "missing_tags": missing_tags,
        "peers_tags": peers_tags,
        "ours_tags": ours_tags,
        "examples": examples,
    }


def _tag_paths(model: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for tag, element in model.items():
        path = prefix + tag
        out.add(path)
        if isinstance(element, dict) and element.get("vr") == "SQ":
            for i, item in enumerate(element.get("Value") or []):
                if isinstance(item, dict):
                    out |= _tag_paths(item, f"{path}/{i}/")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    from dicom_assets.defs.partitions import today_key

    ap = argparse.ArgumentParser(description="fabric sample Ingest → gold")
    ap.add_argument("--profile", action="store_true", help="also profile every step function")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        res = {"fabric": run_fabric(Path(tmp), today_key())}
        if args.profile:
            res["profile"] = profile_fabric(Path(tmp), today_key())
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("DAGSTER_TELEMETRY_DISABLED", "1")
    main()
