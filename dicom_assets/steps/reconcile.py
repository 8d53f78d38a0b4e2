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
from dicom_assets.lake import delta_read
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
    rows = delta_read.read_day(paths.table_uri("dicomimagingmetastore"), METASTORE_SCHEMA, day, columns=["filePath"])
    fails = delta_read.read_day(paths.table_uri("dicom_failures"), FAILURES_SCHEMA, day, columns=["filePath"])
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
    t = delta_read.read_day(paths.table_uri("dicomimagingmetastore"), METASTORE_SCHEMA, day, columns=["filePath", "sopInstanceUid"])
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
        t = delta_read.read(uri, SILVER_METASTORE_SCHEMA, columns=cols)
    else:
        uids = sorted({uid for _ns, uid in touched_studies(paths, day)})
        t = delta_read.read_in(uri, SILVER_METASTORE_SCHEMA, "studyInstanceUid", uids, columns=cols)
    keys = Counter(zip(*(t.column(c).to_pylist() for c in cols), strict=False))
    dup = sum(c - 1 for c in keys.values() if c > 1)
    return dup == 0, {"instances": t.num_rows, "duplicate_keys": dup}


#: Studies whose resources and instances :func:`silver_studies_consistent` holds at once.
STUDIES_PER_CHECK = 500

_STUDY_COLUMNS = ["id", "studyInstanceUid", "msftSourceSystem", "numberOfInstances", "numberOfSeries", "fhirContent"]
_INSTANCE_COLUMNS = ["imagingStudyId", "sopInstanceUid", "seriesInstanceUid"]


def silver_studies_consistent(paths: LakePaths, day: str | None = None) -> Result:
    """``id`` unique; each study's ``numberOfInstances`` equals its silver instance count;
    every resource validates (FHIR R4B + our coded-value checks).

    With ``day``, only the studies that partition touched are checked: a run of
    another day going on at the same time (its instances merged, its studies
    not rebuilt yet) must not fail this partition's check. They are read
    :data:`STUDIES_PER_CHECK` StudyInstanceUIDs at a time (a study's resource
    and instances share its UID), so memory does not grow with the day.
    """
    study_uri, inst_uri = paths.table_uri("silver_ImagingStudy"), paths.table_uri("ImagingMetastore")
    if day is None:
        st = delta_read.read(study_uri, SILVER_IMAGINGSTUDY_SCHEMA, columns=_STUDY_COLUMNS)
        inst = delta_read.read(inst_uri, SILVER_METASTORE_SCHEMA, columns=_INSTANCE_COLUMNS)
        found = _StudyFacts()
        found.add(st, inst)
        return found.result()
    studies = touched_studies(paths, day)
    uids = sorted({uid for _ns, uid in studies})
    wanted = pa.array(sorted({imaging_study_id(ns, uid) for ns, uid in studies}), pa.string())
    found = _StudyFacts()
    for start in range(0, len(uids), STUDIES_PER_CHECK):
        group = uids[start : start + STUDIES_PER_CHECK]
        st = delta_read.read_in(study_uri, SILVER_IMAGINGSTUDY_SCHEMA, "studyInstanceUid", group, columns=_STUDY_COLUMNS)
        inst = delta_read.read_in(inst_uri, SILVER_METASTORE_SCHEMA, "studyInstanceUid", group, columns=_INSTANCE_COLUMNS)
        found.add(st.filter(pc.is_in(st.column("id"), value_set=wanted)), inst.filter(pc.is_in(inst.column("imagingStudyId"), value_set=wanted)))
    return found.result()


class _StudyFacts:
    """The facts of :func:`silver_studies_consistent`, summed over groups of whole studies."""

    def __init__(self) -> None:
        self.studies = self.dup_ids = 0
        self.in_instances: set[str] = set()
        self.missing: set[str] = set()
        self.wrong_counts: list[str] = []
        self.invalid: list[str] = []

    def add(self, st: pa.Table, inst: pa.Table) -> None:
        """Count the resources ``st`` against the instances ``inst`` of the same studies."""
        from dicom_assets.fhir.validate import validate_imaging_study

        ids = st.column("id").to_pylist()
        self.studies += len(ids)
        self.dup_ids += len(ids) - len(set(ids))
        per_study: dict[str, set[str]] = {}
        per_series: dict[str, set[str]] = {}
        for sid, sop, ser in zip(*(inst.column(c).to_pylist() for c in _INSTANCE_COLUMNS), strict=False):
            if sid:
                per_study.setdefault(sid, set()).add(sop)
                per_series.setdefault(sid, set()).add(ser)
        for row in st.to_pylist():
            if row["numberOfInstances"] != len(per_study.get(row["id"], ())) or row["numberOfSeries"] != len(per_series.get(row["id"], ())):
                self.wrong_counts.append(row["studyInstanceUid"])
            try:
                validate_imaging_study(json.loads(row["fhirContent"]))
            except ValueError:
                self.invalid.append(row["studyInstanceUid"])
        self.in_instances |= set(per_study)
        self.missing |= set(per_study) - set(ids)

    def result(self) -> Result:
        facts = {
            "studies": self.studies,
            "studies_in_silver_instances": len(self.in_instances),
            "studies_without_resource": len(self.missing),
            "duplicate_ids": self.dup_ids,
            "studies_with_wrong_counts": len(self.wrong_counts),
            "invalid_resources": len(self.invalid),
            "first_bad_study_uids": (self.wrong_counts + self.invalid)[:5],
        }
        return self.dup_ids == 0 and not self.wrong_counts and not self.invalid and not self.missing, facts
