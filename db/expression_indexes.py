"""Indexes on an expression, on SQLite: compared by name.

SQLAlchemy cannot reflect a SQLite index on an expression (``lower(username)``: the unique
index that makes names unique whatever their case), so Alembic leaves one the models add
out of a draft made against dev, with only a warning that it cannot compare it; then
``check`` on PostgreSQL finds it missing there. Its name tells whether the database has
it: one the models have and the database lacks is drafted, and found by ``check``; so is
one the database has and the models lack, to be dropped, and made again on rollback from
the SQL SQLite keeps of it. (A changed expression under the same name is not seen.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alembic.operations.ops import CreateIndexOp, DropIndexOp
from alembic.util import PriorityDispatchResult
from alembic.util.sqla_compat import is_expression_index
from sqlalchemy import Table, text

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations.ops import ModifyTableOps

# SQLite's indexes of a table, and (index_info) which columns each is on: -2 for an expression
_INDEXES = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
_ON_EXPRESSION = "SELECT 1 FROM pragma_index_info(?) WHERE cid = -2"


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
    if conn_table is None or metadata_table is None or connection is None:
        return PriorityDispatchResult.CONTINUE  # a table made or dropped: Alembic's
    there: dict[str, str | None] = dict(connection.exec_driver_sql(_INDEXES, (table_name,)).all())
    wanted = {index.name for index in metadata_table.indexes}
    for index in sorted(metadata_table.indexes, key=lambda each: str(each.name)):
        if index.name not in there and is_expression_index(index):
            modify_ops.ops.append(CreateIndexOp.from_index(index))
    for name in sorted(set(there) - wanted):
        made = there[name]
        if made and connection.exec_driver_sql(_ON_EXPRESSION, (name,)).first():
            modify_ops.ops.append(_dropped(name, table_name, made))
    return PriorityDispatchResult.CONTINUE


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
