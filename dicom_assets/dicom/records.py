"""Records that cross the boundary between the pure DICOM reader and its callers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ExtractTask:
    """One DICOM file to read, with the lineage the caller already knows.

    ``path`` is where the bytes are now. ``member`` names the single ZIP member
    to read in memory when ``path`` is a ``.dcm.zip``. ``file_path`` is the
    ``filePath`` column (final location, ``.zip`` when it will be compressed).
    """

    path: str
    file_path: str
    original_path: str
    source_system: str
    ingest_date: str
    source_modified_at: float  # POSIX seconds, UTC
    member: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DicomReadError(Exception):
    """A file that is not DICOM, is truncated or lacks the identifying UIDs.

    ``error_class`` is a short stable code (``NotDicom``, ``Truncated``,
    ``MissingUid``, ``InvalidElement``, ``TooLarge``, ``Timeout`` …) and the
    message never contains element values (no PHI): only tags, offsets and
    lengths.
    """

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message
