"""Start-up of a local-engine pool helper: its allocator, its memory cap, and the imports it goes without.

While a helper starts, the second core does nothing for the extraction, so its
start-up is paid in wall time on every pool run. Measured in the benchmark's
extraction (the corpus eight times, batches of 64): 0.57-0.66 s from spawn to
the end of a helper's first batch, 0.35-0.41 s once it started without
optional imports it never uses, and about 0.07 s less again without numpy:

* **numpy** (0.07 s) and **pandas** (0.12 s): pyarrow and pydicom import
  numpy when it is installed, but both work without it (pydicom needs it only
  to decode pixels, pyarrow only to convert to and from numpy and pandas), and
  pyarrow imports pandas on the first ``pa.array`` built from a Python list,
  only to ask whether the list is a pandas object.
* **requests** (0.04 s) and **tqdm** (0.013 s): ``pydicom.pixels`` imports
  ``pydicom.data``, whose downloader of pydicom's test files uses requests and
  a tqdm progress bar when installed, ``urllib`` and no bar otherwise.

So :func:`init_worker` reports these as not installed, for the rest of the
helper's life: a pyarrow imported without numpy crashes (segmentation fault)
in ``Table.to_pandas()`` if numpy turns up later, whereas a helper that never
has numpy raises ``ModuleNotFoundError`` there. The helper only reads
batches (:func:`dicom_assets.engines.batch.run_batch`), which use neither;
a test compares its rows with those of a process that has them all.

This module imports only the standard library, because a helper's bootstrap
imports it (for :func:`serve`) before anything else.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

#: Optional packages a pool helper runs without (see the module docstring).
HELPER_WITHOUT = ("numpy", "pandas", "requests", "tqdm")


class _MissingModules:
    """A meta path finder that reports the named top-level packages as not installed."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} in a local-engine pool helper, which runs without "
                f"{', '.join(sorted(self.names))} (dicom_assets.engines.helper)",
                name=fullname,
            )
        return None


def block_imports(names: Sequence[str]) -> _MissingModules:
    """From now on, ``import`` of any of ``names`` not yet imported raises ``ModuleNotFoundError``.

    Modules already imported stay available. Returns the finder, which
    ``sys.meta_path.remove`` takes out again.
    """
    finder = _MissingModules([n for n in names if n not in sys.modules])
    sys.meta_path.insert(0, finder)
    return finder


def init_worker(address_space_bytes: int = 0) -> None:
    """Pool initializer: the optional imports of :data:`HELPER_WITHOUT` blocked, Arrow on the
    system allocator, the reader imported, and this helper's address space capped at
    ``address_space_bytes`` (0: no cap).

    With a cap, Python raises ``MemoryError`` where the kernel would kill the
    process, and the reader turns it into a ``TooLarge`` failure record. The
    cap counts virtual memory: memory-mapped files (files from 64 MiB up are
    mapped whole) and pyarrow's reservations included, so it must be well
    above ``max_file_bytes`` plus about 1 GiB. Linux and macOS only; never
    applied to the calling process (the in-process path of one worker).
    """
    block_imports(HELPER_WITHOUT)
    from dicom_assets.lake.arrow_memory import use_system_allocator

    use_system_allocator()
    import dicom_assets.engines.batch  # noqa: F401 - what a helper runs, imported during start-up

    if address_space_bytes <= 0 or sys.platform == "win32":
        return
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = address_space_bytes if hard == resource.RLIM_INFINITY else min(address_space_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def serve(conn: Any) -> None:
    """A :class:`~dicom_assets.engines.helper_pool.HelperPool` helper's loop, in its main thread.

    Receives ``(initializer, initargs)`` and runs it once, then answers each
    ``(task_id, fn, args)`` with ``(task_id, True, result)`` or
    ``(task_id, False, (exception, traceback text))`` until it receives
    ``None`` or the caller's end of the socket closes. Tasks run in the main
    thread, so the ``SIGALRM`` backstop of the read budget applies. A second
    thread only reads the socket: while this thread waits to send a reply the
    caller has not taken yet, the caller may be sending a task, and neither
    send could finish if nobody read (the caller runs no threads).
    """
    import queue
    import threading
    import traceback

    initializer, initargs = conn.recv()
    initializer(*initargs)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = None
            except Exception:  # noqa: BLE001 - a task that cannot be loaded here (e.g. a function of __main__)
                # Its task id went down with it, so no reply can name it: the
                # helper stops, and the caller reports it lost instead of
                # waiting for that reply for ever.
                traceback.print_exc()
                message = None
            inbox.put(message)
            if message is None:
                return

    threading.Thread(target=read, name="helper-inbox", daemon=True).start()
    while (message := inbox.get()) is not None:
        task_id, fn, args = message
        try:
            reply = (task_id, True, fn(*args))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            reply = (task_id, False, (portable_exception(exc), traceback.format_exc()))
        try:
            conn.send(reply)
        except OSError:  # the caller has gone; nobody wants the result
            return


def portable_exception(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a ``RuntimeError`` with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")
    return exc
