"""Shared fixtures: the real corpus (skip when absent) and temporary lakes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Tests never touch the user's instance under data/dagster_home: runs go to an
# ephemeral instance unless a test sets up its own temporary DAGSTER_HOME.
os.environ.pop("DAGSTER_HOME", None)

CORPUS = Path(os.environ.get("DICOM_ASSETS_CORPUS", PROJECT_ROOT.parent / "shared" / "dicom-corpus"))


def corpus_or_skip() -> Path:
    if not (CORPUS / "MANIFEST.tsv").exists():
        pytest.skip(f"shared DICOM corpus not found at {CORPUS}")
    return CORPUS


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / "MANIFEST.tsv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture
def corpus() -> Path:
    return corpus_or_skip()


@pytest.fixture
def manifest(corpus: Path) -> list[dict[str, str]]:
    return read_manifest(corpus)
