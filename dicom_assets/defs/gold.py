"""Gold assets: OMOP MI-CDM ``image_occurrence`` and ``procedure_occurrence``."""


import dagster as dg

from dicom_assets.defs.metadata import table_metadata
from dicom_assets.defs.partitions import daily_partitions
from dicom_assets.defs.silver import silver_imagingstudy
from dicom_assets.lake import delta
from dicom_assets.lake.schemas import IMAGE_OCCURRENCE_SCHEMA, PROCEDURE_OCCURRENCE_SCHEMA
from dicom_assets.settings import DicomAssetsSettings
from dicom_assets.steps import gold


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            ["gold", "image_occurrence"],
            group_name="gold",
            deps=[silver_imagingstudy],
            kinds={"python", "delta", "omop"},
            description="OMOP MI-CDM image_occurrence: one row per series, stable ids (SPEC §3.5).",
        ),
        dg.AssetSpec(
            ["gold", "procedure_occurrence"],
            group_name="gold",
            deps=[silver_imagingstudy],
            kinds={"python", "delta", "omop"},
            description="OMOP procedure_occurrence: one row per study, the target of image_occurrence.procedure_occurrence_id.",
        ),
    ],
    partitions_def=daily_partitions,
)
def omop_gold(context: dg.AssetExecutionContext, settings: DicomAssetsSettings):  # type: ignore[no-untyped-def]
    paths = settings.paths()
    r = gold.build_gold(paths, settings.to_settings(), context.partition_key)
    if r.skipped:
        context.log.warning(f"{len(r.skipped)} studies without any date were not mapped: {sorted(r.skipped)[:5]}")
    yield dg.MaterializeResult(
        asset_key=["gold", "image_occurrence"],
        metadata=table_metadata(
            IMAGE_OCCURRENCE_SCHEMA,
            **{
                "dagster/row_count": delta.count(paths.table_uri("image_occurrence")),
                "partition_series": r.image_occurrences,
                "new_image_occurrence_ids": r.new_ids.get("image_occurrence", 0),
                "new_person_ids": r.new_ids.get("person", 0),
                "unmapped_studies": len(r.skipped),
            },
        ),
    )
    yield dg.MaterializeResult(
        asset_key=["gold", "procedure_occurrence"],
        metadata=table_metadata(
            PROCEDURE_OCCURRENCE_SCHEMA,
            **{
                "dagster/row_count": delta.count(paths.table_uri("procedure_occurrence")),
                "partition_studies": r.procedure_occurrences,
                "new_procedure_occurrence_ids": r.new_ids.get("procedure_occurrence", 0),
            },
        ),
    )


IMAGE_OCCURRENCE_KEY = dg.AssetKey(["gold", "image_occurrence"])
PROCEDURE_OCCURRENCE_KEY = dg.AssetKey(["gold", "procedure_occurrence"])
