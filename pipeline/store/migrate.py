"""Copy a whole store into another one (`poolwatch store migrate --to postgresql://...`): every table, ids kept,
paths re-encoded for the target's dialect, in one transaction of the target, from one snapshot of the source."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .core import Store, _dec
from .records import StoreError
from .schema import TABLES

PATH_COLUMNS = ("root", "relpath")
LATER_COLUMNS = ("duplicate_of", "near_duplicate_of")  # images -> images: set once every image is there
IDENTITY_TABLES = ("images", "models", "runs")


def copy_store(source: Store, target: Store, chunk: int = 5000) -> dict[str, int]:
    """Copy every row of `source` into the empty `target`; returns rows copied per table."""
    if source.schema_version != target.schema_version:
        raise StoreError(f"the stores have schemas {source.schema_version} and {target.schema_version}; "
                         "run the same poolwatch on both")
    if not target.is_empty():
        raise StoreError(f"the target store {target.path} is not empty; migrate into a new, empty database")
    counts: dict[str, int] = {}
    with target.transaction():
        target.b.execute("DELETE FROM settings")  # a new store's own bookkeeping; the source's replaces it
        for table in TABLES:
            counts[table] = 0
            for names, rows in source.table_rows(table, chunk):
                columns = list(names)
                values = [_convert(target, columns, row) for row in rows]
                if table == "images":
                    later = [columns.index(c) for c in LATER_COLUMNS]
                    values = [[None if i in later else v for i, v in enumerate(row)] for row in values]
                marks = ",".join("?" * len(columns))
                target.b.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", values)
                counts[table] += len(values)
        for names, rows in source.table_rows("images", chunk):
            at = {c: names.index(c) for c in ("id", *LATER_COLUMNS)}
            links = [(row[at["duplicate_of"]], row[at["near_duplicate_of"]], row[at["id"]]) for row in rows
                     if row[at["duplicate_of"]] is not None or row[at["near_duplicate_of"]] is not None]
            target.b.executemany("UPDATE images SET duplicate_of = ?, near_duplicate_of = ? WHERE id = ?", links)
        if target.dialect == "postgresql":
            for table in IDENTITY_TABLES:  # new rows continue after the copied ids
                target.b.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                                 f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")
    return counts


def _convert(target: Store, columns: Sequence[str], row: Sequence[Any]) -> list[Any]:
    out = list(row)
    for i, name in enumerate(columns):
        value = out[i]
        if name in PATH_COLUMNS and value is not None:
            out[i] = target.b.path(_dec(value))
        elif isinstance(value, memoryview):
            out[i] = value.tobytes()
    return out
