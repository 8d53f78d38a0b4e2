"""A pool helper runs without numpy, pandas, requests and tqdm, and reads exactly what the calling process reads.

This module is imported inside the helper (it holds the function the helper
runs), so it must not import any of them itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pydicom.data
import pytest

from dicom_assets.dicom.extract import extract_batch_arrow
from dicom_assets.engines.helper import HELPER_WITHOUT, block_imports, init_worker
from dicom_assets.engines.helper_pool import HelperPool
from dicom_assets_tests.core.test_dicom_extract_batch import NOW, task

# The files bundled inside pydicom only: get_testdata_files would try to download more.
FILES = sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def test_a_blocked_import_fails_with_a_clear_error_until_the_finder_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    finder = block_imports(["colorsys", "json"])
    try:
        with pytest.raises(ModuleNotFoundError, match="'colorsys' in a local-engine pool helper"):
            import colorsys  # noqa: F401
        import json  # imported before: still there

        assert json.dumps(1) == "1"
    finally:
        sys.meta_path.remove(finder)
    import colorsys

    assert colorsys.rgb_to_hsv(0, 0, 0) == (0.0, 0.0, 0.0)


def _in_helper(paths: list[str]) -> dict[str, Any]:
    """Runs in the helper: extract a batch, note which optional modules it holds, then try to use pandas."""
    rows, fails = extract_batch_arrow([task(Path(p)) for p in paths], now=NOW)
    held = {name: name in sys.modules for name in HELPER_WITHOUT}
    import pyarrow as pa

    try:
        pa.table({"n": [1, 2]}).to_pandas()
        pandas = "imported"
    except ModuleNotFoundError as exc:
        pandas = str(exc)
    return {"rows": rows.to_pylist(), "fails": fails.to_pylist(), "held": held, "pandas": pandas}


def test_a_helper_reads_without_the_skipped_imports_and_they_still_import_after() -> None:
    assert len(FILES) > 50
    with HelperPool(1, init_worker) as pool:
        pool.submit(_in_helper, [str(p) for p in FILES])
        (got,) = pool.collect(block=True)
    assert got["held"] == {"numpy": False, "pandas": False, "requests": False, "tqdm": False}
    # An error, not the crash of a pyarrow imported without numpy meeting it later.
    assert "No module named 'pandas' in a local-engine pool helper" in got["pandas"]
    rows, fails = extract_batch_arrow([task(p) for p in FILES], now=NOW)
    assert got["rows"] == rows.to_pylist() and got["fails"] == fails.to_pylist()
    assert len(got["rows"]) > 50
