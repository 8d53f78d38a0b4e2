"""Materialization metadata: counts, schema and a PHI-masked preview (SPEC §4, §6)."""


from typing import Any

import dagster as dg
import pyarrow as pa

from dicom_assets.lake.schemas import PHI_COLUMNS

PREVIEW_ROWS = 5
MASK = "***"


def table_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in schema])


def masked_preview(table: pa.Table, *, rows: int = PREVIEW_ROWS, max_columns: int = 12) -> str:
    """A small Markdown preview with PHI columns masked and long values cut."""
    if table.num_rows == 0:
        return "(no rows)"
    cols = [c for c in table.column_names if not c.endswith("_string")][:max_columns]
    head = table.slice(0, rows).select(cols).to_pylist()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in head:
        lines.append("| " + " | ".join(_cell(c, r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _cell(col: str, value: Any) -> str:
    if col in PHI_COLUMNS and value not in (None, ""):
        return MASK
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def table_metadata(schema: pa.Schema, preview: pa.Table | None = None, **counts: Any) -> dict[str, Any]:
    md: dict[str, Any] = {"dagster/column_schema": table_schema(schema)}
    for k, v in counts.items():
        md[k] = v
    if preview is not None:
        md["preview"] = dg.MetadataValue.md(masked_preview(preview))
    return md
