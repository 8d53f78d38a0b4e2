"""Silver and FHIR assets: ``ImagingMetastore``, ImagingStudy NDJSON, bronze/silver ``ImagingStudy``."""


import dagster as dg

from dicom_assets.defs.bronze import dicomimagingmetastore
from dicom_assets.defs.metadata import table_metadata
from dicom_assets.defs.partitions import daily_partitions
from dicom_assets.lake import delta
from dicom_assets.lake.schemas import (
    BRONZE_IMAGINGSTUDY_SCHEMA,
    SILVER_IMAGINGSTUDY_SCHEMA,
    SILVER_METASTORE_SCHEMA,
)
from dicom_assets.settings import DicomAssetsSettings
from dicom_assets.steps import fhir_steps, silver


@dg.asset(
    key_prefix="silver",
    group_name="silver",
    partitions_def=daily_partitions,
    deps=[dicomimagingmetastore],
    kinds={"python", "delta"},
    description="One row per SOP instance, merged on (Study, Series, SOP Instance UID, source system); later file wins (SPEC §3.3).",
)
def ImagingMetastore(context: dg.AssetExecutionContext, settings: DicomAssetsSettings) -> dg.MaterializeResult:
    paths = settings.paths()
    r = silver.merge_instances(paths, context.partition_key)
    uri = paths.table_uri("ImagingMetastore")
    return dg.MaterializeResult(
        metadata=table_metadata(
            SILVER_METASTORE_SCHEMA,
            **{
                "dagster/row_count": delta.count(uri),
                "bronze_rows": r.bronze_rows,
                "partition_instances": r.instances,
                "inserted": r.inserted,
                "updated": r.updated,
                "touched_studies": len(r.studies),
            },
        )
    )


@dg.asset(
    key=["bronze", "ImagingStudy_ndjson"],
    group_name="bronze",
    partitions_def=daily_partitions,
    deps=[ImagingMetastore],
    kinds={"python", "fhir"},
    description="FHIR R4B ImagingStudy NDJSON (≤ 1000 per file) for every study touched by the day (SPEC §3.4).",
)
def imagingstudy_ndjson(context: dg.AssetExecutionContext, settings: DicomAssetsSettings) -> dg.MaterializeResult:
    r = fhir_steps.write_ndjson_files(settings.paths(), context.partition_key)
    if r.errors:
        context.log.warning(f"{len(r.errors)} studies not written (mapping/validation): {sorted(r.errors.items())[:3]}")
    return dg.MaterializeResult(
        metadata={
            "resources": r.resources,
            "files": len(r.files),
            "per_namespace": dict(r.namespaces),
            "studies_not_written": len(r.errors),
        }
    )


@dg.asset(
    key=["bronze", "ImagingStudy"],
    group_name="bronze",
    partitions_def=daily_partitions,
    deps=[imagingstudy_ndjson],
    kinds={"python", "delta", "fhir"},
    description="One row per ImagingStudy resource version (raw FHIR JSON) from the day's NDJSON files.",
)
def bronze_imagingstudy(context: dg.AssetExecutionContext, settings: DicomAssetsSettings) -> dg.MaterializeResult:
    n = fhir_steps.load_bronze(settings.paths(), context.partition_key)
    return dg.MaterializeResult(metadata=table_metadata(BRONZE_IMAGINGSTUDY_SCHEMA, **{"dagster/row_count": n}))


@dg.asset(
    key=["silver", "ImagingStudy"],
    group_name="silver",
    partitions_def=daily_partitions,
    deps=[bronze_imagingstudy],
    kinds={"python", "delta", "fhir"},
    description="One row per study, flattened FHIR ImagingStudy, merged on id; updated only on real change.",
)
def silver_imagingstudy(context: dg.AssetExecutionContext, settings: DicomAssetsSettings) -> dg.MaterializeResult:
    paths = settings.paths()
    r = fhir_steps.merge_silver(paths, context.partition_key)
    return dg.MaterializeResult(
        metadata=table_metadata(
            SILVER_IMAGINGSTUDY_SCHEMA,
            **{
                "dagster/row_count": delta.count(paths.table_uri("silver_ImagingStudy")),
                "partition_studies": r.studies,
                "inserted": r.inserted,
                "updated": r.updated,
            },
        )
    )
