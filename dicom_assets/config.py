"""Pure settings record (SPEC §9): one place for every knob, env-overridable.

The Dagster resource in :mod:`dicom_assets.settings` mirrors these fields; pure
modules and engines receive a :class:`Settings` and never read the environment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAKE = PROJECT_ROOT / "data" / "lake"
DEFAULT_DATA_DIR = PROJECT_ROOT / "data"

#: Environment variable prefix: ``DICOM_ASSETS_<FIELD_NAME_UPPER>`` overrides a field.
ENV_PREFIX = "DICOM_ASSETS_"


@dataclass(frozen=True)
class Settings:
    """Every setting of the pipeline, with production defaults.

    ``lake`` is the root folder of the lake (SPEC §2), env ``DICOM_ASSETS_LAKE``.
    Size limits guard against ZIP bombs and oversized files (SPEC §6).
    """

    lake: str = str(DEFAULT_LAKE)
    #: Namespaces to scan; empty means every folder found under Ingest/External.
    namespaces: tuple[str, ...] = ()
    compression_enabled: bool = True
    settle_seconds: float = 10.0
    bulk_data_threshold: int = 1024
    batch_size: int = 64
    workers: int = 0  # 0 = os.cpu_count()
    engine: str = "local"  # local | spark
    spark_master: str = "local[*]"
    max_file_bytes: int = 8 * 1024**3
    max_zip_bytes: int = 8 * 1024**3
    max_zip_uncompressed_bytes: int = 32 * 1024**3
    max_zip_ratio: float = 200.0
    max_zip_members: int = 100_000
    max_zip_depth: int = 4
    #: Per-file budget for reading one DICOM file (seconds); pathological files go to Failed.
    file_timeout_seconds: float = 60.0
    #: Address-space cap of each worker process (0 = none). Must exceed
    #: max_file_bytes plus ~1 GiB: large files are memory-mapped.
    worker_memory_bytes: int = 0
    modality_concept_map: str = str(DEFAULT_DATA_DIR / "omop_modality_concepts.csv")
    body_part_concept_map: str = str(DEFAULT_DATA_DIR / "omop_body_part_concepts.csv")
    #: Optional Athena vocabulary folder holding CONCEPT.csv and CONCEPT_RELATIONSHIP.csv.
    omop_vocabulary_dir: str = ""
    dicomweb_base_url: str = ""
    purge_bronze_after_days: int = 0

    @property
    def lake_path(self) -> Path:
        return Path(self.lake)

    def effective_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``DICOM_ASSETS_*`` environment variables, then ``overrides``."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    default = f.default
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, tuple):
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    return raw


__all__ = ["Settings", "PROJECT_ROOT", "DEFAULT_LAKE", "ENV_PREFIX"]
