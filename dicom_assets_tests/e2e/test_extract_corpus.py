"""The extractor on the shared real-world corpus: validity, identity and every tag.

MANIFEST.tsv (written with plain pydicom, not with this code) says for each
file and ZIP member whether it is a readable DICOM instance and what its UIDs,
modality, transfer syntax and frame count are. The extractor must agree on
every row, refuse invalid files for the reason the manifest notes give, and
produce a JSON model whose every element equals pydicom's value.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import pydicom
import pytest

from dicom_assets.dicom.extract import extract_batch_arrow, extract_dataset
from dicom_assets.dicom.records import DicomReadError, ExtractTask
from dicom_assets.dicom.walker import walk
from dicom_assets.lake.schemas import FAILURES_SCHEMA, METASTORE_SCHEMA
from dicom_assets_tests.core.test_dicom_reader import assert_same_as_pydicom


def read_row_bytes(corpus: Path, path: str) -> bytes:
    """A loose file's bytes, or a ZIP member's (``archive.zip!member``) read with zipfile."""
    if "!" in path:
        archive, member = path.split("!", 1)
        with zipfile.ZipFile(corpus / archive) as zf:
            return zf.read(member)
    return (corpus / path).read_bytes()


def expected_error_class(notes: str) -> str:
    """The reason the manifest's notes give for an invalid row, as our error class."""
    n = notes.lower()
    if "truncated" in n:
        return "Truncated"
    if "missing sopclassuid" in n or "missing sopinstanceuid" in n:
        return "MissingUid"
    return "NotDicom"


def test_validity_and_identity_agree_with_the_manifest(corpus: Path, manifest: list[dict[str, str]]) -> None:
    assert len(manifest) >= 1000
    mismatches: list[str] = []
    for rec in manifest:
        path = rec["path"]
        try:
            data = read_row_bytes(corpus, path)
        except (zipfile.BadZipFile, OSError, Exception) as exc:  # noqa: BLE001 - an unreadable member is invalid
            if rec["valid_dicom"] != "no":
                mismatches.append(f"{path}: unreadable ({type(exc).__name__}) but manifest says valid")
            continue
        try:
            row = extract_dataset(data, bulk_data_uri=path)
        except DicomReadError as err:
            if rec["valid_dicom"] != "no":
                mismatches.append(f"{path}: refused ({err}) but manifest says valid")
            elif err.error_class != expected_error_class(rec["notes"]):
                mismatches.append(f"{path}: {err.error_class}, manifest notes say {expected_error_class(rec['notes'])}")
            continue
        if rec["valid_dicom"] != "yes":
            mismatches.append(f"{path}: read but manifest says invalid")
            continue
        expected = {
            "studyInstanceUid": rec["study_instance_uid"] or None,
            "seriesInstanceUid": rec["series_instance_uid"] or None,
            "sopInstanceUid": rec["sop_instance_uid"],
            "modality": rec["modality"] or None,
            "transferSyntaxUid": rec["transfer_syntax_uid"] or None,
            "numberOfFrames": int(rec["number_of_frames"]),
        }
        got = {k: row[k] for k in expected}
        if got != expected:
            mismatches.append(f"{path}: {got} != {expected}")
    assert not mismatches, "\n".join(mismatches)


def test_every_element_of_every_valid_file_equals_pydicom(corpus: Path, manifest: list[dict[str, str]]) -> None:
    checked = 0
    for rec in manifest:
        if rec["valid_dicom"] != "yes":
            continue
        data = read_row_bytes(corpus, rec["path"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            model = walk(data, bulk_data_uri=rec["path"]).model()
            meta = {k: v for k, v in model.items() if k.startswith("0002")}
            dataset = {k: v for k, v in model.items() if not k.startswith("0002")}
            try:
                assert_same_as_pydicom(dataset, ds, label=f"{rec['path']}#")
                assert_same_as_pydicom(meta, ds.file_meta, label=f"{rec['path']}#")
            except ValueError:
                # pydicom itself cannot give a value (e.g. IS "1A" in badVR.dcm): we keep the raw text.
                assert rec["path"].endswith("badVR.dcm")
                assert dataset["00280008"]["Value"] == ["1A"]
        checked += 1
    assert checked >= 970


def test_batch_over_all_loose_files_accounts_for_every_file(corpus: Path, manifest: list[dict[str, str]]) -> None:
    loose = [r for r in manifest if "!" not in r["path"]]
    tasks = [
        ExtractTask(
            path=str(corpus / r["path"]),
            file_path=str(corpus / r["path"]),  # compression off: the corpus is read-only
            original_path=r["path"],
            source_system="corpus",
            ingest_date="2024/01/01",
            source_modified_at=0.0,
        )
        for r in loose
    ]
    rows, failures = extract_batch_arrow(tasks)
    assert rows.schema == METASTORE_SCHEMA and failures.schema == FAILURES_SCHEMA
    assert rows.num_rows + failures.num_rows == len(loose)
    assert rows.num_rows == sum(r["valid_dicom"] == "yes" for r in loose)
    for text in rows.column("metadata_string").to_pylist():
        model = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert list(model) == sorted(model)
        # No multi-megabyte base64: pixel data and large binaries are references.
        assert len(text) < 4_000_000
        if "7FE00010" in model:
            assert "BulkDataURI" in model["7FE00010"] and "InlineBinary" not in model["7FE00010"]
