"""Benchmarks of dicom_assets: ``make bench`` runs :mod:`benchmarks.run_all`.

Every measured workload runs in its own child process (see
:func:`benchmarks.bench_memory.measured_child`) so that its peak memory and
bytes read are its own and not the harness's.
"""
