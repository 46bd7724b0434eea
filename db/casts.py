"""Column type changes, as PostgreSQL makes them: some only when told how, and some
only where every row still fits.

``ALTER COLUMN ... TYPE`` converts the rows with an assignment cast, and PostgreSQL has
none from a text type to any other (nor between, say, a boolean and a number): the
statement fails there ("column "stock" cannot be cast automatically to type bigint").
SQLite's batch copy converts anything, so a draft made against dev passes there. A
change from a text type is therefore drafted with the ``postgresql_using`` PostgreSQL
asks for; SQLite ignores it. And SQLite checks no length, precision or integer size,
while PostgreSQL refuses a row that a narrower type cannot hold.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations.ops import AlterColumnOp, MigrationScript, ModifyTableOps, OpContainer
from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    Interval,
    Numeric,
    String,
    Time,
    Uuid,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import CompileError
from sqlalchemy.sql.sqltypes import _Binary
from sqlalchemy.types import TypeEngine

# the types PostgreSQL converts among by itself; to a text type it converts any, and from
# a timestamp to a time of day (tests/test_library.py asks a server about each pair)
_FAMILIES: tuple[set[type[TypeEngine[Any]]], ...] = (
    {Integer, Numeric, Float},
    {Date, DateTime},
    {Time, Interval},
    {JSON},
    {Boolean},
    {Uuid},
    {_Binary},  # LargeBinary's affinity, as BYTEA's and BLOB's
)
_DIALECT = make_url("postgresql+asyncpg://").get_dialect()()


def converts_itself(old: TypeEngine[Any], new: TypeEngine[Any]) -> bool:
    """Whether PostgreSQL changes a column from ``old`` to ``new`` with no USING: true
    where it is not known to refuse. Enum types are left to db/enum_types.py."""
    if isinstance(old, Enum) or isinstance(new, Enum) or _affinity(new) is String:
        return True
    if _affinity(old) is String:
        return False
    if (_affinity(old), _affinity(new)) == (DateTime, Time):
        return True
    families = [_family(old), _family(new)]
    return None in families or families[0] == families[1]


def sql_type(kind: TypeEngine[Any]) -> str:
    """``kind`` as PostgreSQL names it (``BIGINT``, ``VARCHAR(10)``), or as SQLAlchemy
    does where PostgreSQL has no name for it."""
    try:
        return kind.compile(dialect=_DIALECT)
    except CompileError:
        return repr(kind)


def using(column: str, old: TypeEngine[Any], new: TypeEngine[Any]) -> str | None:
    """The USING expression that changes ``column`` from a text type to ``new``, as
    PostgreSQL's own hint has it (``stock::BIGINT``); None where none is needed, or the
    old type is no text (a boolean to a number takes an expression only its author knows)."""
    if converts_itself(old, new) or _affinity(old) is not String:
        return None
    try:
        return f"{_DIALECT.identifier_preparer.quote(column)}::{sql_type(new)}"
    except CompileError:  # a type PostgreSQL has no name for: left to the author
        return None


class CastColumnOp(AlterColumnOp):
    """An ``alter_column`` that changes a column's type, written with the
    ``postgresql_using`` that tells PostgreSQL how (Alembic writes no keyword of its own)."""

    @classmethod
    def told(cls, op: AlterColumnOp, how: str) -> CastColumnOp:
        return cls(
            op.table_name,
            op.column_name,
            schema=op.schema,
            existing_type=op.existing_type,
            existing_server_default=op.existing_server_default,
            existing_nullable=op.existing_nullable,
            existing_comment=op.existing_comment,
            modify_nullable=op.modify_nullable,
            modify_comment=op.modify_comment,
            modify_server_default=op.modify_server_default,
            modify_name=op.modify_name,
            modify_type=op.modify_type,
            **{**op.kw, "postgresql_using": how},
        )


@renderers.dispatch_for(CastColumnOp)
def _render(context: AutogenContext, op: CastColumnOp) -> str:
    written: str = renderers.dispatch(AlterColumnOp)(context, op)  # Alembic's own, then ours
    return f"{written.removesuffix(')')}, postgresql_using={op.kw['postgresql_using']!r})"


def add_casts(script: MigrationScript) -> None:
    """Write, in both directions of ``script``, the USING that each change of a column
    from a text type needs on PostgreSQL."""
    for container in (script.upgrade_ops, script.downgrade_ops):
        for table in container.ops if container is not None else []:
            if isinstance(table, ModifyTableOps):
                _tell(table)


def _tell(table: OpContainer) -> None:
    for index, op in enumerate(table.ops):
        old, new = getattr(op, "existing_type", None), getattr(op, "modify_type", None)
        if isinstance(op, AlterColumnOp) and old is not None and new is not None:
            how = using(op.column_name, old, new)
            if how is not None:
                table.ops[index] = CastColumnOp.told(op, how)


def _affinity(kind: TypeEngine[Any]) -> type[TypeEngine[Any]] | None:
    return kind._type_affinity


def _family(kind: TypeEngine[Any]) -> int | None:
    affinity = _affinity(kind)
    return next((n for n, family in enumerate(_FAMILIES) if affinity in family), None)


def type_risks(
    column: str, old: TypeEngine[Any], new: TypeEngine[Any], kw: dict[str, Any]
) -> list[str]:
    """What changing ``column`` from ``old`` to ``new`` risks on PostgreSQL, in words:
    rows it does not convert, or that no longer fit."""
    if not converts_itself(old, new):
        return [_converted(column, old, new, kw.get("postgresql_using"))]
    narrowed = _narrowed(old, new)
    if narrowed is None:
        return []
    return [
        f"narrows column {column} from {sql_type(old)} to {sql_type(new)}, which {narrowed} "
        "(SQLite never checks, so dev shows nothing): mend those values first, in the same "
        "revision, or keep the type"
    ]


def _converted(column: str, old: TypeEngine[Any], new: TypeEngine[Any], how: str | None) -> str:
    change = f"column {column} from {sql_type(old)} to {sql_type(new)}"
    if how is None:
        return (
            f"changes {change}, which PostgreSQL refuses without a USING expression "
            "(SQLite's copy converts anything, so dev passes): give the alter_column "
            f"postgresql_using=..., an expression that turns {column.split('.')[-1]} into "
            f"{sql_type(new)}"
        )
    return (
        f"converts {change}, which PostgreSQL does only when told how: the draft gives it "
        f"postgresql_using={how!r}, which fails where a value does not convert (SQLite's "
        "copy converts it anyway, so dev passes): mend those values first, in the same "
        "revision"
    )


def integer_bytes(kind: TypeEngine[Any]) -> int:
    """The size of one of PostgreSQL's integer types; 0 for any other type."""
    return {"SMALLINT": 2, "INTEGER": 4, "BIGINT": 8}.get(sql_type(kind), 0)


