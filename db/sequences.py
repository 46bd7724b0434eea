"""Sequences that a revision leaves behind the ids it inserted, on PostgreSQL.

A revision that inserts rows with their ids (reference data: ``op.bulk_insert(categories,
[{"id": 10, "name": "E-books"}])``) runs on dev, where SQLite numbers a new row after the
largest id. PostgreSQL's sequence does not move: once it reaches those ids, days later,
each of the app's inserts fails with a duplicate key. So before a revision commits, each
table it inserted into is checked: a column whose rows hold an id past what its sequence
has given fails the revision, which names the ``setval`` that sets the sequence right.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event, text

from db.errors import MigrationFailed

_NAME = r'(?:"(?:[^"]|"")+"|[\w$]+)'  # an identifier, quoted or not
_INSERT = re.compile(rf"\bINSERT\s+INTO\s+({_NAME}(?:\.{_NAME})?)", re.IGNORECASE)
_NUMBERED = text(  # a table's numbered columns: its name, the column's (raw, quoted), sequence
    "SELECT c.oid::regclass::text, a.attname, quote_ident(a.attname), "
    "pg_get_serial_sequence(c.oid::regclass::text, a.attname) "
    "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
    "WHERE c.oid = to_regclass(:table) AND a.attnum > 0 AND NOT a.attisdropped "
    "AND pg_get_serial_sequence(c.oid::regclass::text, a.attname) IS NOT NULL"
)
INSERTED = "tables_inserted_into"  # the connection's info key: what this revision inserted into


@contextmanager
def inserts_noted(connection: Connection) -> Iterator[None]:
    """Note on a PostgreSQL ``connection``, in its info, each table a statement inserts rows
    into, while the run lasts (an app that migrates on its own connection keeps using it)."""
    if connection.dialect.name != "postgresql":
        yield
        return
    event.listen(connection, "before_cursor_execute", _noted)
    try:
        yield
    finally:
        event.remove(connection, "before_cursor_execute", _noted)
        if not connection.invalidated:  # a lost connection's info is gone with it
            connection.info.pop(INSERTED, None)


def _noted(connection: Connection, _cursor: Any, statement: str, *_rest: Any) -> None:
    found = _INSERT.findall(statement)
    if found:
        connection.info.setdefault(INSERTED, set()).update(found)


def check_sequences(ctx: MigrationContext, **_kw: Any) -> None:
    """Before a revision commits on PostgreSQL: refuse one that inserted ids its tables'
    sequences have not given (checked on the tables it inserted into, and only those)."""
    connection = ctx.connection
    if ctx.dialect.name != "postgresql" or ctx.as_sql or connection is None:
        return
    inserted: set[str] = connection.info.pop(INSERTED, set())
    own = {ctx.version_table, "migration_log"}  # numbered by no one, and by its sequence
    for table in sorted(name for name in inserted if _unqualified(name) not in own):
        for name, raw, column, sequence in connection.execute(_NUMBERED, {"table": table}):
            top, given = connection.exec_driver_sql(
                f"SELECT (SELECT max({column}) FROM {name}), "
                f"CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {sequence}"
            ).one()
            if top is not None and top > given:
                found = f"pg_get_serial_sequence('{name}', '{raw}')"  # in any tenant's schema
                fix = f"SELECT setval({found}, (SELECT max({column}) FROM {name}))"
                raise MigrationFailed(
                    f"the revision inserts ids into {name} that its sequence {sequence} has "
                    f"not given ({column} reaches {top}, the sequence {given}), so the app's "
                    "inserts would fail on a duplicate key: end the revision with "
                    f'op.execute("{fix}"), under if op.get_context().dialect.name == "postgresql"'
                )


def _unqualified(name: str) -> str:
    """A table's name as written (``"shop".migration_log``), without schema or quotes."""
    last: str = re.findall(_NAME, name)[-1]
    return last[1:-1].replace('""', '"') if last.startswith('"') else last
