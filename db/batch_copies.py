"""Alembic's batch mode on SQLite, where a view reads the table it copies.

Batch mode changes a SQLite table by copying it: it makes ``_alembic_tmp_products``,
copies the rows, drops ``products`` and renames the copy to ``products``. Since 3.26,
SQLite checks every view when a table is renamed, and refuses the rename while a view
reads the table just dropped (``error in view sales: no such table: main.products``),
though the name is back once the rename is done. PostgreSQL makes the same change with
the view in place, so dev failed where prod would not. The rename runs with
``legacy_alter_table`` on, the workaround SQLite's forum and Alembic's issue #1207 give;
then every view must still compile, so that one reading a column the change took away
fails the revision, as PostgreSQL refuses such a change.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from sqlalchemy import Engine, event

_RENAME = re.compile(r'\s*ALTER TABLE "?_alembic_tmp_(.+?)"? RENAME TO', re.IGNORECASE)


def keep_views(engine: Engine) -> None:
    """Let ``engine``'s batch copies rename their table back under the views that read it.
    (A rename that fails ends the revision, and the run's connection with it, so
    ``legacy_alter_table`` is never left on for other work.)"""

    @event.listens_for(engine, "before_cursor_execute")
    def _before(_conn: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        if _RENAME.match(statement):
            cursor.execute("PRAGMA legacy_alter_table=ON")

    @event.listens_for(engine, "after_cursor_execute")
    def _after(_conn: Any, cursor: Any, statement: str, *_rest: Any) -> None:
        renamed = _RENAME.match(statement)
        if renamed:
            cursor.execute("PRAGMA legacy_alter_table=OFF")
            _views_compile(cursor.connection, renamed.group(1))


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