def _narrowed(old: TypeEngine[Any], new: TypeEngine[Any]) -> str | None:
    """What PostgreSQL does to the values a type of the same kind, but narrower, no
    longer holds, in words."""
    affinity = _affinity(new)
    if affinity is not _affinity(old) or isinstance(old, Enum) or isinstance(new, Enum):
        return None
    fails = "fails on PostgreSQL where a value"
    if affinity is String:
        length, was = getattr(new, "length", None), getattr(old, "length", None)
        if length is not None and (was is None or length < was):
            return f"{fails} is longer than {length} characters"
    if affinity is Integer and 0 < integer_bytes(new) < integer_bytes(old):
        most = 2 ** (8 * integer_bytes(new) - 1)
        return f"{fails} is outside {sql_type(new)}'s range ({-most} to {most - 1})"
    if affinity is Numeric:
        return _fewer_digits(old, new, fails)
    return None


def _fewer_digits(old: TypeEngine[Any], new: TypeEngine[Any], fails: str) -> str | None:
    """A NUMERIC with fewer digits before the point fails where a value has more; one with
    fewer after it rounds every value."""
    precision, scale = getattr(new, "precision", None), getattr(new, "scale", None) or 0
    was, was_scale = getattr(old, "precision", None), getattr(old, "scale", None) or 0
    if precision is None:
        return None
    if was is None or precision - scale < was - was_scale:
        return f"{fails} has more than {precision - scale} digits before the point"
    if scale < was_scale:
        return f"rounds every value to {scale} decimal places on PostgreSQL"
    return None
