"""The local engine starts its helper pool only when the work pays for it."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import dicom_assets.engines.batch as batch
import dicom_assets.engines.local as local
from dicom_assets.config import Settings
from dicom_assets.dicom.task_table import TaskTable
from dicom_assets_tests.core.test_dicom_extract_batch import dicom_bytes, task

NOW = datetime(2024, 5, 6, tzinfo=UTC)


class PoolStarted(Exception):
    pass


def _no_pool(*_a: Any, **_k: Any) -> None:
    raise PoolStarted


def _tasks(tmp_path: Path, n: int) -> list[Any]:
    out = []
    for i in range(n):
        f = tmp_path / f"f{i}.dcm"
        f.write_bytes(dicom_bytes(sop=f"1.2.3.4.{i}"))
        out.append(task(f))
    return out


def test_a_small_day_is_read_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "HelperPool", _no_pool)
    (tmp_path / "table").mkdir()
    tasks = _tasks(tmp_path, 5)
    settings = Settings(workers=2, batch_size=2)
    with local.helper_pool(tasks, settings) as pool:
        assert pool is None and local.helpers_needed(tasks, settings) == 0
        results = list(local.iter_batches(tasks, settings, NOW, str(tmp_path / "table"), pool))
    assert len(results) == 3 and sum(rows for _add, _fails, rows in results) == 5


@pytest.mark.parametrize("settings", [Settings(workers=2, batch_size=2, worker_memory_bytes=8 << 30), Settings(workers=2, batch_size=64)])
def test_a_memory_cap_or_a_big_day_starts_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setattr(local, "HelperPool", _no_pool)
    n = 5 if settings.worker_memory_bytes else local.INLINE_MAX_FILES + 1
    tasks = [task(tmp_path / f"absent{i}.dcm") for i in range(n)]
    assert local.helpers_needed(tasks, settings) == (2 if settings.worker_memory_bytes else 1)
    with pytest.raises(PoolStarted), local.helper_pool(tasks, settings):
        pass


def test_with_two_workers_this_process_reads_beside_one_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller is one of the workers: it reads batches while the spawned helper reads the others."""
    here = {"batches": 0}
    real = batch.extract_batch_arrow

    def counted(*a: Any, **k: Any) -> Any:  # patched in this process only; the helper runs the real one
        here["batches"] += 1
        return real(*a, **k)

    monkeypatch.setattr(batch, "extract_batch_arrow", counted)
    (tmp_path / "table").mkdir()
    tasks = _tasks(tmp_path, local.INLINE_MAX_FILES + 1)
    settings = Settings(workers=2, batch_size=64)
    with local.helper_pool(tasks, settings) as pool:
        assert pool is not None and pool.size == 1
        results = list(local.iter_batches(tasks, settings, NOW, str(tmp_path / "table"), pool))
    assert sum(rows for _add, _fails, rows in results) == len(tasks)
    assert 1 <= here["batches"] < len(results)


def _compressed_tasks(tmp_path: Path, n: int) -> list[Any]:
    out = []
    for i in range(n):
        f = tmp_path / f"c{i}.dcm"
        f.write_bytes(dicom_bytes(sop=f"1.2.3.5.{i}"))
        out.append(task(f, compress=True))
    return out


@pytest.mark.parametrize("n", [5, local.INLINE_MAX_FILES + 1], ids=["in-process", "with-a-helper"])
def test_batches_done_means_every_compressed_original_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Originals are unlinked in the background of each process; the last batch out waits for all of them."""
    from dicom_assets.dicom import compress
    from dicom_assets_tests.core.slow_removal import delayed, slow_down_removals

    (tmp_path / "table").mkdir()
    tasks = _compressed_tasks(tmp_path, n)
    settings = Settings(workers=2, batch_size=64 if n > 5 else 2)
    with local.helper_pool(tasks, settings) as pool:
        if pool is None:
            monkeypatch.setattr(compress, "_remove_originals", delayed(compress._remove_originals, 0.5))
        else:  # only the helper's removals are slow: this process's own wait is no help
            pool.call_each(slow_down_removals, 0.5)
        results = list(local.iter_batches(tasks, settings, NOW, str(tmp_path / "table"), pool))
        assert sum(rows for _add, _fails, rows in results) == n
        left = [t.path for t in tasks if Path(t.path).exists()]
        assert left == [] and all(Path(t.file_path).exists() for t in tasks)


def test_an_abandoned_run_still_waits_for_its_removals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No removal is left behind for a later run of the process to wait for (or to report)."""
    from dicom_assets.dicom import compress
    from dicom_assets_tests.core.slow_removal import delayed

    monkeypatch.setattr(compress, "_remove_originals", delayed(compress._remove_originals, 0.5))
    (tmp_path / "table").mkdir()
    tasks = _compressed_tasks(tmp_path, 4)
    run = local.iter_batches(tasks, Settings(workers=1, batch_size=2), NOW, str(tmp_path / "table"))
    next(run)
    run.close()  # the consumer gives up after one batch (an error elsewhere)
    assert [Path(t.path).exists() for t in tasks] == [False, False, True, True]
    assert not compress._removals


class _Recorded(TaskTable):
    """A TaskTable that records which slices the engine takes."""

    def __init__(self, tasks: list[Any]) -> None:
        super().__init__(TaskTable.from_tasks(tasks).table)
        self.taken: list[tuple[int, int]] = []

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            self.taken.append((index.start, index.stop))
        return super().__getitem__(index)


@pytest.mark.parametrize("n", [5, local.INLINE_MAX_FILES + 1], ids=["in-process", "with-a-helper"])
def test_the_engine_takes_each_batch_of_a_task_table_once_as_it_reads(tmp_path: Path, n: int) -> None:
    """Tasks held as columns are made into objects one batch at a time, every file exactly once."""
    (tmp_path / "table").mkdir()
    tasks = _Recorded(_tasks(tmp_path, n))
    settings = Settings(workers=2, batch_size=64 if n > 5 else 2)
    with local.helper_pool(tasks, settings) as pool:
        results = list(local.iter_batches(tasks, settings, NOW, str(tmp_path / "table"), pool))
    assert sum(rows for _add, _fails, rows in results) == n
    covered = tasks.taken
    assert covered == sorted(covered)  # in the order of the day
    assert covered[0][0] == 0 and covered[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    assert all(0 < stop - start <= settings.batch_size for start, stop in covered)
    assert len(results) == len(covered)


def test_the_tail_is_cut_into_smaller_batches_covering_the_same_files() -> None:
    groups = deque([(0, 64), (64, 128), (128, 192), (192, 200)])
    split = local._split_tail(groups, 2, 16)
    assert list(split) == [(0, 64), (64, 128), (128, 144), (144, 160), (160, 176), (176, 192), (192, 200)]
    assert list(local._split_tail(deque(), 3, 16)) == [] and list(local._split_tail(deque([(0, 5)]), 3, 2)) == [(0, 2), (2, 4), (4, 5)]
