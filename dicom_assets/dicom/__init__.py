"""Pure DICOM handling: sniffing, reading to the DICOM JSON model, promoted columns, ZIPs.

Imports only the standard library, pydicom and pyarrow: never dagster or pyspark.
"""
