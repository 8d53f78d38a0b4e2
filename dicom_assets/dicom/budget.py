"""The per-file budget of the reader: time, size, nesting and work (SPEC §6).

A hostile or broken file must end as a failure record, never as a hung or
crashed batch. :class:`ReadLimits` holds the limits for reading one file and
:class:`Budget` the running counters the element walker spends against them:

* ``max_file_bytes`` (config ``max_file_bytes``): bigger files are refused
  before a byte is read (``TooLarge``).
* ``timeout_seconds`` (config ``file_timeout_seconds``): wall-clock time for
  reading one file (``Timeout``). The walker checks its deadline every few
  thousand elements and at the end of every item, which works in any thread
  (the Spark engine). :func:`alarm` adds a ``SIGALRM`` backstop for code that
  does not check (reading a stuck file, hashing, encoding): only in the main
  thread, on platforms with :func:`signal.setitimer`, and only when no other
  ``ITIMER_REAL`` alarm is running (pytest-timeout's, for one), which is left
  untouched. A signal cannot interrupt one long C call (``zlib``, ``sha256``),
  so those are kept short by the size limits instead.
* ``max_depth``: nested sequences (``TooDeep``); real objects nest well under
  20 levels, and Python's recursion limit (1000 frames) must never be the
  limit that triggers.
* ``max_elements``: elements and items visited for one file, re-reads
  included (``TooLarge``). This bounds the memory the JSON model takes (a few
  hundred bytes per element) and the work a file can cause by repetition:
  floods of empty items or zero-length elements, a Specific Character Set
  re-read at every nesting level.
* ``max_value_bytes``: one value that is decoded into the JSON model (text,
  numbers, inline binary); bulk data is never decoded, so it is not counted
  (``TooLarge``).
* ``max_inflated_bytes`` / ``max_inflate_ratio`` (config ``max_zip_ratio``):
  the inflated dataset of the Deflated Explicit VR Little Endian transfer
  syntax (PS3.5 A.5); a deflate bomb stops before it is inflated
  (``TooLarge``). Ratios count only above 1 MiB, as for ZIP members.

Out of memory (``MemoryError``, e.g. under the local engine's optional
address-space limit) and Python's own ``RecursionError`` become ``TooLarge``
and ``TooDeep`` failures in :func:`dicom_assets.dicom.extract.extract_batch`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from dicom_assets.dicom.records import DicomReadError

__all__ = ["ReadLimits", "Budget", "FileTooLarge", "alarm", "alarm_handler_installed", "INFLATE_RATIO_FLOOR"]

#: Below this inflated size the deflate ratio is not checked (blank images compress very well).
INFLATE_RATIO_FLOOR = 1 << 20
#: Elements between two looks at the clock inside one dataset.
CHECK_EVERY = 4096


@dataclass(frozen=True)
class ReadLimits:
    """Limits for reading one DICOM file (see the module docstring for each).

    ``timeout_seconds <= 0`` disables the time limit.
    """

    max_file_bytes: int = 8 * 1024**3
    timeout_seconds: float = 60.0
    max_depth: int = 64
    max_elements: int = 2_000_000
    max_value_bytes: int = 64 * 1024**2
    max_inflated_bytes: int = 1 << 30
    max_inflate_ratio: float = 200.0

    @classmethod
    def from_settings(cls, settings: Any) -> ReadLimits:
        """The limits the settings (SPEC §9) name: ``max_file_bytes``, ``file_timeout_seconds``, ``max_zip_ratio``."""
        return cls(
            max_file_bytes=int(settings.max_file_bytes),
            timeout_seconds=float(settings.file_timeout_seconds),
            max_inflate_ratio=float(settings.max_zip_ratio),
        )


class FileTooLarge(DicomReadError):
    """A file over ``max_file_bytes``, refused unread (``size`` is its size in bytes)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("TooLarge", f"{size} bytes, limit max_file_bytes={limit}")
        self.size = size


def timeout_error(seconds: float) -> DicomReadError:
    return DicomReadError("Timeout", f"reading took longer than {seconds:g} s (file_timeout_seconds)")


class Budget:
    """What one file has spent so far against its :class:`ReadLimits`.

    ``deadline`` is a :func:`time.monotonic` instant or ``None`` (no time limit).
    """

    __slots__ = ("limits", "deadline", "elements", "depth", "_next_check")

    def __init__(self, limits: ReadLimits, deadline: float | None = None) -> None:
        self.limits = limits
        self.deadline = deadline
        self.elements = 0
        self.depth = 0
        self._next_check = 0

    @classmethod
    def start(cls, limits: ReadLimits | None) -> Budget:
        """A fresh budget whose clock starts now."""
        limits = limits or ReadLimits()
        t = limits.timeout_seconds
        return cls(limits, time.monotonic() + t if t > 0 else None)

    def spend(self, n: int) -> None:
        """Count ``n`` elements or items; raise once over ``max_elements`` or past the deadline."""
        self.elements += n
        if self.elements >= self._next_check:
            self._next_check = self.elements + CHECK_EVERY // 4
            if self.elements > self.limits.max_elements:
                raise DicomReadError(
                    "TooLarge", f"more than {self.limits.max_elements} elements and items (max_elements)"
                )
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise timeout_error(self.limits.timeout_seconds)

    def enter(self, offset: int) -> None:
        """One sequence level deeper; raise ``TooDeep`` past ``max_depth``."""
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise DicomReadError(
                "TooDeep", f"sequence at offset {offset} nested more than {self.limits.max_depth} deep"
            )

    def value(self, tag: int, offset: int, length: int) -> None:
        """Refuse a value of ``length`` bytes that would be decoded into memory."""
        if length > self.limits.max_value_bytes:
            raise DicomReadError(
                "TooLarge",
                f"({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {offset}: value of {length} bytes "
                f"over max_value_bytes={self.limits.max_value_bytes}",
            )

    def inflate_limit(self, deflated_bytes: int) -> int:
        """How many bytes a deflated dataset of ``deflated_bytes`` may inflate to."""
        lim = self.limits
        by_ratio = max(INFLATE_RATIO_FLOOR, int(deflated_bytes * lim.max_inflate_ratio))
        return min(lim.max_inflated_bytes, by_ratio)


class _Alarm:
    """State of the SIGALRM backstop: raise only while a file is being read."""

    armed = False
    seconds = 0.0


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _Alarm.armed:
        _Alarm.armed = False
        raise timeout_error(_Alarm.seconds)


@contextmanager
def alarm_handler_installed() -> Iterator[bool]:
    """Install the SIGALRM handler for a batch when it is safe; yields whether it was.

    Safe means: the main thread, :func:`signal.setitimer` available, and no
    other real-time timer running. The previous handler is restored after.
    """
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield False
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        yield True
    finally:
        _Alarm.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def alarm(seconds: float, enabled: bool) -> Iterator[None]:
    """Raise a ``Timeout`` :class:`DicomReadError` in the main thread after ``seconds``.

    Use inside :func:`alarm_handler_installed` (``enabled`` is what it
    yielded). The alarm is disarmed on exit, before anything else runs, so a
    late signal never raises outside the block.
    """
    if not enabled or seconds <= 0:
        yield
        return
    _Alarm.seconds = seconds
    _Alarm.armed = True
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _Alarm.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
