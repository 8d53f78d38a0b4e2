"""OMOP rows for real files: one file per modality of the shared corpus, read with plain pydicom.

Expected values: UIDs and Modality from MANIFEST.tsv; the date from pydicom's SeriesDate, else
StudyDate (MI-CDM: image_occurrence_date from Series Date (0008,0021)). Skips without the corpus.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pydicom

from dicom_assets.omop.concepts import ConceptResolver
from dicom_assets.omop.idmap import IdLookup, assign_ids
from dicom_assets.omop.mapping import image_occurrence_rows, keys_for_study
from dicom_assets_tests.conftest import corpus_or_skip, read_manifest
from dicom_assets_tests.core.test_omop_concepts import BODY_PART_MAP, MODALITY_MAP


def _da(value: Any) -> str | None:
    text = str(value or "").strip()
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else (text or None)


def _sample() -> list[dict[str, str]]:
    corpus = corpus_or_skip()
    picked: dict[str, dict[str, str]] = {}
    for row in read_manifest(corpus):
        # "archive.zip!member" rows live inside ZIPs; plain files are enough here.
        if row["valid_dicom"] == "yes" and "!" not in row["path"] and row["modality"] and row["modality"] not in picked:
            picked[row["modality"]] = row
    return sorted(picked.values(), key=lambda r: r["modality"])


def test_one_series_per_modality_matches_the_manifest() -> None:
    corpus = corpus_or_skip()
    resolver = ConceptResolver.from_settings(str(MODALITY_MAP), str(BODY_PART_MAP))
    checked = 0
    for row in _sample():
        path = corpus / row["path"]
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        instance = {
            "patientId": str(ds.get("PatientID", "") or ""),
            "issuerOfPatientId": str(ds.get("IssuerOfPatientID", "") or ""),
            "studyDate": _da(ds.get("StudyDate")),
            "seriesDate": _da(ds.get("SeriesDate")),
            "modality": str(ds.get("Modality", "") or ""),
            "bodyPartExamined": str(ds.get("BodyPartExamined", "") or "") or None,
            "msftFilePath": str(path),
            "msftSourceSystem": "corpus",
        }
        expected = next((d for d in (instance["seriesDate"], instance["studyDate"]) if d and _iso(d)), None)
        if expected is None:
            continue  # a file without any date cannot yield an image_occurrence (checked in test_omop_mapping)
        uid = row["series_instance_uid"]
        study = {"id": "x", "studyInstanceUid": row["study_instance_uid"], "msftSourceSystem": "corpus",
                 "series": [{"uid": uid, "modality": {"code": instance["modality"]}, "bodySite": None}]}  # fmt: skip
        instances: dict[str, list[dict[str, Any]]] = defaultdict(list)
        instances[uid].append(instance)
        keys = keys_for_study(study, instances)
        ids = IdLookup(assign_ids({}, keys.image_occurrence.values()), assign_ids({}, [keys.person]),
                       assign_ids({}, [keys.procedure_occurrence]))  # fmt: skip
        [out] = image_occurrence_rows(study, instances, ids=ids, concepts=resolver, dicomweb_base_url="",
                                      lake_root=str(corpus), modified=datetime.now(UTC))  # fmt: skip
        assert out["image_study_uid"] == row["study_instance_uid"]
        assert out["image_series_uid"] == uid
        assert out["modality_source_value"] == row["modality"]
        assert out["image_occurrence_date"] == _iso(expected)
        assert out["local_path"] == str(Path(path).parent)
        checked += 1
    assert checked >= 5


def _iso(value: str) -> date | None:
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None
