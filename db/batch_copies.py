"""Alembic's batch mode on SQLite, where views read the table it copies, or triggers fire
on it.

Batch mode changes a SQLite table by copying it: it makes ``_alembic_tmp_products``,
copies the rows, drops ``products`` and renames the copy to ``products``. PostgreSQL
changes the table in place, keeping what is built on it; on SQLite two things went:

- Since 3.26, SQLite checks every view when a table is renamed, and refuses the rename
  while a view reads the table just dropped (``error in view sales: no such table:
  main.products``), though the name is back once the rename is done. The rename runs with
  ``legacy_alter_table`` on, the workaround of SQLite's forum and Alembic's issue #1207.
- Dropping the table drops its triggers, and nothing made them again: a trigger that
  logged price changes was gone without a word. They are read before the copy is made,
  and made again on the copy once it has the table's name.

Then every view must still compile, so that one reading a column the change took away
fails the revision, as PostgreSQL refuses such a change.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from sqlalchemy import Engine, event

_COPY = re.compile(r'\s*CREATE TABLE "?_alembic_tmp_(.+?)"? \(', re.IGNORECASE)
_RENAME = re.compile(r'\s*ALTER TABLE "?_alembic_tmp_(.+?)"? RENAME TO', re.IGNORECASE)
_TRIGGERS = "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?"


def keep_views_and_triggers(engine: Engine) -> None:
    """Let ``engine``'s batch copies take the table's place under its views and triggers.
    (A rename that fails ends the revision, and the run's connection with it, so
    ``legacy_alter_table`` is never left on for other work.)"""

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        copied = _COPY.match(statement)
        if copied:
            table = copied.group(1)
            triggers = cursor.connection.execute(_TRIGGERS, (table,)).fetchall()
            conn.info.setdefault("batch_triggers", {})[table] = triggers
        elif _RENAME.match(statement):
            cursor.execute("PRAGMA legacy_alter_table=ON")

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        renamed = _RENAME.match(statement)
        if renamed:
            cursor.execute("PRAGMA legacy_alter_table=OFF")
            table = renamed.group(1)
            triggers = conn.info.get("batch_triggers", {}).pop(table, [])
            _made_again(cursor.connection, triggers)
            _views_compile(cursor.connection, table)


def _made_again(connection: sqlite3.Connection, triggers: list[Any]) -> None:
    """The triggers the copied table had, made again on the copy. (SQLite reads a
    trigger's body only when it fires: one that names a column the change took away fails
    then, as a PostgreSQL trigger function does.)"""
    for (sql,) in triggers:
        connection.execute(sql)


def _views_compile(connection: sqlite3.Connection, table: str) -> None:
    """Every view of the database still reads what is there, after ``table`` was rebuilt."""
    views = connection.execute("SELECT name FROM sqlite_master WHERE type = 'view'").fetchall()
    for (view,) in views:
        quoted = view.replace('"', '""')
        try:
            connection.execute(f'SELECT * FROM "{quoted}" LIMIT 0').fetchall()
        except sqlite3.OperationalError as exc:
            raise sqlite3.OperationalError(
                f"view {view} no longer works once table {table} is changed ({exc}): drop "
                "the view before the change and create it again after, in the same revision"
            ) from None
