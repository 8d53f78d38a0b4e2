"""dicom_assets: DICOM files → Delta tables (bronze), FHIR R4B ImagingStudy (silver), OMOP (gold)."""

__version__ = "0.1.0"
