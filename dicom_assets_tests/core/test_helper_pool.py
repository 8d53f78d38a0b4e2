"""The local engine's helper pool: fresh interpreters fed over sockets, with no threads in the caller."""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from dicom_assets.engines.helper import init_worker, portable_exception
from dicom_assets.engines.helper_pool import HelperLost, HelperPool, RemoteTraceback, reap_exited

SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    with open(os.environ["IMPORT_LOG"], "a") as log:
        log.write(f"{__name__} {os.getpid()}\\n")

    if __name__ == "__main__":
        from dicom_assets.engines.helper import init_worker
        from dicom_assets.engines.helper_pool import HelperPool
        from dicom_assets.lake.fileops import display_path

        with HelperPool(1, init_worker) as pool:
            pool.submit(os.getpid)
            # A function of the package still runs in the helper, found on the parent's sys.path.
            pool.submit(display_path, "scan.dcm")
            pid, shown = [r for _ in range(2) for r in pool.collect(block=True)][:2]
        print(pid, shown)
    """
)


def test_the_helper_does_not_import_the_main_module(tmp_path: Path) -> None:
    """In a UI or daemon run the main module is the ``dagster`` script: a helper must not import it again."""
    script = tmp_path / "main_script.py"
    script.write_text(SCRIPT)
    log = tmp_path / "imports.log"
    done = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "IMPORT_LOG": str(log)},
        capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path,
    )
    pid, shown = done.stdout.split()[-2:]
    imports = log.read_text().splitlines()
    assert [line.split()[0] for line in imports] == ["__main__"]
    assert pid not in " ".join(imports)
    assert shown == "scan.dcm"


def _results(pool: HelperPool, n: int) -> list[object]:
    out: list[object] = []
    while len(out) < n:
        out.extend(pool.collect(block=True))
    return out


def test_results_come_back_and_the_caller_runs_no_threads() -> None:
    before = threading.active_count()
    with HelperPool(2, init_worker) as pool:
        assert threading.active_count() == before
        for x in (4.0, 9.0, 16.0, 25.0):
            pool.submit(math.sqrt, x)
        for _ in range(3):
            pool.submit(os.getpid)
        assert pool.in_flight == 7
        got = _results(pool, 7)
        assert pool.in_flight == 0 and list(pool.collect(block=True)) == []
        pids = set(pool.pids)
    assert sorted(x for x in got if isinstance(x, float)) == [2.0, 3.0, 4.0, 5.0]
    helpers_seen = {x for x in got if isinstance(x, int)}
    assert helpers_seen <= pids and os.getpid() not in helpers_seen


def test_an_exception_in_a_task_is_raised_in_the_caller_with_the_helpers_traceback() -> None:
    with HelperPool(1, init_worker) as pool:
        pool.submit(Fraction, "x")
        pool.submit(json.loads, "{")
        pool.submit(math.sqrt, 1.0)
        with pytest.raises(ValueError, match="Invalid literal for Fraction") as info:
            _results(pool, 1)
        assert isinstance(info.value.__cause__, RemoteTraceback) and "fractions.py" in str(info.value.__cause__)
        with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
            _results(pool, 1)
        assert _results(pool, 1) == [1.0]  # the helper carries on


def test_a_helper_that_dies_is_reported_not_waited_for() -> None:
    with HelperPool(1, init_worker) as pool:
        pool.submit(time.sleep, 60)
        time.sleep(0.5)
        os.kill(pool.pids[0], signal.SIGKILL)
        with pytest.raises(HelperLost, match=f"status {-signal.SIGKILL}"):
            _results(pool, 1)


class _FailsToLoad:
    """Pickles in the caller; loading it in a helper raises (as a function of ``__main__`` would there)."""

    def __reduce__(self) -> tuple[object, tuple[int, int]]:
        return (operator.truediv, (1, 0))


def test_a_task_the_helper_cannot_load_is_reported_not_waited_for() -> None:
    pool = HelperPool(1, init_worker)
    pid = pool.pids[0]
    try:
        pool.submit(repr, _FailsToLoad())
        deadline = time.monotonic() + 60  # if the reply never comes, fail rather than hang
        with pytest.raises(HelperLost):
            while time.monotonic() < deadline and not list(pool.collect(block=False)):
                time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        pool.close(wait=False)


def test_close_without_waiting_leaves_no_process_behind() -> None:
    pool = HelperPool(2, init_worker)
    pool.submit(os.getpid)
    _results(pool, 1)
    pids = pool.pids
    pool.close(wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        reap_exited()
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


def test_non_blocking_collect_returns_at_once_while_a_helper_is_busy() -> None:
    with HelperPool(1, init_worker) as pool:
        pool.submit(time.sleep, 2)
        t = time.perf_counter()
        assert list(pool.collect(block=False)) == []
        assert time.perf_counter() - t < 0.5
        assert _results(pool, 1) == [None]


class _NeedsTwo(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")


def test_an_exception_that_does_not_pickle_goes_back_as_its_text() -> None:
    assert isinstance(portable_exception(ValueError("v")), ValueError)
    lost = portable_exception(_NeedsTwo(1, 2))
    assert type(lost) is RuntimeError and str(lost) == "_NeedsTwo: 1+2"


def test_helpers_get_the_environment_defaults_unless_this_process_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_ASSETS_SET_HERE", "mine")
    monkeypatch.delenv("DICOM_ASSETS_DEFAULTED", raising=False)
    defaults = {"DICOM_ASSETS_SET_HERE": "default", "DICOM_ASSETS_DEFAULTED": "default"}
    with HelperPool(1, init_worker, env_defaults=defaults) as pool:
        for name in ("DICOM_ASSETS_SET_HERE", "DICOM_ASSETS_DEFAULTED"):
            pool.submit(os.getenv, name)
        assert _results(pool, 2) == ["mine", "default"]
    assert "DICOM_ASSETS_DEFAULTED" not in os.environ


BIG_MESSAGES = textwrap.dedent(
    """
    from dicom_assets.engines.helper import init_worker
    from dicom_assets.engines.helper_pool import HelperPool

    # Replies and tasks each far larger than a socket's buffer, interleaved: the
    # caller sends a big task while the helper sends a big reply.
    with HelperPool(1, init_worker) as pool:
        got = []
        for _ in range(3):
            pool.submit(bytes, 4_000_000)
            pool.submit(len, b"x" * 4_000_000)
        while pool.in_flight:
            got.extend(pool.collect(block=True))
    print(sorted(len(g) if isinstance(g, bytes) else g for g in got))
    """
)


def test_big_tasks_and_big_replies_do_not_deadlock() -> None:
    done = subprocess.run([sys.executable, "-c", BIG_MESSAGES], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[0] == str([4_000_000] * 6)


def test_call_each_runs_once_in_every_helper_after_the_tasks_are_collected() -> None:
    with HelperPool(2, init_worker) as pool:
        assert pool.call_each(os.getpid) == pool.pids
        pool.submit(math.sqrt, 4.0)
        with pytest.raises(RuntimeError, match="every task collected"):
            pool.call_each(os.getpid)
        assert _results(pool, 1) == [2.0]
        with pytest.raises(ValueError, match="Invalid literal for Fraction") as info:
            pool.call_each(Fraction, "x")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert pool.in_flight == 0 and pool.call_each(math.sqrt, 9.0) == [3.0, 3.0]
