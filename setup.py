"""Packaging for dicom_assets: a Dagster-orchestrated medallion lakehouse for DICOM."""

from setuptools import find_packages, setup

DAGSTER_VERSION = "1.13.27"  # core and integrations move in lockstep
DAGSTER_LIB_VERSION = "0.29.27"

setup(
    name="dicom_assets",
    version="0.1.0",
    description="DICOM files to Delta tables, FHIR R4B ImagingStudy and OMOP image_occurrence with Dagster",
    packages=find_packages(exclude=["dicom_assets_tests*", "benchmarks*"]),
    package_data={"dicom_assets": ["py.typed", "fhir/data/*.csv", "omop/data/*.csv"]},
    python_requires=">=3.11",
    install_requires=[
        f"dagster=={DAGSTER_VERSION}",
        f"dagster-webserver=={DAGSTER_VERSION}",
        "pydicom==3.0.2",
        "deltalake==1.6.6",
        "pyarrow>=16",
        "pandas>=2.2",
        "fhir.resources==8.3.0",
        "isal>=1.6",
        "orjson>=3.9",
    ],
    extras_require={
        "spark": [f"dagster-pyspark=={DAGSTER_LIB_VERSION}", "pyspark>=4.0,<5"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6.100",
            "ruff",
            "mypy",
        ],
    },
    entry_points={"console_scripts": ["dicom-assets=dicom_assets.cli:main"]},
)
