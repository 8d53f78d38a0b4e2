"""Spark engine throughput on the shared corpus: session start-up apart from extraction.

``.venv/bin/python benchmarks/bench_spark.py [CORPUS]`` prints JSON; ``run(corpus)`` is the entry point. The corpus's loose
``*.dcm`` files and files without extension are read in place (no
compression) into a temporary lake on ``local[2]``: once cold (the first job
also pays for JIT warm-up and Python worker start) and once warm (the same
day replaced again), then with the embedded engine on the same files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicom_assets.config import Settings  # noqa: E402
from dicom_assets.dicom.records import ExtractTask  # noqa: E402
from dicom_assets.engines import local  # noqa: E402
from dicom_assets.engines import spark as spark_engine  # noqa: E402

DAY = "2026/01/01"
DEFAULT_CORPUS = ROOT.parent / "shared" / "dicom-corpus"


def corpus_files(corpus: Path) -> list[Path]:
    """Loose files named ``*.dcm`` or without extension (ZIPs and licences excluded)."""
    out = []
    for p in sorted(corpus.rglob("*")):
        if not p.is_file() or "LICENSES" in p.relative_to(corpus).parts:
            continue
        if p.suffix.lower() == ".dcm" or (p.suffix == "" and p.parent != corpus):
            out.append(p)
    return out


def _tasks(files: list[Path]) -> list[ExtractTask]:
    return [
        ExtractTask(path=str(f), file_path=str(f), original_path=str(f), source_system="default",
                    ingest_date=DAY, source_modified_at=f.stat().st_mtime)
        for f in files
    ]


def run(corpus: Path, *, master: str = "local[2]", batch_size: int = 64) -> dict[str, Any]:
    """Time session start-up, a cold and a warm Spark extraction, and the local engine."""
    files = corpus_files(corpus)
    tasks = _tasks(files)
    settings = Settings(spark_master=master, batch_size=batch_size, workers=2)
    now = datetime.now(UTC)
    result: dict[str, Any] = {"engine": "spark", "master": master, "batch_size": batch_size, "files": len(files),
                              "bytes": sum(f.stat().st_size for f in files)}
    with tempfile.TemporaryDirectory(prefix="bench_spark_") as tmp:
        uri = str(Path(tmp) / "spark" / "metastore")
        t0 = time.perf_counter()
        spark = spark_engine.get_spark_session(settings, conf={"spark.ui.enabled": "false"})
        result["session_start_s"] = round(time.perf_counter() - t0, 3)
        try:
            for label in ("cold", "warm"):
                out = spark_engine.run_extraction(tasks, settings, metastore_uri=uri, day=DAY, now=now, spark=spark)
                result[f"{label}_s"] = round(out.seconds, 3)
                result[f"{label}_files_per_s"] = round(len(files) / out.seconds, 1)
                result[f"{label}_commit_s"] = round(out.details.get("commit_seconds", 0.0), 3)
            result["rows"] = out.rows_written
            result["failures"] = out.failures.num_rows
            result["part_files"] = int(out.details.get("part_files", 0))
        finally:
            spark.stop()
        lo = local.run_extraction(tasks, settings, metastore_uri=str(Path(tmp) / "local" / "metastore"), day=DAY, now=now)
        result["local_engine_s"] = round(lo.seconds, 3)
        result["local_engine_files_per_s"] = round(len(files) / lo.seconds, 1)
        result["local_engine_rows"] = lo.rows_written
    return result


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    corpus = Path(args[0]) if args else Path(os.environ.get("DICOM_ASSETS_CORPUS", DEFAULT_CORPUS))
    print(json.dumps(run(corpus), indent=2))


if __name__ == "__main__":
    main()
