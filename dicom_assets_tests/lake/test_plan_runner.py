"""PlanRunner: organise's plans run one at a time in the background, in order, errors never lost."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dicom_assets.lake import intents
from dicom_assets.lake.intents import PlanBatch, PlanRunner


class Boom(Exception):
    pass


def _recording(monkeypatch: pytest.MonkeyPatch, gate: threading.Event | None = None, fail_on: int | None = None) -> list[Any]:
    log: list[Any] = []

    def run_plan(run: Any, steps: list[dict[str, Any]], **extra: Any) -> None:
        n = steps[0]["n"]
        log.append(("start", n, threading.current_thread() is threading.main_thread()))
        if gate is not None:
            assert gate.wait(10)
        if n == fail_on:
            raise Boom(n)
        log.append(("end", n))

    monkeypatch.setattr(intents, "run_plan", run_plan)
    return log


def _batch(n: int) -> PlanBatch:
    b = PlanBatch()
    b.add({"n": n})
    return b


def test_a_flushed_plan_runs_in_the_background_and_plans_keep_their_order(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    log = _recording(monkeypatch, gate)
    with PlanRunner() as runner:
        _batch(1).flush(None, runner)  # type: ignore[arg-type]
        # The caller is back while plan 1 still waits: it can read the next batch meanwhile.
        assert log in ([], [("start", 1, False)])
        gate.set()
        _batch(2).flush(None, runner)  # type: ignore[arg-type]
        _batch(3).flush(None, runner)  # type: ignore[arg-type]
    # Leaving the block waited for the last plan.
    assert log == [("start", 1, False), ("end", 1), ("start", 2, False), ("end", 2), ("start", 3, False), ("end", 3)]


def test_without_a_runner_the_plan_runs_in_the_callers_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    log = _recording(monkeypatch)
    _batch(1).flush(None)  # type: ignore[arg-type]
    assert log == [("start", 1, True), ("end", 1)]


def test_a_failed_plan_stops_the_next_one_and_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    log = _recording(monkeypatch, fail_on=1)
    with pytest.raises(Boom), PlanRunner() as runner:
        _batch(1).flush(None, runner)  # type: ignore[arg-type]
        _batch(2).flush(None, runner)  # type: ignore[arg-type]
    assert log == [("start", 1, False)]
    with pytest.raises(Boom), PlanRunner() as runner:  # the last plan's error, raised on leaving
        _batch(1).flush(None, runner)  # type: ignore[arg-type]


def test_an_error_in_the_block_is_not_hidden_by_a_plan_error(monkeypatch: pytest.MonkeyPatch) -> None:
    log = _recording(monkeypatch, fail_on=1)
    with pytest.raises(KeyError), PlanRunner() as runner:
        _batch(1).flush(None, runner)  # type: ignore[arg-type]
        raise KeyError("reading the next batch failed")
    assert log == [("start", 1, False)]


def test_leaving_on_an_error_still_waits_for_the_running_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller holds the organise lock until its last plan is done, even when it fails."""
    gate = threading.Event()
    log = _recording(monkeypatch, gate)
    threading.Timer(0.3, gate.set).start()
    with pytest.raises(KeyError), PlanRunner() as runner:
        _batch(1).flush(None, runner)  # type: ignore[arg-type]
        raise KeyError("reading the next batch failed")
    assert log == [("start", 1, False), ("end", 1)]
