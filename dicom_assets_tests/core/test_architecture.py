"""The functional core never imports the orchestration shell (DEVELOPERS.md architecture)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dicom_assets"
PURE = ["dicom", "fhir", "omop", "lake", "steps", "columnar.py", "config.py", "sample.py", "sample_plan.py", "sample_render.py", "sample_catalog.py", "sql.py"]
FORBIDDEN = {"dagster", "dagster_pyspark", "pyspark"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files() -> list[Path]:
    out: list[Path] = []
    for item in PURE:
        p = PKG / item
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else [])
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_pure_modules_do_not_import_dagster_or_spark(path: Path) -> None:
    bad = _imports(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


def test_pure_packages_exist() -> None:
    assert len(_files()) >= 10
