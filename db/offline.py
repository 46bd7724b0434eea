"""What offline SQL must not do without a word: write NULL where a parameter has no value;
and why a revision cannot be rendered offline, in words that say what to do.

``op.execute("... 'note :sale' ...")`` passes its SQL through ``text()``, which reads
``:sale`` as a bind parameter. Online the revision fails ("A value is required for bind
parameter 'sale'"); offline, values are inlined, and one never given was written as
``NULL``: the file said ``'note NULL'``, and applied, wrote that into the rows.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import TextClause

from db.batch_copies import copy_refused

# Alembic's batch mode copies a table, and reads it from the database to copy it
_COPIES = re.compile(r'dialect (\w+) requires a live database .* reflect the table "([^"]+)"')
COLON = (
    "in op.execute's SQL a colon before a word starts a parameter: write \\\\:word for a "
    "colon, or give its value with sa.text(...).bindparams(word=...)"
)


@compiles(TextClause)
def _every_value_given(element: TextClause, compiler: SQLCompiler, **kw: Any) -> str:
    """Text compiled with its values inlined (offline SQL) must have them all."""
    if kw.get("literal_binds"):
        for bind in element._bindparams.values():
            if bind.required and bind.value is None and bind.callable is None:
                raise InvalidRequestError(
                    f"A value is required for bind parameter {bind.key!r}, which offline "
                    f"SQL would write as NULL ({COLON})"
                )
    return str(compiler.visit_textclause(element, **kw))  # type: ignore[no-untyped-call]


def unrenderable(revision: str, exc: BaseException, said: str, flags: str) -> str:
    """Why ``revision`` cannot be rendered as SQL offline (``said``: the error in a line),
    and what to do; ``flags``: the task's --env."""
    copies = _COPIES.search(str(exc))
    if copies is None:
        return f"revision {revision} cannot be rendered as SQL offline: {said}"
    dialect, table = copies.groups()
    if dialect != "sqlite":  # recreate="always", refused online too
        return f"revision {revision} cannot be rendered as SQL offline: {copy_refused(table)}"
    return (
        f"revision {revision} cannot be rendered as SQL offline for SQLite: its batch block "
        f"changes table {table} by copying it, which takes the live database to read "
        f"the table from; apply it (`invoke migrate {flags}`), or print its SQL for a "
        "PostgreSQL environment (`invoke offline-sql --env=prod`)"
    )
