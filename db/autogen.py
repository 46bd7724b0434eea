"""How autogenerate compares the models with a database.

Passed to ``context.configure`` by env.py: the tool's own tables left out, models whose
CHECK constraints cannot be compared refused, server defaults, named CHECK constraints and
SQLite's indexes on an expression compared. How a draft is written is db.rendering.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, DefaultClause, Identity, MetaData
from sqlalchemy.engine import make_url
from sqlalchemy.exc import UnsupportedCompilationError
from sqlalchemy.sql.elements import TextClause

from db.errors import BrokenModels
from db.versions import VERSION_TABLE

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations.ops import AlterColumnOp
    from alembic.util import PriorityDispatchResult


def include_name(name: str | None, type_: str, _parents: Mapping[str, str | None]) -> bool:
    """Autogenerate leaves the tool's own tables alone."""
    return not (type_ == "table" and name in (VERSION_TABLE, "migration_log"))


# Alembic's own comparisons, its opt-in one of CHECK constraints by name (off by default,
# as it needs every constraint named: the models' naming convention names them), and ours
# (see register_plugin)
PLUGIN = "db.comparisons"
AUTOGENERATE = ["alembic.autogenerate.*", "alembic.ext.checkconstraint_byname", PLUGIN]
QUOTED = re.compile(r"\(?'(.*)'\)?", re.DOTALL)  # a string default, as SQLite reads it back


def comparable(metadata: MetaData) -> MetaData:
    """The models' ``metadata``, once no column's type makes a CHECK constraint of its own
    (``sa.Boolean(create_constraint=True)``), which CHECK constraints compared by name
    cannot follow: unnamed, the comparison ended in a traceback; named, it found a change
    on every run, as a revision names it apart from the naming convention, and PostgreSQL
    makes none for a boolean. Nor may a column's type be one that SQLite or PostgreSQL does
    not have (PostgreSQL's ``ARRAY``, on SQLite): its draft was written without a word, and
    failed on dev; nor a table name its schema: dev failed (``unknown database analytics``),
    and check, which reads the environment's schema alone, drafted it again on every run."""
    dialects = [make_url(f"{name}://").get_dialect()() for name in ("sqlite", "postgresql+asyncpg")]
    for table in metadata.sorted_tables:
        if table.schema is not None:
            raise BrokenModels(
                f"db/models.py: table {table.name} names its schema ({table.schema}), which "
                "SQLite has not, and which check would never find on PostgreSQL (it compares "
                "the environment's schema): leave it out, and SCHEMA in the env file places "
                "every table"
            )
        for column in table.columns:
            if getattr(column.type, "create_constraint", False):
                raise BrokenModels(
                    f"db/models.py: the type of {table.name}.{column.name} makes its own CHECK "
                    "constraint (create_constraint=True), which check cannot compare: leave it "
                    "out, and give the table a named sa.CheckConstraint if it needs one"
                )
            for dialect in dialects:
                try:
                    column.type.compile(dialect=dialect)
                except UnsupportedCompilationError as exc:
                    name, lacks, way = missing_type(exc)
                    raise BrokenModels(
                        f"db/models.py: {table.name}.{column.name} is of type {name}, which "
                        f"{lacks} does not have, so a revision that makes it fails there: {way}"
                    ) from exc
    return metadata


def missing_type(exc: UnsupportedCompilationError) -> tuple[str, str, str]:
    """The column type a dialect cannot make, that dialect's name, and the way out: a type
    both have, with PostgreSQL's as its variant (a list is JSON on SQLite)."""
    from sqlalchemy import ARRAY, JSON
    from sqlalchemy.dialects.postgresql import HSTORE

    element = exc.element_type
    name = type(element).__name__
    if exc.compiler.dialect.name != "sqlite":
        return name, "PostgreSQL", "give the column a type that both have"
    if name == "INTERVAL":
        way = "give the column sa.Interval(), which is INTERVAL on PostgreSQL"
    else:
        both = "sa.JSON()" if isinstance(element, ARRAY | JSON | HSTORE) else "sa.Text()"
        way = (
            f"give the column a type SQLite has too, with {name} as PostgreSQL's variant: "
            f'{both}.with_variant(postgresql.{name}(...), "postgresql")'
        )
    return name, "SQLite", way


@functools.cache
def register_plugin() -> None:
    """Our comparisons, as an Alembic plugin, once per process: of server defaults, before
    Alembic's own, which env.py turns on with ``compare_server_default=True`` (a function
    there made Alembic read an identity column's default as text, and fail); and of SQLite's
    indexes on an expression, which Alembic cannot compare (see db.expression_indexes)."""
    from alembic.runtime.plugins import Plugin
    from alembic.util import DispatchPriority

    from db import expression_indexes

    plugin = Plugin(PLUGIN)
    plugin.add_autogenerate_comparator(
        compare_default, "column", "server_default", priority=DispatchPriority.FIRST
    )
    plugin.add_autogenerate_comparator(
        expression_indexes.compare,
        "table",
        "indexes",
        qualifier="sqlite",
        priority=DispatchPriority.LAST,
    )


def compare_default(
    autogen_context: AutogenContext,
    alter_column_op: AlterColumnOp,
    _schema: object,
    _table: object,
    _column: object,
    conn_col: Column[Any],
    metadata_col: Column[Any],
) -> PriorityDispatchResult:
    """A column's server default, where Alembic's comparison gets it wrong; else Alembic's.

    SQLite has no identity columns (its INTEGER PRIMARY KEY numbers rows): a key the models
    give ``Identity()`` matches there, where Alembic drafted adding it on every run.
    """
    from alembic.util import PriorityDispatchResult

    given, found = metadata_col.server_default, conn_col.server_default
    if autogen_context.dialect is not None and autogen_context.dialect.name == "sqlite":
        if isinstance(given, Identity) and found is None:
            return PriorityDispatchResult.STOP
    reflected = found.arg if isinstance(found, DefaultClause) else None
    inspected = reflected.text if isinstance(reflected, TextClause) else None
    changed = changed_default(autogen_context.migration_context, inspected, given)
    if changed is None:
        return PriorityDispatchResult.CONTINUE
    if changed:
        alter_column_op.modify_server_default = given
    return PriorityDispatchResult.STOP


def changed_default(
    context: MigrationContext, inspected: str | None, metadata_default: object
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
