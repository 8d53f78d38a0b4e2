"""Update rows with known keys by rewriting only the data files that hold them.

delta-rs's ``MERGE`` finds the target rows of a source by scanning every data
file whose statistics do not rule the keys out. The silver metastore is
appended a chunk at a time, each chunk sorted but spanning the whole UID
range, so the statistics of nearly every file cover any study: one study
delivered again on a 100,000-instance lake made the merge read the whole
table (769 MB) to update 100 rows.

:func:`update_matched` does the same update as that ``MERGE`` (a matched row
is replaced when a :class:`Rule` says the source row wins, some target
columns kept) but finds the rows with the key lookup of :mod:`~dicom_assets.lake.rowgroups`
(file statistics, then footers, then the key and rule columns of candidate
row groups), rewrites only the files where a row really changes, and commits
their ``remove`` and the rewritten files' ``add`` actions in one Delta
transaction. A file whose matched rows all win already (the same study
delivered again unchanged) is not touched at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake.transaction import AddAction, CommitProperties, RemoveAction

from dicom_assets.lake import delta, delta_commit, delta_read, parts, rowgroups, snapshots
from dicom_assets.lake.fileops import crash_point
from dicom_assets.lake.schemas import conform

#: Columns and directions (``"descending"``: the larger value wins) compared in
#: turn; the first column where two rows differ decides.
Order = Sequence[tuple[str, str]]


def sql_wins(order: Order, source: str = "s", target: str = "t") -> str:
    """The SQL predicate "the ``source`` row wins over the ``target`` row by ``order``" (for a ``MERGE``).

    ``(s.a > t.a) OR (s.a = t.a AND s.b > t.b) OR ...``; a NULL on either side
    makes its term unknown, so a row with NULLs in the order never wins there.
    """
    terms = []
    for i, (col, direction) in enumerate(order):
        op = ">" if direction == "descending" else "<"
        same = [f"{source}.{c} = {target}.{c}" for c, _ in order[:i]]
        terms.append("(" + " AND ".join([*same, f"{source}.{col} {op} {target}.{col}"]) + ")")
    return " OR ".join(terms)


def wins(order: Order, source: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    """Whether ``source`` wins over ``target`` by ``order``, exactly as :func:`sql_wins` decides in SQL."""
    for col, direction in order:
        a, b = source[col], target[col]
        if a is None or b is None:
            return False  # every later term needs this column equal, which NULL never is
        if a != b:
            return bool(a > b) if direction == "descending" else bool(a < b)
    return False


@dataclass(frozen=True)
class Rule:
    """When a source row replaces the table row with its key: ``wins(source, target)``, which reads ``columns``.

    It must decide as the ``MERGE`` predicate it stands for would, NULLs
    included (a comparison with NULL is never true).
    """

    columns: tuple[str, ...]
    wins: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


def by_order(order: Order) -> Rule:
    """The :class:`Rule` "the source row wins by ``order``" (:func:`wins`; in SQL, :func:`sql_wins`)."""
    return Rule(tuple(c for c, _ in order), partial(wins, order))


def _key_rows(t: pa.Table, keys: Sequence[str]) -> list[tuple[Any, ...]]:
    return list(zip(*(t.column(k).to_pylist() for k in keys), strict=True))


def update_matched(
    uri: str | Path,
    schema: pa.Schema,
    source: pa.Table,
    keys: Sequence[str],
    *,
    rule: Rule,
    keep: Sequence[str] = (),
    sort_by: Sequence[str] = (),
    row_group_rows: int | None = None,
) -> int:
    """Replace each table row whose ``keys`` a ``source`` row has, when ``rule`` says that source row wins.

    ``keep`` columns keep the table's value (e.g. ``msftCreatedDatetime``).
    Source keys must be unique; keys the table does not hold are ignored
    (append them separately). Rewritten files are sorted by ``sort_by`` and cut
    into row groups of ``row_group_rows``, as appends are. Returns the number
    of rows replaced. A commit that loses a race is planned again on the new
    version; the caller holds the lake lock that keeps other writers of these
    keys out.
    """
    source = conform(source, schema)
    if source.num_rows == 0:
        return 0
    src_keys = _key_rows(source, keys)
    index = {k: i for i, k in enumerate(src_keys)}
    if len(index) != len(src_keys):
        raise ValueError("update_matched: source keys are not unique")
    src_rule = source.select(list(rule.columns)).to_pylist()
    first = sorted({k[0] for k in src_keys if k[0] is not None})
    lookup = {keys[0]: pa.array(first, schema.field(keys[0]).type)}
    ordered = rowgroups.sorted_values(lookup)
    folder = delta_commit.table_dir(uri)
    label = delta.table_label(folder)

    def attempt() -> int:
        dt = snapshots.latest(str(uri))
        delta_commit.check_table(dt, schema)
        by_name = delta.files_by_name(dt)
        prune = f"`{keys[0]}` IN ({', '.join(delta_read.sql_literal(v) for v in first)})"
        written: list[AddAction] = []
        removes: list[RemoveAction] = []
        replaced = 0
        now_ms = int(time.time() * 1000)
        try:
            for f in dt.file_uris(file_pruning_predicate=prune):
                if not _holds_winner(f, schema, keys, rule, index, src_rule, lookup, ordered):
                    continue
                whole = pq.ParquetFile(f, metadata=rowgroups.footer(f)).read()
                new, n = _rewritten(conform(whole, schema), source, keys, rule, index, src_rule, keep)
                if sort_by:
                    new = new.sort_by([(c, "ascending") for c in sort_by])
                written.append(delta_commit.add_action_from_record(parts.write_part_file(folder, new, row_group_rows=row_group_rows)))
                rel, size = by_name[os.path.basename(unquote(f))]
                removes.append(delta_commit.remove_action(rel, size, now_ms))
                replaced += n
            if removes:
                crash_point(f"delta:before_commit:{label}")
                dt.create_write_transaction(
                    [*written, *removes], mode="append", schema=schema,
                    commit_properties=CommitProperties(custom_metadata={"dicomAssetsOperation": "update_matched"}),
                )
        except BaseException:
            delta_commit.discard(uri, written)
            raise
        return replaced

    out = delta.with_commit_retry(attempt)
    crash_point(f"delta:after_commit:{label}")
    return out


def _holds_winner(
    path: str, schema: pa.Schema, keys: Sequence[str], rule: Rule, index: Mapping[tuple[Any, ...], int],
    src_rule: Sequence[Mapping[str, Any]], lookup: Mapping[str, pa.Array], ordered: Mapping[str, Sequence[Any]],
) -> bool:
    """Whether data file ``path`` has a row that a source row replaces.

    The key lookup of :func:`rowgroups.matching_rows` reads the first key
    column of the candidate row groups, and the other keys and the rule's
    columns (a resource's JSON) only of the row groups holding a wanted value.
    """
    cols = list(dict.fromkeys([*keys, *rule.columns]))
    probe = rowgroups.matching_rows(path, lookup, schema, pa.schema([schema.field(c) for c in cols]), ordered)
    if probe is None:
        return False
    for k, row in zip(_key_rows(probe, keys), probe.select(list(rule.columns)).to_pylist(), strict=True):
        i = index.get(k)
        if i is not None and rule.wins(src_rule[i], row):
            return True
    return False


def _rewritten(
    table: pa.Table, source: pa.Table, keys: Sequence[str], rule: Rule, index: Mapping[tuple[Any, ...], int],
    src_rule: Sequence[Mapping[str, Any]], keep: Sequence[str],
) -> tuple[pa.Table, int]:
    """``table`` with the rows a source row wins over replaced by that row (``keep`` columns kept); and how many."""
    target_rule = table.select(list(rule.columns)).to_pylist()
    taken_from: list[int] = []
    replaced_at: list[int] = []
    for j, k in enumerate(_key_rows(table, keys)):
        i = index.get(k)
        if i is not None and rule.wins(src_rule[i], target_rule[j]):
            taken_from.append(i)
            replaced_at.append(j)
    kept = [True] * table.num_rows
    for j in replaced_at:
        kept[j] = False
    new_rows = source.take(pa.array(taken_from, pa.int64()))
    olds = pa.array(replaced_at, pa.int64())
    for col in keep:
        new_rows = new_rows.set_column(new_rows.schema.get_field_index(col), table.schema.field(col), table.column(col).take(olds))
    return pa.concat_tables([table.filter(pa.array(kept, pa.bool_())), new_rows]), len(replaced_at)
