"""Silver's choice among a day's rows of one instance: the newest by NEWER_ORDER, in instance key order."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from dicom_assets.lake.schemas import METASTORE_SCHEMA
from dicom_assets.steps.silver import pick_latest

T1, T2 = datetime(2024, 5, 1, 8, tzinfo=UTC), datetime(2024, 5, 1, 9, tzinfo=UTC)


def _row(study: str, series: str | None, sop: str, when: datetime, sha: str, original: str, name: str) -> dict[str, object]:
    return {
        "sourceSystem": "ns", "studyInstanceUid": study, "seriesInstanceUid": series, "sopInstanceUid": sop,
        "sourceModifiedAt": when, "contentSha256": sha, "originalPath": original, "filePath": name,
    }


def test_one_row_per_instance_the_newest_then_the_larger_hash_then_the_smaller_path_in_key_order() -> None:
    rows = pa.Table.from_pylist(
        [
            _row("1.3", None, "1.3.1", T1, "aa", "/o/d", "d"),  # no series: sorts after every series
            _row("1.2.1", "1.2.1.9", "1.2.1.1", T1, "aa", "/o/a-old", "a-old"),
            _row("1.2.0", "1.2.0.9", "1.2.0.2", T1, "cc", "/o/z", "c-z"),
            _row("1.2.1", "1.2.1.9", "1.2.1.1", T2, "00", "/o/a-new", "a-new"),  # later: wins over a larger hash
            _row("1.2.0", "1.2.0.9", "1.2.0.1", T1, "ee", "/o/b", "b-ee"),
            _row("1.2.0", "1.2.0.9", "1.2.0.2", T1, "cc", "/o/y", "c-y"),  # same bytes and time: smaller path
            _row("1.2.0", "1.2.0.9", "1.2.0.1", T1, "ff", "/o/b", "b-ff"),  # same time: larger hash
        ],
        schema=METASTORE_SCHEMA,
    )
    assert pick_latest(rows).column("filePath").to_pylist() == ["b-ff", "c-y", "a-new", "d"]
    assert pick_latest(rows.slice(0, 0)).num_rows == 0
