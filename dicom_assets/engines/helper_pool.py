"""A pool of fresh-interpreter helpers, fed over sockets from the calling thread.

The local engine's calling process reads batches itself, so it can also hand
out the helpers' batches and collect their results between its own batches;
it needs no threads for that. :class:`concurrent.futures.ProcessPoolExecutor`
runs a management thread and a queue-feeder thread in the caller, and its
``spawn`` start method starts multiprocessing's resource tracker (one more
interpreter) for the queues' semaphores. Measured on the benchmark's
extraction (two cores, one helper), those threads took about 0.14 s of the
caller's CPU away from its own batches. :class:`HelperPool` has none of that:
each helper is a new interpreter (``sys.executable``, started with
``fork``+``exec`` as ``spawn`` does, so no delta-rs thread or lock is ever
inherited) talking over one Unix socket pair, and the caller polls the
sockets after each of its own batches. (A helper reads its socket in a thread
of its own, :func:`~dicom_assets.engines.helper.serve`, so that a task and a
reply sent at the same time cannot block each other.)

A helper that dies (killed, crashed in native code) closes its socket; the
pool notices the end of file and raises :class:`HelperLost`, which names the
exit status. An exception raised by a task is sent back and raised again in
the caller with the helper's traceback as its cause. POSIX only (the helpers
get their socket through ``pass_fds``).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any

# The helper's first lines: only the standard library until it has the caller's sys.path.
_BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = conn.recv()\n"
    "from dicom_assets.engines.helper import serve\n"
    "serve(conn)\n"
)

# Helpers told to stop once every result was in; reaped later so that the
# caller need not wait for their interpreter teardown (~0.1 s).
_exiting: list[subprocess.Popen[bytes]] = []


class HelperLost(RuntimeError):
    """A pool helper exited while it still had batches to return."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a helper, as text (the cause of the re-raised exception)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


@dataclass
class _Helper:
    proc: subprocess.Popen[bytes]
    conn: connection.Connection
    in_flight: deque[int] = field(default_factory=deque)


def _interpreter_flags() -> list[str]:
    # The same flags (-X, -W, -O ...) a multiprocessing spawn child gets.
    try:
        return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - CPython has it since 3.3
        return []


def reap_exited() -> None:
    """Collect the exit status of helpers that were told to stop (no zombies are left behind)."""
    _exiting[:] = [p for p in _exiting if p.poll() is None]


def _wait_exiting() -> None:
    for p in _exiting:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    _exiting.clear()


atexit.register(_wait_exiting)


class HelperPool:
    """``size`` helper interpreters, each running ``initializer(*initargs)`` once, then tasks.

    Helpers get this process's environment, plus ``env_defaults`` for the
    variables it does not set.

    Tasks go to the helper with the fewest in flight; :meth:`collect` returns
    whichever results have arrived. Use it as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        size: int,
        initializer: Callable[..., None],
        initargs: tuple[Any, ...] = (),
        *,
        env_defaults: Mapping[str, str] | None = None,
    ) -> None:
        reap_exited()
        self._helpers: list[_Helper] = []
        self._arrived: deque[tuple[bool, Any]] = deque()
        self._next_id = 0
        env = {**(env_defaults or {}), **os.environ}
        try:
            for _ in range(size):
                self._helpers.append(self._start(initializer, initargs, env))
        except BaseException:
            self.close(wait=True)
            raise

    @staticmethod
    def _start(initializer: Callable[..., None], initargs: tuple[Any, ...], env: Mapping[str, str]) -> _Helper:
        mine, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, *_interpreter_flags(), "-c", _BOOTSTRAP, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        conn = connection.Connection(mine.detach())
        conn.send(list(sys.path))
        conn.send((initializer, initargs))
        return _Helper(proc, conn)

    @property
    def size(self) -> int:
        """The number of helpers."""
        return len(self._helpers)

    @property
    def pids(self) -> list[int]:
        """The helpers' process ids."""
        return [h.proc.pid for h in self._helpers]

    @property
    def in_flight(self) -> int:
        """Tasks submitted and not yet collected."""
        return sum(len(h.in_flight) for h in self._helpers) + len(self._arrived)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Send ``fn(*args)`` to the least busy helper (``fn`` and ``args`` must pickle).

        The helper reads its socket in a thread of its own
        (:func:`~dicom_assets.engines.helper.serve`), so this send finishes
        even while the helper waits for this process to take a reply.
        """
        helper = min(self._helpers, key=lambda h: len(h.in_flight))
        self._drain(helper)
        self._send(helper, fn, args)

    def _send(self, helper: _Helper, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        task_id = self._next_id
        self._next_id += 1
        try:
            helper.conn.send((task_id, fn, args))
        except OSError as exc:
            raise self._lost(helper) from exc
        helper.in_flight.append(task_id)

    def collect(self, *, block: bool) -> Iterator[Any]:
        """Results that have arrived; with ``block``, wait until at least one has (if any is in flight).

        A task's exception is raised here, when its turn comes.
        """
        for h in self._helpers:
            self._drain(h)
        busy = [h for h in self._helpers if h.in_flight]
        if block and not self._arrived and busy:
            for conn in connection.wait([h.conn for h in busy]):
                self._drain(next(h for h in busy if h.conn is conn))
        while self._arrived:
            ok, value = self._arrived.popleft()
            if not ok:
                exc_value, tb = value
                raise exc_value from RemoteTraceback(tb)
            yield value

    def call_each(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(*args)`` once in every helper and wait for all; their results, one per helper.

        For per-process work at the end of a job (e.g. waiting for a helper's
        background threads); only when no task is in flight, so that no batch
        result is mixed in. An exception raised in a helper is raised here.
        """
        if self.in_flight:
            raise RuntimeError("call_each needs every task collected first")
        for h in self._helpers:
            self._send(h, fn, args)
        for h in self._helpers:
            connection.wait([h.conn])
            self._drain(h)
        replies, self._arrived = list(self._arrived), deque()
        for ok, value in replies:
            if not ok:
                exc_value, tb = value
                raise exc_value from RemoteTraceback(tb)
        return [value for _ok, value in replies]

    def _drain(self, h: _Helper) -> None:
        """Take in every reply waiting in ``h``'s socket (end of file: the helper is lost)."""
        while h.in_flight and h.conn.poll():
            try:
                task_id, ok, value = h.conn.recv()
            except (EOFError, OSError) as exc:
                raise self._lost(h) from exc
            if task_id != h.in_flight[0]:  # pragma: no cover - a protocol error, never expected
                raise HelperLost(f"pool helper {h.proc.pid} returned task {task_id}, expected {h.in_flight[0]}")
            h.in_flight.popleft()
            self._arrived.append((ok, value))

    @staticmethod
    def _lost(h: _Helper) -> HelperLost:
        code = h.proc.wait()
        return HelperLost(f"pool helper {h.proc.pid} exited with status {code} with {len(h.in_flight)} batch(es) unreturned")

    def close(self, *, wait: bool = True) -> None:
        """Tell every helper to stop after its current task; with ``wait``, wait until they have exited."""
        for h in self._helpers:
            try:
                h.conn.send(None)
            except OSError:
                pass  # it has exited already
            h.conn.close()
            if wait:
                h.proc.wait()
            else:
                _exiting.append(h.proc)
        self._helpers = []

    def __enter__(self) -> HelperPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=True)
