"""Consistency checks over the lake, as plain functions returning (passed, facts).

The Dagster asset checks in ``defs/checks.py`` are thin wrappers; tests call
these directly too. Facts are counts and UIDs only, never PHI.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dicom_assets.fhir.identity import imaging_study_id
from dicom_assets.lake import delta
from dicom_assets.lake.fileops import count_files
from dicom_assets.lake.paths import LakePaths
from dicom_assets.lake.schemas import (
    FAILURES_SCHEMA,
    METASTORE_SCHEMA,
    SILVER_IMAGINGSTUDY_SCHEMA,
    SILVER_METASTORE_SCHEMA,
)
from dicom_assets.steps.silver import touched_studies

Result = tuple[bool, dict[str, Any]]


def _day(day: str) -> pc.Expression:
    return pc.field("ingestDate") == day


def metastore_reconciles(paths: LakePaths, day: str) -> Result:
    """Files in the day's Process folders = metastore rows from Process; Failed files = failure rows."""
    rows = delta.read_day(paths.table_uri("dicomimagingmetastore"), METASTORE_SCHEMA, day, columns=["filePath"])
    fails = delta.read_day(paths.table_uri("dicom_failures"), FAILURES_SCHEMA, day, columns=["filePath"])
    process_files = 0
    failed_files = 0
    if paths.process_root.exists():
        for ns in paths.process_root.iterdir():
            process_files += count_files(paths.process_dir(ns.name, day))
    if paths.failed_root.exists():
        for ns in paths.failed_root.iterdir():
            failed_files += count_files(paths.failed_dir(ns.name, day), only_suffix=".error.json")
    root = str(paths.process_root)
    rows_from_process = sum(1 for p in rows.column("filePath").to_pylist() if p and p.startswith(root))
    fail_root = str(paths.failed_root)
    failure_rows_in_failed = sum(1 for p in fails.column("filePath").to_pylist() if p and p.startswith(fail_root))
    facts = {
        "process_files": process_files,
        "metastore_rows_from_process": rows_from_process,
        "metastore_rows": rows.num_rows,
        "failed_files": failed_files,
        "failure_rows_for_failed_files": failure_rows_in_failed,
        "failure_rows": fails.num_rows,
    }
    ok = process_files == rows_from_process and failed_files == failure_rows_in_failed
    return ok, facts


def metastore_unique(paths: LakePaths, day: str) -> Result:
    """One row per file in the partition, and every row has a SOP Instance UID."""
    t = delta.read_day(paths.table_uri("dicomimagingmetastore"), METASTORE_SCHEMA, day, columns=["filePath", "sopInstanceUid"])
    dup = sum(c - 1 for c in Counter(t.column("filePath").to_pylist()).values() if c > 1)
    missing = t.column("sopInstanceUid").null_count
    return dup == 0 and missing == 0, {"rows": t.num_rows, "duplicate_file_rows": dup, "rows_without_sop_uid": missing}


def silver_instances_unique(paths: LakePaths, day: str | None = None) -> Result:
    """No instance key twice in silver; with ``day``, among the studies that partition touched.

    The key starts with the StudyInstanceUID, so a duplicate can only sit
    inside one study: checking the touched studies covers every row the
    partition wrote, at a cost that does not grow with the table.
    """
    cols = ["studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "msftSourceSystem"]
    uri = paths.table_uri("ImagingMetastore")
    if day is None:
        t = delta.read(uri, SILVER_METASTORE_SCHEMA, columns=cols)
    else:
        uids = sorted({uid for _ns, uid in touched_studies(paths, day)})
        t = delta.read_in(uri, SILVER_METASTORE_SCHEMA, "studyInstanceUid", uids, columns=cols)
    keys = Counter(zip(*(t.column(c).to_pylist() for c in cols), strict=False))
    dup = sum(c - 1 for c in keys.values() if c > 1)
    return dup == 0, {"instances": t.num_rows, "duplicate_keys": dup}


def silver_studies_consistent(paths: LakePaths, day: str | None = None) -> Result:
    """``id`` unique; each study's ``numberOfInstances`` equals its silver instance count;
    every resource validates (FHIR R4B + our coded-value checks).

    With ``day``, only the studies that partition touched are checked: a run of
    another day going on at the same time (its instances merged, its studies
    not rebuilt yet) must not fail this partition's check.
    """
    from dicom_assets.fhir.validate import validate_imaging_study

    st_cols = ["id", "studyInstanceUid", "msftSourceSystem", "numberOfInstances", "numberOfSeries", "fhirContent"]
    inst_cols = ["imagingStudyId", "sopInstanceUid", "seriesInstanceUid"]
    if day is None:
        st = delta.read(paths.table_uri("silver_ImagingStudy"), SILVER_IMAGINGSTUDY_SCHEMA, columns=st_cols)
        inst = delta.read(paths.table_uri("ImagingMetastore"), SILVER_METASTORE_SCHEMA, columns=inst_cols)
    else:
        studies = touched_studies(paths, day)
        uids = sorted({uid for _ns, uid in studies})
        wanted = pa.array(sorted({imaging_study_id(ns, uid) for ns, uid in studies}), pa.string())
        st = delta.read_in(paths.table_uri("silver_ImagingStudy"), SILVER_IMAGINGSTUDY_SCHEMA, "studyInstanceUid", uids, columns=st_cols)
        st = st.filter(pc.is_in(st.column("id"), value_set=wanted))
        inst = delta.read_in(paths.table_uri("ImagingMetastore"), SILVER_METASTORE_SCHEMA, "studyInstanceUid", uids, columns=inst_cols)
        inst = inst.filter(pc.is_in(inst.column("imagingStudyId"), value_set=wanted))
    ids = st.column("id").to_pylist()
    dup_ids = len(ids) - len(set(ids))
    per_study: dict[str, set[str]] = {}
    per_series: dict[str, set[str]] = {}
    for sid, sop, ser in zip(*(inst.column(c).to_pylist() for c in ("imagingStudyId", "sopInstanceUid", "seriesInstanceUid")), strict=False):
        if sid:
            per_study.setdefault(sid, set()).add(sop)
            per_series.setdefault(sid, set()).add(ser)
    wrong_counts: list[str] = []
    invalid: list[str] = []
    for row in st.to_pylist():
        if row["numberOfInstances"] != len(per_study.get(row["id"], ())) or row["numberOfSeries"] != len(per_series.get(row["id"], ())):
            wrong_counts.append(row["studyInstanceUid"])
        try:
            validate_imaging_study(json.loads(row["fhirContent"]))
        except ValueError:
            invalid.append(row["studyInstanceUid"])
    missing = sorted(set(per_study) - set(ids))
    facts = {
        "studies": st.num_rows,
        "studies_in_silver_instances": len(per_study),
        "studies_without_resource": len(missing),
        "duplicate_ids": dup_ids,
        "studies_with_wrong_counts": len(wrong_counts),
        "invalid_resources": len(invalid),
        "first_bad_study_uids": (wrong_counts + invalid)[:5],
    }
    return dup_ids == 0 and not wrong_counts and not invalid and not missing, facts
