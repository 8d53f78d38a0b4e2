"""Asset checks (SPEC §4): UID uniqueness, FHIR validity, counts reconcile, ids stable."""


from collections.abc import Callable
from typing import Any

import dagster as dg

from dicom_assets.defs import bronze, gold, silver
from dicom_assets.defs.partitions import daily_partitions
from dicom_assets.settings import DicomAssetsSettings
from dicom_assets.steps import gold as gold_steps
from dicom_assets.steps import reconcile


def _result(outcome: tuple[bool, dict[str, Any]]) -> dg.AssetCheckResult:
    ok, facts = outcome
    return dg.AssetCheckResult(passed=bool(ok), metadata={k: v if not isinstance(v, list) else ", ".join(map(str, v)) for k, v in facts.items()})


@dg.asset_check(asset=bronze.dicomimagingmetastore, partitions_def=daily_partitions, blocking=True)
def metastore_files_reconcile(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> dg.AssetCheckResult:
    """Every file of the day is accounted for: a metastore row per Process file, a failure row per Failed file."""
    return _result(reconcile.metastore_reconciles(settings.paths(), context.partition_key))


@dg.asset_check(asset=bronze.dicomimagingmetastore, partitions_def=daily_partitions)
def metastore_rows_unique(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> dg.AssetCheckResult:
    """One row per file, every row with a SOP Instance UID."""
    return _result(reconcile.metastore_unique(settings.paths(), context.partition_key))


@dg.asset_check(asset=silver.ImagingMetastore, partitions_def=daily_partitions, blocking=True)
def silver_instance_key_unique(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> dg.AssetCheckResult:
    """(Study, Series, SOP Instance UID, source system) is unique in silver."""
    return _result(reconcile.silver_instances_unique(settings.paths()))


@dg.asset_check(asset=silver.silver_imagingstudy, partitions_def=daily_partitions, blocking=True)
def imagingstudy_valid_and_counted(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> dg.AssetCheckResult:
    """The partition's studies: every resource validates, ids are unique, counts equal the silver instances."""
    return _result(reconcile.silver_studies_consistent(settings.paths(), context.partition_key))


def _gold_check(asset: Any, fn: Callable[..., tuple[bool, dict[str, Any]]], name: str, doc: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name=name, partitions_def=daily_partitions, description=doc)
    def _check(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> dg.AssetCheckResult:
        return _result(fn(settings.paths(), context.partition_key))

    return _check


ALL_CHECKS = [
    metastore_files_reconcile,
    metastore_rows_unique,
    silver_instance_key_unique,
    imagingstudy_valid_and_counted,
    _gold_check(gold.IMAGE_OCCURRENCE_KEY, gold_steps.check_image_occurrence, "image_occurrence_ids_and_keys", "No duplicate image_occurrence_id; every foreign key resolves; required columns not null."),
    _gold_check(gold.PROCEDURE_OCCURRENCE_KEY, gold_steps.check_procedure_occurrence, "procedure_occurrence_ids_and_keys", "No duplicate procedure_occurrence_id; person ids resolve; required columns not null."),
    _gold_check(gold.IMAGE_OCCURRENCE_KEY, gold_steps.check_idmaps_stable, "idmaps_stable", "Each id-map key has one id and each id one key, so ids never move."),
]
