"""Extraction engines: a local ``spawn`` process pool and Spark, over the same pure functions."""
