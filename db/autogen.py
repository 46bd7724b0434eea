"""How autogenerate compares the models with a database, and how it writes a draft.

Passed to ``context.configure`` by env.py: the tool's own tables left out, server
defaults and named CHECK constraints compared, and types and defaults written as the
models give them, where Alembic's own rendering would not run on the other dialect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from alembic.operations import MigrationScript
from alembic.runtime.migration import MigrationContext
from sqlalchemy import DateTime, DefaultClause
from sqlalchemy.sql.elements import False_, True_
from sqlalchemy.types import TypeDecorator

from db.versions import VERSION_TABLE

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext


def skip_empty_autogenerate(
    _context: MigrationContext, _revision: object, directives: list[MigrationScript]
) -> None:
    """Write no revision file when autogenerate finds no difference."""
    script = directives[0]
    if script.upgrade_ops is not None and script.upgrade_ops.is_empty():
        directives[:] = []


def include_name(name: str | None, type_: str, _parents: Mapping[str, str | None]) -> bool:
    """Autogenerate leaves the tool's own tables alone."""
    return not (type_ == "table" and name in (VERSION_TABLE, "migration_log"))


# Alembic's own comparisons, and its opt-in one of CHECK constraints by name (off by default,
# as it needs every constraint named: the models' naming convention names them)
AUTOGENERATE = ["alembic.autogenerate.*", "alembic.ext.checkconstraint_byname"]
QUOTED = re.compile(r"\(?'(.*)'\)?", re.DOTALL)  # a string default, as SQLite reads it back


def changed_default(
    context: MigrationContext,
    _inspected_column: object,
    _metadata_column: object,
    inspected: str | None,
    metadata_default: object,
    _rendered: str | None,
) -> bool | None:
    """Whether a column's server default that the models give as a string changed; None
    leaves it to Alembic. Its SQLite comparison takes an empty string ('') or a quote in
    one ('it''s') for a change; its PostgreSQL one asks the server, in SQL that a quote
    breaks, so a string with one is asked here, quoted."""
    given = getattr(metadata_default, "arg", None)
    if inspected is None or not isinstance(given, str):
        return None
    if context.dialect.name == "sqlite":
        quoted = QUOTED.fullmatch(inspected.strip())
        return None if quoted is None else quoted.group(1).replace("''", "'") != given
    if context.dialect.name == "postgresql" and "'" in given and context.connection:
        literal = "'" + given.replace("'", "''") + "'"  # as the server reads a string
        same = context.connection.exec_driver_sql(f"SELECT {inspected} = {literal}").scalar()
        return not same
    return None


def render_item(type_: str, obj: object, autogen_context: AutogenContext) -> str | bool:
    """Revisions spell the models' UTCDateTime as the plain type it stores, an enum type
    that a new table must not make again with its ``create_type=False`` (older SQLAlchemy
    leaves it out), and a server default as the models give it: Alembic strips a quote
    that starts or ends a string (``"it's 'new'"`` was written ``"it's 'new"``), and writes
    ``sa.false()`` as SQLite compiles it, ``sa.text("0")``, which PostgreSQL refuses for a
    boolean."""
    if type_ == "type" and isinstance(obj, TypeDecorator) and isinstance(obj.impl, DateTime):
        return f"sa.DateTime({'timezone=True' if obj.impl.timezone else ''})"
    if type_ == "type" and getattr(obj, "create_type", True) is False:
        from db.enum_types import made_elsewhere

        return made_elsewhere(obj, autogen_context) or False
    default = obj.arg if type_ == "server_default" and isinstance(obj, DefaultClause) else None
    if isinstance(default, str):
        return repr(default)
    if isinstance(default, True_ | False_):
        return "sa.true()" if isinstance(default, True_) else "sa.false()"
    return False
