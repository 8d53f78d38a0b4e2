"""Resources: the settings and, for ``engine: spark``, a lazily started Spark session."""


import importlib.util
import os
import sys
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from dicom_assets.settings import DicomAssetsSettings


class SparkUnavailable(dg.ConfigurableResource):
    """Stands in for the Spark session when the ``[spark]`` extra is not installed."""

    @property
    def spark_session(self) -> Any:
        raise RuntimeError("engine 'spark' needs the spark extra: pip install -e '.[spark]' (and Java 17)")


class LazySparkSession(dg.ConfigurableResource):
    """``dagster_pyspark``'s :class:`~dagster_pyspark.LazyPySparkResource`, itself imported on first use.

    Importing ``dagster_pyspark`` (and pyspark with it) took ~0.5 s of CPU,
    paid by every process that loads the definitions (code server, run
    worker, each step of the multiprocess executor) though only
    ``engine: spark`` uses the session.
    """

    spark_config: dict[str, Any]
    _delegate: Any = PrivateAttr(default=None)

    @property
    def spark_session(self) -> Any:
        if self._delegate is None:
            from dagster_pyspark import LazyPySparkResource

            self._delegate = LazyPySparkResource(spark_config=self.spark_config)
        return self._delegate.spark_session


def spark_resource() -> dg.ConfigurableResource:
    """A lazily started Spark session (so engine=local needs no JVM, nor pyspark imported).

    Its configuration comes from :func:`dicom_assets.engines.spark.default_spark_conf`
    (master from ``DICOM_ASSETS_SPARK_MASTER``, executors on this interpreter).
    """
    if importlib.util.find_spec("dagster_pyspark") is None:
        return SparkUnavailable()
    from dicom_assets.config import Settings
    from dicom_assets.engines.spark import default_spark_conf

    # Executors must run the same interpreter (and so the same pure functions) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    conf = default_spark_conf(Settings.from_env())
    conf.setdefault("spark.app.name", "dicom_assets")
    return LazySparkSession(spark_config=conf)


def default_resources() -> dict[str, Any]:
    return {"settings": DicomAssetsSettings(), "pyspark": spark_resource()}
