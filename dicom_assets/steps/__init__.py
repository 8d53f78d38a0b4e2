"""Pipeline steps: one function per asset, plain Python over the pure packages and lake I/O.

Dagster assets (``defs/``) are thin adapters over these; the CLI and the
benchmarks reach them through the same assets. No dagster or pyspark here.
"""
