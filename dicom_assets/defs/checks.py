"""Asset checks (SPEC §4): UID uniqueness, FHIR validity, counts reconcile, ids stable.

Checks that look at the same tables run in one step (a ``multi_asset_check``):
each Dagster step costs about a tenth of a second of orchestration and event
writes whatever it does, which on a small incremental day was as much as the
checks themselves. Every check keeps its own name, result and blocking flag.
"""


from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg

from dicom_assets.defs import bronze, gold, silver
from dicom_assets.defs.partitions import daily_partitions
from dicom_assets.settings import DicomAssetsSettings
from dicom_assets.steps import gold as gold_steps
from dicom_assets.steps import reconcile

Outcome = tuple[bool, dict[str, Any]]


def _result(outcome: Outcome, **key: Any) -> dg.AssetCheckResult:
    ok, facts = outcome
    metadata = {k: v if not isinstance(v, list) else ", ".join(map(str, v)) for k, v in facts.items()}
    return dg.AssetCheckResult(passed=bool(ok), metadata=metadata, **key)


def _spec(asset: Any, name: str, doc: str, *, blocking: bool = False) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, description=doc, blocking=blocking, partitions_def=daily_partitions)


#: (spec, check function of (paths, day)) per check, grouped by the step that runs them.
BRONZE_METASTORE: list[tuple[dg.AssetCheckSpec, Callable[..., Outcome]]] = [
    (
        _spec(bronze.dicomimagingmetastore, "metastore_files_reconcile",
              "Every file of the day is accounted for: a metastore row per Process file, a failure row per Failed file.",
              blocking=True),
        reconcile.metastore_reconciles,
    ),
    (
        _spec(bronze.dicomimagingmetastore, "metastore_rows_unique", "One row per file, every row with a SOP Instance UID."),
        reconcile.metastore_unique,
    ),
]
GOLD: list[tuple[dg.AssetCheckSpec, Callable[..., Outcome]]] = [
    (
        _spec(gold.IMAGE_OCCURRENCE_KEY, "image_occurrence_ids_and_keys",
              "No duplicate image_occurrence_id; every foreign key resolves; required columns not null."),
        gold_steps.check_image_occurrence,
    ),
    (
        _spec(gold.PROCEDURE_OCCURRENCE_KEY, "procedure_occurrence_ids_and_keys",
              "No duplicate procedure_occurrence_id; person ids resolve; required columns not null."),
        gold_steps.check_procedure_occurrence,
    ),
    (
        _spec(gold.IMAGE_OCCURRENCE_KEY, "idmaps_stable", "Each id-map key has one id and each id one key, so ids never move."),
        gold_steps.check_idmaps_stable,
    ),
]


def _checks_step(name: str, checks: list[tuple[dg.AssetCheckSpec, Callable[..., Outcome]]]) -> dg.AssetChecksDefinition:
    @dg.multi_asset_check(name=name, specs=[spec for spec, _fn in checks])
    def _run(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> Iterator[dg.AssetCheckResult]:
        paths = settings.paths()
        for spec, fn in checks:
            yield _result(fn(paths, context.partition_key), asset_key=spec.asset_key, check_name=spec.name)

    return _run


@dg.asset_check(asset=silver.ImagingMetastore, partitions_def=daily_partitions, blocking=True)
def silver_instance_key_unique(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> dg.AssetCheckResult:
    """(Study, Series, SOP Instance UID, source system) is unique in silver, over the partition's studies."""
    return _result(reconcile.silver_instances_unique(settings.paths(), context.partition_key))


@dg.asset_check(asset=silver.silver_imagingstudy, partitions_def=daily_partitions, blocking=True)
def imagingstudy_valid_and_counted(context: dg.AssetCheckExecutionContext, settings: DicomAssetsSettings) -> dg.AssetCheckResult:
    """The partition's studies: every resource validates, ids are unique, counts equal the silver instances."""
    return _result(reconcile.silver_studies_consistent(settings.paths(), context.partition_key))


ALL_CHECKS = [
    _checks_step("bronze_metastore_checks", BRONZE_METASTORE),
    silver_instance_key_unique,
    imagingstudy_valid_and_counted,
    _checks_step("gold_checks", GOLD),
]
