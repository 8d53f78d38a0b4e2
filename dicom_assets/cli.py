"""``dicom-assets``: run | sample | sql (SPEC §8)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dicom_assets.config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "lake", None):
        overrides["lake"] = str(Path(args.lake).resolve())
    if getattr(args, "engine", None):
        overrides["engine"] = args.engine
    if getattr(args, "settle_seconds", None) is not None:
        overrides["settle_seconds"] = args.settle_seconds
    return Settings.from_env(**overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from dicom_assets.runner import materialize_partition, summary_text

    s = _settings(args)
    summary = materialize_partition(s, partition=args.partition, progress=not args.quiet)
    print(summary_text(summary))
    return 0 if summary["success"] else 1


def cmd_sample(args: argparse.Namespace) -> int:
    from dicom_assets.sample import generate_sample

    s = _settings(args)
    # Writing the same sample twice would drop the same files again (new rows
    # for the same instances): once per lake unless --force, so `make run` can
    # be repeated.
    marker = Path(s.lake) / "_state" / f"sample-{args.size}.done"
    if marker.exists() and not args.force:
        print(f"sample '{args.size}' already written to this lake ({marker}); use --force to write it again")
        return 0
    start = time.perf_counter()
    summary = generate_sample(Path(s.lake), args.size)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(summary.to_dict()))
    d = summary.to_dict()
    print(f"sample '{args.size}' written to {d.get('root')} in {time.perf_counter() - start:.1f}s")
    for k, v in d.items():
        if k not in ("root", "size"):
            print(f"  {k:<18} {v}")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from dicom_assets.sql import format_table, run_query

    s = _settings(args)
    try:
        table = run_query(s.lake, args.query)
    except Exception as exc:  # DataFusion planning errors are user errors: say so plainly
        print(f"query failed: {exc}", file=sys.stderr)
        return 2
    print(format_table(table, args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-assets", description="DICOM medallion lakehouse on Dagster")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="materialise every asset of one partition in-process")
    r.add_argument("--lake", help="lake root (default: env DICOM_ASSETS_LAKE or data/lake)")
    r.add_argument("--partition", help="yyyy/mm/dd (default: today, UTC)")
    r.add_argument("--engine", choices=["local", "spark"])
    r.add_argument("--settle-seconds", type=float, dest="settle_seconds", help="override the settle time")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("sample", help="write the synthetic sample into the Ingest folder")
    s.add_argument("--size", choices=["small", "fabric"], default="small")
    s.add_argument("--lake")
    s.add_argument("--force", action="store_true", help="write the sample even if this lake already has it")
    s.set_defaults(func=cmd_sample)
    q = sub.add_parser("sql", help="query the lake's tables, e.g. SELECT count(*) FROM silver.ImagingStudy")
    q.add_argument("query")
    q.add_argument("--lake")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.set_defaults(func=cmd_sql)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DAGSTER_TELEMETRY_DISABLED", "1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
