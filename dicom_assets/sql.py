"""``dicom-assets sql``: SQL over every Delta table of the lake, through delta-rs's DataFusion.

Tables are named ``<layer>.<table>`` as in Fabric's lakehouses
(``bronze.dicomimagingmetastore``, ``silver.ImagingStudy``, ``gold.image_occurrence``).
Spark SQL (Fabric) matches identifiers case-insensitively while DataFusion
folds unquoted ones to lower case, so known table and column names are
rewritten to their exact, quoted form before the query runs.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder

from dicom_assets.lake import delta
from dicom_assets.lake.paths import TABLES, LakePaths
from dicom_assets.lake.schemas import TABLE_SCHEMAS

_TOKEN = re.compile(r"""('(?:[^']|'')*')|("(?:[^"]|"")*")|([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)""")


def registered_name(layer: str, folder: str) -> str:
    return f"{layer}__{folder.lower()}"


def rewrite(query: str) -> str:
    """Map ``layer.Table`` to registered names and quote known mixed-case columns."""
    tables = {f"{layer}.{folder}".lower(): registered_name(layer, folder) for layer, folder in TABLES.values()}
    columns = {f.name.lower(): f.name for s in TABLE_SCHEMAS.values() for f in s if f.name != f.name.lower()}

    def sub(m: re.Match[str]) -> str:
        word = m.group(3)
        if word is None:
            return m.group(0)
        low = word.lower()
        if low in tables:
            return tables[low]
        if "." in word:
            alias, col = word.split(".", 1)
            return f'{alias}."{columns[col.lower()]}"' if col.lower() in columns else word
        return f'"{columns[low]}"' if low in columns else word

    return _TOKEN.sub(sub, query)


def run_query(lake: str, query: str) -> pa.Table:
    """Run ``query`` over every table that exists in ``lake``."""
    paths = LakePaths.of(lake)
    qb = QueryBuilder()
    for name, (layer, folder) in TABLES.items():
        uri = paths.table_uri(name)
        if delta.exists(uri):
            qb.register(registered_name(layer, folder), DeltaTable(uri))
    result = pa.table(qb.execute(rewrite(query)).read_all())
    # DataFusion returns view types; plain types print and serialise everywhere.
    return result.cast(pa.schema([pa.field(f.name, _plain(f.type)) for f in result.schema]))


def _plain(t: pa.DataType) -> pa.DataType:
    if t == pa.string_view():
        return pa.string()
    if t == pa.binary_view():
        return pa.binary()
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _plain(f.type)) for f in t])
    return t


def format_table(table: pa.Table, fmt: str = "table", *, max_width: int = 60) -> str:
    """Render as an aligned text table, CSV or JSON lines."""
    rows = table.to_pylist()
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(table.column_names)
        for r in rows:
            w.writerow([_text(v) for v in r.values()])
        return buf.getvalue().rstrip("\n")
    cells = [[_text(v, max_width) for v in r.values()] for r in rows]
    header = table.column_names
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _text(v: Any, max_width: int | None = None) -> str:
    if v is None:
        return ""
    s = v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)
    if max_width and len(s) > max_width:
        s = s[: max_width - 3] + "..."
    return s
