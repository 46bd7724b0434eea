"""Indexes on an expression, on SQLite: compared by name.

SQLAlchemy cannot reflect a SQLite index on an expression (``lower(username)``: the unique
index that makes names unique whatever their case), so Alembic leaves one the models add
out of a draft made against dev, with only a warning that it cannot compare it; then
``check`` on PostgreSQL finds it missing there. Its name tells whether the database has
it: one the models have and the database lacks is drafted, and found by ``check``; so is
one the database has and the models lack, to be dropped, and made again on rollback from
the SQL SQLite keeps of it. (A changed expression under the same name is not seen.) One
SQLite cannot build (``to_tsvector(...)``: PostgreSQL's alone) is left out, even of a new
table, with a warning: dev cannot have it, and a draft that made it failed there.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

from alembic.operations.ops import CreateIndexOp, DropIndexOp
from alembic.runtime.migration import MigrationContext
from alembic.util import PriorityDispatchResult
from alembic.util.sqla_compat import is_expression_index
from sqlalchemy import Connection, Index, Table, create_engine, text
from sqlalchemy.exc import CompileError, DBAPIError
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex, CreateTable

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations.ops import ModifyTableOps

# SQLite's indexes (read once a run: one query a table cost 8% of a check of 1000 tables),
# and (index_info) which columns each is on: -2 for an expression
_INDEXES = "SELECT tbl_name, name, sql FROM sqlite_master WHERE type = 'index'"
_ON_EXPRESSION = "SELECT 1 FROM pragma_index_info(?) WHERE cid = -2"
_READ: weakref.WeakKeyDictionary[MigrationContext, dict[str, dict[str, str | None]]] = (
    weakref.WeakKeyDictionary()
)


def compare(
    autogen_context: AutogenContext,
    modify_ops: ModifyTableOps,
    _schema: str | None,
    table_name: str,
    conn_table: Table | None,
    metadata_table: Table | None,
) -> PriorityDispatchResult:
    """The indexes on an expression that the models add to a SQLite table, or took out of
    it, drafted."""
    connection = autogen_context.connection
    if metadata_table is None or connection is None:
        return PriorityDispatchResult.CONTINUE  # a table dropped: Alembic's
    on_expressions = sorted(
        (index for index in metadata_table.indexes if is_expression_index(index)),
        key=lambda index: str(index.name),
    )
    unbuilt = {index.name for index in on_expressions if _unbuilt(index, metadata_table)}
    if conn_table is None:  # a table made: Alembic drafts its indexes, but for those
        kept = [op for op in modify_ops.ops if getattr(op, "index_name", None) not in unbuilt]
        modify_ops.ops[:] = kept
        return PriorityDispatchResult.CONTINUE
    there = _indexes(autogen_context.migration_context, connection).get(table_name, {})
    wanted = {index.name for index in metadata_table.indexes}
    for index in on_expressions:
        if index.name not in there and index.name not in unbuilt:
            modify_ops.ops.append(CreateIndexOp.from_index(index))
    for name in sorted(set(there) - wanted):
        made = there[name]
        if made and connection.exec_driver_sql(_ON_EXPRESSION, (name,)).first():
            modify_ops.ops.append(_dropped(name, table_name, made))
    return PriorityDispatchResult.CONTINUE


def _indexes(context: MigrationContext, connection: Connection) -> dict[str, dict[str, str | None]]:
    """Each table's indexes in the database, by name, with the SQL that made them, read on
    ``connection`` once for the run ``context`` is of."""
    if context not in _READ:
        found: dict[str, dict[str, str | None]] = {}
        for table, name, sql in connection.exec_driver_sql(_INDEXES):
            found.setdefault(table, {})[name] = sql
        _READ[context] = found
    return _READ[context]


def _unbuilt(index: Index, table: Table) -> bool:
    """Whether SQLite cannot make ``index`` (a PostgreSQL function or operator class in its
    expression: ``to_tsvector(...)``), tried on an empty copy of its table in memory; if
    so, a warning says to make it on PostgreSQL alone, as dev cannot have it."""
    engine = create_engine("sqlite://", poolclass=NullPool)  # a new database each time
    try:
        with engine.begin() as connection:
            try:
                connection.execute(CreateTable(table, include_foreign_key_constraints=[]))
            except CompileError:
                return False  # the table cannot be made on SQLite either: not the index's doing
            connection.execute(CreateIndex(index))
    except (CompileError, DBAPIError) as exc:  # CompileError: to_tsvector's 'english'
        why = exc.orig if isinstance(exc, DBAPIError) else exc
        warnings.warn(
            f"index {index.name} of {table.name} is on an expression SQLite cannot build "
            f"({why}), so dev cannot have it, and drafts made on dev leave it out: make it in "
            'the revision under `if op.get_context().dialect.name == "postgresql":`, and drop '
            "it so in downgrade()",
            stacklevel=1,
        )
        return True
    finally:
        engine.dispose()
    return False


def _dropped(name: str, table_name: str, sql: str) -> DropIndexOp:
    """Dropping the index ``name``, which rollback makes again as the SQL that made it
    (``CREATE UNIQUE INDEX ... ON users (lower(username)) WHERE ...``) says: on the
    expressions in its first brackets, and with the same WHERE on both dialects."""
    made, _, rest = sql.partition("(")
    end = _closing(rest)
    where = rest[end + 1 :].strip()
    kw: dict[str, Any] = {"unique": " UNIQUE " in f" {made.upper()} "}
    if where[:5].upper() == "WHERE":
        kw["sqlite_where"] = kw["postgresql_where"] = text(where[5:].strip())
    again = CreateIndexOp(name, table_name, [text(rest[:end])])  # Alembic reads its columns
    return DropIndexOp(name, table_name=table_name, _reverse=again, **kw)


def _closing(sql: str) -> int:
    """Where in ``sql`` the bracket opened just before it closes."""
    depth = 1
    for at, char in enumerate(sql):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return at
    return len(sql)
