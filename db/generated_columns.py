"""SQLite's generated columns (``sa.Computed("price * 1.2")``) through Alembic and SQLAlchemy.

Batch mode changes a SQLite table by copying it, and a table with a generated column could
not be copied: the copy's ``INSERT ... SELECT`` wrote the generated column too, which SQLite
refuses ("cannot INSERT into generated column"), so every later change of that table failed
on dev while PostgreSQL, which alters in place, took it. And SQLAlchemy reads a generated
column's expression back empty where the column's type holds a comma (``NUMERIC(10, 2)``:
its pattern stops at the first comma), so the copy was made ``GENERATED ALWAYS AS ()``, a
syntax error, and autogenerate warned on every run that the expression could not change.

Here the copy leaves generated columns to SQLite, and the expression is read whole from
the table's SQL where SQLAlchemy missed it.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Table, event, text

if TYPE_CHECKING:
    from alembic.operations.batch import ApplyBatchImpl
    from sqlalchemy.engine import Inspector

# a table's SQL as tokens: a quoted name or string, a parenthesis, a comma, or other text
_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]|[(),]|[^'"`\[(),]+""")
_AS = re.compile(r"\bAS\s*$", re.IGNORECASE)


@functools.cache
def register() -> None:
    """Once per process: Alembic's SQLite operations copy tables without their generated
    columns' values, and every SQLite table reflected reads its expressions whole."""
    from alembic.ddl.sqlite import SQLiteImpl

    class CopiesGenerated(SQLiteImpl):  # Alembic's registry takes it for "sqlite"
        __dialect__ = "sqlite"

        def prep_table_for_batch(self, batch_impl: ApplyBatchImpl, table: Table) -> None:
            super().prep_table_for_batch(batch_impl, table)
            for name, column in batch_impl.columns.items():
                if column.computed is not None:  # SQLite computes it in the copy
                    batch_impl.column_transfers[name].pop("expr", None)

    event.listen(Table, "column_reflect", _read_whole)


def _read_whole(inspector: Inspector, table: Table, column: dict[str, Any]) -> None:
    """A reflected SQLite column's generated expression, where SQLAlchemy read none."""
    computed = column.get("computed")
    if computed is None or computed.get("sqltext") or inspector.dialect.name != "sqlite":
        return
    schema = f'"{table.schema}".' if table.schema else ""
    query = text(f"SELECT sql FROM {schema}sqlite_master WHERE type = 'table' AND name = :name")
    bind = inspector.bind
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            sql = connection.execute(query, {"name": table.name}).scalar()
    else:
        sql = bind.execute(query, {"name": table.name}).scalar()
    found = expression(sql or "", column["name"])
    if found:
        computed["sqltext"] = found


def expression(sql: str, name: str) -> str | None:
    """The expression of the generated column ``name`` in a ``CREATE TABLE`` statement (the
    parenthesised text after its ``AS``); None if it has no such column."""
    found = {column.lower(): said for column, said in generated(sql).items()}
    return found.get(name.lower())


def generated(sql: str) -> dict[str, str]:
    """The generated columns of a ``CREATE TABLE`` statement: each one's expression, by its
    name."""
    depth, item, items = 0, list[str](), list[list[str]]()
    for token in _TOKEN.findall(sql):
        depth += {"(": 1, ")": -1}.get(token, 0)
        if token == "," and depth == 1:
            items.append(item)
            item = []
        elif depth > 1 or (depth == 1 and token != "("):
            item.append(token)
    items.append(item)
    found = {}
    for tokens in items:
        first = next((token for token in tokens if token.strip()), "")
        expression = _generated(tokens)
        if expression is not None:
            found[_unquoted(first.lstrip())] = expression
    return found


def _unquoted(first: str) -> str:
    """A column definition's name: its first word, or its quoted first token unquoted."""
    if first[:1] in '"`[':
        return first[1:-1].replace('""', '"')
    words = first.split()
    return words[0] if words else ""


def _generated(tokens: list[str]) -> str | None:
    """The text in the parentheses that follow ``AS`` in a column's definition."""
    depth = 0
    for at, token in enumerate(tokens):
        if token == "(" and depth == 0 and at > 0 and _AS.search(tokens[at - 1]):
            inside, depth = list[str](), 1
            for part in tokens[at + 1 :]:
                depth += {"(": 1, ")": -1}.get(part, 0)
                if depth == 0:
                    return "".join(inside).strip()
                inside.append(part)
        depth += {"(": 1, ")": -1}.get(token, 0)
    return None
