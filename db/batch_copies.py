"""Alembic's batch mode on SQLite, where views read the table it copies, triggers fire on
it, or an index is on an expression of its columns.

Batch mode changes a SQLite table by copying it: it makes ``_alembic_tmp_products``,
copies the rows, drops ``products`` and renames the copy to ``products``. PostgreSQL
changes the table in place, keeping what is built on it; on SQLite two things went:

- Since 3.26, SQLite checks every view when a table is renamed, and refuses the rename
  while a view reads the table just dropped (``error in view sales: no such table:
  main.products``), though the name is back once the rename is done. The rename runs with
  ``legacy_alter_table`` on, the workaround of SQLite's forum and Alembic's issue #1207.
- Dropping the table drops its triggers and indexes. Batch mode makes again the indexes
  SQLAlchemy reflects, which leaves out those on an expression (``lower(username)``: the
  unique index that makes names unique whatever their case), and no trigger: a trigger
  that logged price changes was gone without a word. Both are read before the copy is
  made, and made again on the copy once it has the table's name.

Then every view must still compile, and each index be made again: one that reads a column
the change took away or renamed fails the revision, naming it, as does a named CHECK
constraint or a generated column that the copy itself cannot be made with (SQLite says only
"no such column").
(PostgreSQL refuses to drop a column a view reads, and drops an index or a CHECK constraint
with its column; the copy cannot tell a column dropped from one renamed, so it drops
nothing without a word.)

On PostgreSQL batch mode alters in place, unless a revision says ``recreate="always"``
(Alembic's docs give it for what SQLite cannot alter): then it copies there too, and the
copy passed on an empty database and broke a live one. Its key takes a new sequence,
``_alembic_tmp_purchases_id_seq``, that starts at 1 whatever the rows hold, so every insert
of the app failed on a duplicate key; and the grants, triggers, comments and policies of
the table went with it. Such a copy is refused before it starts.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Table, event
from sqlalchemy.engine import ExceptionContext

from db.errors import MigrationFailed
from db.generated_columns import generated

if TYPE_CHECKING:
    from alembic.operations.batch import ApplyBatchImpl

_COPY = re.compile(r'\s*CREATE TABLE "?_alembic_tmp_(.+?)"? \(', re.IGNORECASE)
_RENAME = re.compile(r'\s*ALTER TABLE "?_alembic_tmp_(.+?)"? RENAME TO', re.IGNORECASE)
_CHECK = re.compile(r"^\s*CONSTRAINT (\S+) CHECK \((.*)\),?\s*$", re.MULTILINE)
_MISSING = re.compile(r"no such column: (?:\w+\.)?(\w+)")
_BUILT_ON = (
    "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
    "AND type IN ('index', 'trigger')"
)


@functools.cache
def refuse_postgresql_copies() -> None:
    """Once per process: Alembic's PostgreSQL operations refuse to copy a table."""
    from alembic.ddl.postgresql import PostgresqlImpl

    class AltersInPlace(PostgresqlImpl):  # Alembic's registry takes it for "postgresql"
        __dialect__ = "postgresql"

        def prep_table_for_batch(self, batch_impl: ApplyBatchImpl, table: Table) -> None:
            raise MigrationFailed(copy_refused(table.name))  # before the copy is made


def copy_refused(table: str) -> str:
    """Why a batch block may not copy ``table`` on PostgreSQL, and what to write instead."""
    return (
        f'batch_alter_table("{table}", recreate="always") would copy the table on PostgreSQL '
        "too, where the copy numbers new rows from 1 again (each insert failing on a "
        "duplicate key) and loses the table's grants and triggers: leave recreate out "
        "(SQLite's table is copied whenever a change needs it), or copy on SQLite only: "
        'recreate="always" if op.get_context().dialect.name == "sqlite" else "auto"'
    )


