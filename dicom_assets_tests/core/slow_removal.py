"""A test hook that slows down the background removal of compressed originals, in any process.

Pool helpers are fresh interpreters, so a test cannot monkeypatch them; it
sends :func:`slow_down_removals` to each helper instead (``HelperPool.call_each``).
Kept free of test-only imports so that a helper can import it.
"""

from __future__ import annotations

import time

from dicom_assets.dicom import compress


def slow_down_removals(seconds: float) -> None:
    """From now on, every removal of originals in this process starts ``seconds`` late."""
    real = compress._remove_originals

    def late(paths: list[str], folders: list[str]) -> None:
        time.sleep(seconds)
        real(paths, folders)

    compress._remove_originals = late  # type: ignore[assignment]
