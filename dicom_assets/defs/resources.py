"""Resources: the settings and, for ``engine: spark``, a lazily started Spark session."""


import os
import sys
from typing import Any

import dagster as dg

from dicom_assets.settings import DicomAssetsSettings


class SparkUnavailable(dg.ConfigurableResource):
    """Stands in for the Spark session when the ``[spark]`` extra is not installed."""

    @property
    def spark_session(self) -> Any:
        raise RuntimeError("engine 'spark' needs the spark extra: pip install -e '.[spark]' (and Java 17)")


def spark_resource() -> dg.ConfigurableResource:
    """``dagster_pyspark``'s lazy session (started on first use, so engine=local needs no JVM).

    Its configuration comes from :func:`dicom_assets.engines.spark.default_spark_conf`
    (master from ``DICOM_ASSETS_SPARK_MASTER``, executors on this interpreter).
    """
    try:
        from dagster_pyspark import LazyPySparkResource
    except ImportError:
        return SparkUnavailable()
    from dicom_assets.config import Settings
    from dicom_assets.engines.spark import default_spark_conf

    # Executors must run the same interpreter (and so the same pure functions) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    conf = default_spark_conf(Settings.from_env())
    conf.setdefault("spark.app.name", "dicom_assets")
    return LazyPySparkResource(spark_config=conf)


def default_resources() -> dict[str, Any]:
    return {"settings": DicomAssetsSettings(), "pyspark": spark_resource()}
