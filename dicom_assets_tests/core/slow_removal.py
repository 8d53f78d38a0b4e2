"""A test hook that slows down the background removal of compressed originals, in any process.

Pool helpers are fresh interpreters, so a test cannot monkeypatch them; it
sends :func:`slow_down_removals` to each helper instead (``HelperPool.call_each``).
Kept free of test-only imports so that a helper can import it; in this
process, tests monkeypatch with :func:`delayed` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dicom_assets.dicom import compress


def delayed(remove: Callable[[list[str], list[str]], None], seconds: float) -> Callable[[list[str], list[str]], None]:
    """``remove`` (a ``_remove_originals``), starting ``seconds`` late."""

    def late(paths: list[str], folders: list[str]) -> None:
        time.sleep(seconds)
        remove(paths, folders)

    return late


def slow_down_removals(seconds: float) -> None:
    """From now on, every removal of originals in this process starts ``seconds`` late."""
    compress._remove_originals = delayed(compress._remove_originals, seconds)  # type: ignore[assignment]