def keep_dependents(engine: Engine) -> None:
    """Let ``engine``'s batch copies take the table's place under its views, with its
    triggers and its indexes on an expression.
    (A rename that fails ends the revision, and the run's connection with it, so
    ``legacy_alter_table`` is never left on for other work.)"""

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        copied = _COPY.match(statement)
        if copied:
            table = copied.group(1)
            conn.info.setdefault("batch_uncopied", {})[table] = _uncopied(cursor.connection, table)
        elif _RENAME.match(statement):
            cursor.execute("PRAGMA legacy_alter_table=ON")

    @event.listens_for(engine, "handle_error")
    def _explained(context: ExceptionContext) -> None:
        statement = context.statement or ""
        copied = _COPY.match(statement)
        missing = _MISSING.match(str(context.original_exception))
        if copied and missing:  # what in the copy reads a column no longer there?
            reading = [("CHECK constraint", *check) for check in _CHECK.findall(statement)]
            reading += [("generated column", *each) for each in generated(statement).items()]
            for kind, name, expression in reading:
                if re.search(rf"\b{re.escape(missing.group(1))}\b", expression):
                    exc = context.original_exception
                    raise _broken(kind, name, copied.group(1), exc) from exc

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        renamed = _RENAME.match(statement)
        if renamed:
            cursor.execute("PRAGMA legacy_alter_table=OFF")
            table = renamed.group(1)
            uncopied = conn.info.get("batch_uncopied", {}).pop(table, [])
            _made_again(cursor.connection, table, uncopied)
            _views_compile(cursor.connection, table)


def _uncopied(connection: sqlite3.Connection, table: str) -> list[tuple[str, str, str]]:
    """What batch mode does not make again on the copy of ``table``: its triggers, and its
    indexes on an expression (an index_info column of -2), as (kind, name, SQL)."""
    found = connection.execute(_BUILT_ON, (table,)).fetchall()
    return [
        (kind, name, sql)
        for kind, name, sql in found
        if kind == "trigger" or _on_expression(connection, name)
    ]


def _on_expression(connection: sqlite3.Connection, index: str) -> bool:
    quoted = index.replace('"', '""')
    return any(column[1] == -2 for column in connection.execute(f'PRAGMA index_info("{quoted}")'))


def _made_again(
    connection: sqlite3.Connection, table: str, uncopied: list[tuple[str, str, str]]
) -> None:
    """What the copied table had that batch mode does not copy, made again on the copy.
    (SQLite reads a trigger's body only when it fires: one that names a column the change
    took away fails then, as a PostgreSQL trigger function does.)"""
    for kind, name, sql in uncopied:
        try:
            connection.execute(sql)
        except sqlite3.OperationalError as exc:
            raise _broken(kind, name, table, exc) from None


def _views_compile(connection: sqlite3.Connection, table: str) -> None:
    """Every view of the database still reads what is there, after ``table`` was rebuilt."""
    views = connection.execute("SELECT name FROM sqlite_master WHERE type = 'view'").fetchall()
    for (view,) in views:
        quoted = view.replace('"', '""')
        try:
            connection.execute(f'SELECT * FROM "{quoted}" LIMIT 0').fetchall()
        except sqlite3.OperationalError as exc:
            raise _broken("view", view, table, exc) from None


def _broken(kind: str, name: str, table: str, exc: BaseException) -> sqlite3.OperationalError:
    return sqlite3.OperationalError(
        f"{kind} {name} no longer works once table {table} is changed ({exc}): drop the "
        f"{kind} before the change, in the same revision, and create it again after if it "
        "is still wanted"
    )


@contextmanager
def unreflected_indexes_unsaid() -> Iterator[None]:
    """SQLAlchemy cannot reflect a SQLite index on an expression, and says so each time it
    reads the table ("Skipped unsupported reflection of expression-based index"), as does
    Alembic where the models have one ("can't be compared"): a batch copy keeps such an
    index (above), and autogenerate compares it by name (db.expression_indexes). Both
    warnings are left out of a run on SQLite."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based")
        warnings.filterwarnings("ignore", "autogenerate skipping metadata-specified expression")
        yield
