"""The lake's folder layout (SPEC §2), in one place."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEFAULT_NAMESPACE = "default"

#: Delta table folders, fixed by SPEC §2: tools and tests read them directly.
TABLES: dict[str, tuple[str, str]] = {
    "dicomimagingmetastore": ("bronze", "dicomimagingmetastore"),
    "dicom_failures": ("bronze", "dicom_failures"),
    "bronze_ImagingStudy": ("bronze", "ImagingStudy"),
    "ImagingMetastore": ("silver", "ImagingMetastore"),
    "silver_ImagingStudy": ("silver", "ImagingStudy"),
    "image_occurrence": ("gold", "image_occurrence"),
    "procedure_occurrence": ("gold", "procedure_occurrence"),
    "_idmap_image_occurrence": ("gold", "_idmap_image_occurrence"),
    "_idmap_person": ("gold", "_idmap_person"),
    "_idmap_procedure_occurrence": ("gold", "_idmap_procedure_occurrence"),
}


@dataclass(frozen=True)
class LakePaths:
    """Folders of one lake rooted at ``root``.

    ``day`` arguments are partition keys ``yyyy/mm/dd`` (the UTC arrival day).
    The fixed folders are computed once per instance (organise asks for them per file).
    """

    root: Path

    @classmethod
    def of(cls, root: str | Path) -> LakePaths:
        return cls(Path(root).resolve())

    @cached_property
    def files(self) -> Path:
        return self.root / "bronze" / "Files"

    @cached_property
    def ingest_root(self) -> Path:
        return self.files / "Ingest" / "Imaging" / "DICOM"

    @cached_property
    def external_root(self) -> Path:
        return self.files / "External" / "Imaging" / "DICOM"

    @cached_property
    def process_root(self) -> Path:
        return self.files / "Process" / "Imaging" / "DICOM"

    @cached_property
    def failed_root(self) -> Path:
        return self.files / "Failed" / "Imaging" / "DICOM"

    @cached_property
    def state_dir(self) -> Path:
        """Internal bookkeeping (journals, External read-state); never user data."""
        return self.root / "_state"

    def process_dir(self, ns: str, day: str) -> Path:
        return self.process_root / ns / day

    def failed_dir(self, ns: str, day: str) -> Path:
        return self.failed_root / ns / day

    def ndjson_dir(self, ns: str, day: str) -> Path:
        return self.files / "Process" / "Clinical" / "FHIR-NDJSON" / ns / day / "ImagingStudy"

    def ndjson_root(self) -> Path:
        return self.files / "Process" / "Clinical" / "FHIR-NDJSON"

    def table(self, name: str) -> Path:
        layer, folder = TABLES[name]
        return self.root / layer / "Tables" / folder

    def table_uri(self, name: str) -> str:
        return str(self.table(name))

    def ensure(self) -> LakePaths:
        """Create the fixed top-level folders so users see where to drop files."""
        for d in (self.ingest_root, self.external_root, self.process_root, self.failed_root):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def is_inside(self, path: Path) -> bool:
        """True when ``path`` (symlinks resolved) stays inside the lake."""
        try:
            Path(path).resolve().relative_to(self.root)
            return True
        except ValueError:
            return False
