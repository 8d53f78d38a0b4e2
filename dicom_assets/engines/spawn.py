"""A ``spawn`` start method whose children do not re-import the parent's ``__main__``.

A spawned child normally runs the parent's main module again (as
``__mp_main__``) so that functions defined there can be unpickled. Our pool
workers only run functions of this package, but the main module of a step
process started by the Dagster CLI, web UI or daemon is the ``dagster``
script, which imports all of Dagster: measured, it took a helper's start-up
from 0.35 s to 0.95 s of CPU and 560 to 1,340 modules. :class:`LeanSpawnContext`
leaves the main module out of the child's preparation data (``sys.path``, the
working directory and the rest are kept), which is what ``spawn`` already does
when the parent is ``python -c``.

The standard library has no switch for this, so the one function that builds
the preparation data is wrapped, once, and the wrapper drops the main module
only for processes this context starts, from the thread that starts them.
"""

from __future__ import annotations

import threading
from multiprocessing import context as mp_context
from multiprocessing import spawn as mp_spawn
from typing import Any

#: The preparation-data keys that make a spawned child import the parent's main module.
MAIN_MODULE_KEYS = ("init_main_from_name", "init_main_from_path")

_starting = threading.local()
_install_lock = threading.Lock()


def _install() -> None:
    with _install_lock:
        if getattr(mp_spawn.get_preparation_data, "_dicom_assets_lean", False):
            return
        original = mp_spawn.get_preparation_data

        def get_preparation_data(name: str) -> dict[str, Any]:
            data: dict[str, Any] = original(name)
            if getattr(_starting, "lean", False):
                for key in MAIN_MODULE_KEYS:
                    data.pop(key, None)
            return data

        get_preparation_data._dicom_assets_lean = True  # type: ignore[attr-defined]
        mp_spawn.get_preparation_data = get_preparation_data


class LeanSpawnProcess(mp_context.SpawnProcess):
    """A spawn process started without the parent's main module."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # noqa: N802 - the name multiprocessing calls
        _install()
        _starting.lean = True
        try:
            return mp_context.SpawnProcess._Popen(process_obj)
        finally:
            _starting.lean = False


class LeanSpawnContext(mp_context.SpawnContext):
    """The ``spawn`` context (start method name ``"spawn"``) with :class:`LeanSpawnProcess`."""

    Process = LeanSpawnProcess  # type: ignore[assignment]
