"""A pool helper starts without pandas, requests and tqdm, and reads exactly what the calling process reads.

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
from dicom_assets.engines.helper import SKIPPED_IMPORTS, imports_skipped, init_worker
from dicom_assets.engines.helper_pool import HelperPool
from dicom_assets_tests.core.test_dicom_extract_batch import NOW, task

# The files bundled inside pydicom only: get_testdata_files would try to download more.
FILES = sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def test_a_skipped_import_fails_inside_the_block_and_works_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    with imports_skipped(["colorsys", "json"]):
        with pytest.raises(ModuleNotFoundError, match="colorsys"):
            import colorsys  # noqa: F401
        import json  # imported before the block: still there

        assert json.dumps(1) == "1"
    import colorsys

    assert colorsys.rgb_to_hsv(0, 0, 0) == (0.0, 0.0, 0.0)


def _in_helper(paths: list[str]) -> dict[str, Any]:
    """Runs in the helper: extract a batch, note which optional modules it holds, then use pandas anyway."""
    rows, fails = extract_batch_arrow([task(Path(p)) for p in paths], now=NOW)
    held = {name: name in sys.modules for name in SKIPPED_IMPORTS}
    import pandas as pd
    import pyarrow as pa

    frame = pa.table({"n": [1, 2]}).to_pandas()
    from_series = pa.array(pd.Series([3, 4])).to_pylist()
    return {"rows": rows.to_pylist(), "fails": fails.to_pylist(), "held": held, "frame": frame["n"].tolist(), "series": from_series}


def test_a_helper_reads_without_the_skipped_imports_and_they_still_import_after() -> None:
    assert len(FILES) > 50
    with HelperPool(1, init_worker) as pool:
        pool.submit(_in_helper, [str(p) for p in FILES])
        (got,) = pool.collect(block=True)
    assert got["held"] == {"pandas": False, "requests": False, "tqdm": False}
    assert got["frame"] == [1, 2] and got["series"] == [3, 4]
    rows, fails = extract_batch_arrow([task(p) for p in FILES], now=NOW)
    assert got["rows"] == rows.to_pylist() and got["fails"] == fails.to_pylist()
    assert len(got["rows"]) > 50
