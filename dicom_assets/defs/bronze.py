"""Bronze assets: ``dicom_files`` (organise) and ``dicomimagingmetastore`` (extract)."""


from typing import Any

import dagster as dg

from dicom_assets.defs.metadata import table_metadata
from dicom_assets.defs.partitions import daily_partitions
from dicom_assets.lake import delta_read
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA
from dicom_assets.settings import DicomAssetsSettings
from dicom_assets.steps import bronze


@dg.asset(
    key_prefix="bronze",
    group_name="bronze",
    partitions_def=daily_partitions,
    kinds={"python", "dicom"},
    description="Ingest → Process/<ns>/yyyy/mm/dd: settled DICOM files moved, ZIPs extracted, bad files to Failed (SPEC §3.1).",
)
def dicom_files(context: dg.AssetExecutionContext, settings: DicomAssetsSettings) -> dg.MaterializeResult:
    s = settings.to_settings()
    result = bronze.organise_ingest(settings.paths(), s, context.partition_key)
    context.log.info(
        f"organised {len(result.landed)} files, {len(result.failed)} failed, "
        f"{result.ignored} ignored, {result.unsettled} not settled"
    )
    return dg.MaterializeResult(
        metadata={
            "landed": len(result.landed),
            "failed": len(result.failed),
            "ignored": result.ignored,
            "unsettled": result.unsettled,
        }
    )


@dg.asset(
    key_prefix="bronze",
    group_name="bronze",
    partitions_def=daily_partitions,
    deps=[dicom_files],
    kinds={"python", "delta"},
    description="One row per DICOM file: 30 Fabric-promoted tags, more promoted columns and every element as DICOM JSON (SPEC §3.2).",
)
def dicomimagingmetastore(
    context: dg.AssetExecutionContext, settings: DicomAssetsSettings, pyspark: dg.ResourceParam[Any]
) -> dg.MaterializeResult:
    s = settings.to_settings()
    paths = settings.paths()
    kwargs = {}
    if s.engine == "spark":
        kwargs["spark"] = pyspark.spark_session
    result = bronze.extract_metastore(paths, s, context.partition_key, **kwargs)
    context.log.info(f"{result.rows} rows, {result.failed} failed files, engine {result.engine}, {result.seconds:.1f}s")
    preview = delta_read.read_day(
        paths.table_uri("dicomimagingmetastore"),
        METASTORE_SCHEMA,
        context.partition_key,
        columns=["sopInstanceUid", "modality", "patientName", "studyDate", "transferSyntaxUid", "numberOfFrames"],
    ).slice(0, 5)
    return dg.MaterializeResult(
        metadata=table_metadata(
            METASTORE_SCHEMA,
            preview,
            **{
                "dagster/row_count": result.rows,
                "failed_files": result.failed,
                "external_files": result.external_rows,
                "engine": result.engine,
                "seconds": round(result.seconds, 2),
                "failures_table": paths.table_uri("dicom_failures"),
                "failure_schema_columns": len(FAILURES_SCHEMA),
            },
        )
    )
