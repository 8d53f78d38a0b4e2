"""Dagster wiring only: partitions, assets, checks, sensors, schedules over ``steps/``."""
