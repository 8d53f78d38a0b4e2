"""Start-up of a local-engine pool helper: its allocator, its memory cap, and what it leaves unimported.

While a helper starts, the second core does nothing for the extraction, so its
start-up is paid in wall time on every pool run. Measured in the benchmark's
extraction (the corpus eight times, batches of 64): 0.57-0.66 s from spawn to
the end of a helper's first batch, 0.35-0.41 s once it starts without
optional imports that it never uses:

* **pandas** (0.12 s): pyarrow imports it on the first ``pa.array`` built
  from a Python list, only to ask whether the list is a pandas object.
* **requests** (0.04 s) and **tqdm** (0.013 s): ``pydicom.pixels`` imports
  ``pydicom.data``, whose downloader of pydicom's test files uses requests and
  a tqdm progress bar when installed, ``urllib`` and no bar otherwise.

So :func:`init_worker` imports the reader with these reported as missing, and
lets pyarrow take its one look for pandas then. After start-up they import
normally again; only pyarrow's answer stays cached, so in a helper it treats a
pandas object as a plain sequence (none is ever passed there) while
``Table.to_pandas()`` still works (pyarrow imports pandas again on that path).

This module imports only the standard library, because a helper's bootstrap
imports it (for :func:`serve`) before anything else.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

#: Optional imports a pool helper starts without (see the module docstring).
SKIPPED_IMPORTS = ("pandas", "requests", "tqdm")


class _MissingModules:
    """A meta path finder that reports the named top-level packages as not installed."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is not imported while a pool helper starts", name=fullname)
        return None


@contextmanager
def imports_skipped(names: Sequence[str]) -> Iterator[None]:
    """Within the block, ``import`` of any of ``names`` not yet imported raises ``ModuleNotFoundError``.

    Modules already imported stay available; after the block every import works again.
    """
    finder = _MissingModules([n for n in names if n not in sys.modules])
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def init_worker(address_space_bytes: int = 0) -> None:
    """Pool initializer: Arrow on the system allocator, the reader imported lean, and
    this helper's address space capped at ``address_space_bytes`` (0: no cap).

    With a cap, Python raises ``MemoryError`` where the kernel would kill the
    process, and the reader turns it into a ``TooLarge`` failure record. The
    cap counts virtual memory: memory-mapped files (files from 64 MiB up are
    mapped whole) and pyarrow's reservations included, so it must be well
    above ``max_file_bytes`` plus about 1 GiB. Linux and macOS only; never
    applied to the calling process (the in-process path of one worker).
    """
    with imports_skipped(SKIPPED_IMPORTS):
        from dicom_assets.lake.arrow_memory import use_system_allocator

        use_system_allocator()
        import pyarrow as pa

        pa.array([], type=pa.null())  # pyarrow's one look for pandas, made now
        import dicom_assets.engines.batch  # noqa: F401 - what a helper runs, imported without them
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
