"""How a draft is written: types and server defaults as the models give them, where
Alembic's own rendering would not run, on the other dialect or at all.

Passed to ``context.configure`` by env.py as ``render_item``.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from alembic.operations import MigrationScript
from alembic.operations.ops import (
    CreateIndexOp,
    DropIndexOp,
    MigrateOperation,
    ModifyTableOps,
)
from alembic.runtime.migration import MigrationContext
from sqlalchemy import DefaultClause, Index
from sqlalchemy.sql.elements import False_, True_
from sqlalchemy.types import TypeDecorator, TypeEngine

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.ddl.impl import DefaultImpl


def skip_empty(
    _context: MigrationContext, _revision: object, directives: list[MigrationScript]
) -> None:
    """Write no revision file when autogenerate finds no difference."""
    script = directives[0]
    if script.upgrade_ops is not None and script.upgrade_ops.is_empty():
        directives[:] = []


def own_blocks(script: MigrationScript) -> None:
    """Each index on an expression, or partial on SQLite, made in a batch block of its own
    after the table's other changes (dropped in one before them). Where SQLite copies the
    table for those, Alembic's copy cannot make such an index (``KeyError: 'lower(name)'``)
    and drops its ``sqlite_where`` (its issue #1112); alone, the index is made in place."""
    for ops in (script.upgrade_ops, script.downgrade_ops):
        if ops is not None:
            ops.ops[:] = [split for op in ops.ops for split in _own_blocks(op)]


def _own_blocks(op: MigrateOperation) -> list[MigrateOperation]:
    """``op``, a table's changes, with its drops of such indexes before it, and the indexes
    it makes after it, each in a block of its own."""
    if not isinstance(op, ModifyTableOps):
        return [op]
    apart = [each for each in op.ops if isinstance(each, CreateIndexOp | DropIndexOp)]
    apart = [each for each in apart if _copy_breaks(each.to_index())]
    if not apart or len(apart) == len(op.ops):
        return [op]
    rest = [each for each in op.ops if each not in apart]
    dropped = [each for each in apart if isinstance(each, DropIndexOp)]
    made = [each for each in apart if isinstance(each, CreateIndexOp)]
    blocks = [ModifyTableOps(op.table_name, ops, schema=op.schema) for ops in (dropped, rest, made)]
    return [block for block in blocks if block.ops]


def _copy_breaks(index: Index) -> bool:
    """Whether SQLite's batch copy mishandles ``index``: on an expression, or partial."""
    from alembic.util.sqla_compat import is_expression_index

    return is_expression_index(index) or index.dialect_kwargs.get("sqlite_where") is not None


def render_item(type_: str, obj: object, autogen_context: AutogenContext) -> str | bool:
    """Revisions spell the models' UTCDateTime as the plain type it stores, PostgreSQL's
    types as they are written against PostgreSQL, an enum type that a new table must not
    make again with its ``create_type=False`` (older SQLAlchemy leaves it out), and a
    server default as the models give it: Alembic strips a quote that starts or ends a
    string (``"it's 'new'"`` was written ``"it's 'new"``), and writes ``sa.false()`` as
    SQLite compiles it, ``sa.text("0")``, which PostgreSQL refuses for a boolean."""
    if type_ == "type":
        return _type(obj, autogen_context) if isinstance(obj, TypeEngine) else False
    default = obj.arg if type_ == "server_default" and isinstance(obj, DefaultClause) else None
    if isinstance(default, str):
        return repr(default)
    if isinstance(default, True_ | False_):
        return "sa.true()" if isinstance(default, True_) else "sa.false()"
    return False


def _type(type_: TypeEngine[Any], autogen_context: AutogenContext) -> str | bool:
    """An enum type made elsewhere (see above); a type decorator of the models' (UTCDateTime)
    as the types it stores; and a type of PostgreSQL's (JSONB, ARRAY: a variant's) as Alembic
    renders it against PostgreSQL: against dev's SQLite it wrote ``JSONB(astext_type=Text())``,
    a name the revision never imports."""
    if getattr(type_, "create_type", True) is False:
        from db.enum_types import made_elsewhere

        return made_elsewhere(type_, autogen_context) or False
    module = type(type_).__module__
    if isinstance(type_, TypeDecorator) and not module.startswith("sqlalchemy."):
        from alembic.autogenerate.render import _repr_type

        return _repr_type(_stored(type_), autogen_context)
    dialect = re.match(r"sqlalchemy\.dialects\.(\w+)", module)
    if dialect is None or autogen_context.dialect is None:
        return False
    if dialect.group(1) == autogen_context.dialect.name:
        return False
    if autogen_context.imports is not None:
        autogen_context.imports.add(f"from sqlalchemy.dialects import {dialect.group(1)}")
    return _impl_of(dialect.group(1)).render_type(type_, autogen_context)


def _stored(type_: TypeDecorator[Any]) -> TypeEngine[Any]:
    """What a type decorator of the models' stores, for a revision to name: Alembic wrote
    the decorator itself (``db.models.Money()``), a name the revision never imports, and
    one it must not, as the models change after it. Where the decorator stores another
    type on one of the dialects (``load_dialect_impl``), that is its variant there, as are
    the variants the models give it. (SQLAlchemy's own decorators, ``sa.Interval``, are
    Alembic's to render.)"""
    given: dict[str, TypeEngine[Any]] = getattr(type_, "_variant_mapping", {})
    stored = type_.impl_instance
    for name in sorted({"postgresql", "sqlite", *given}):
        own = given[name] if name in given else type_.load_dialect_impl(_impl_of(name).dialect)
        if repr(own) != repr(stored):
            stored = stored.with_variant(_named(own), name)
    return stored


def _named(type_: TypeEngine[Any]) -> TypeEngine[Any]:
    """``type_`` as a type a revision can name (``sa.UUID``, ``postgresql.JSONB``), where a
    dialect gave its driver's own (``dialect.type_descriptor(UUID())`` is ``PGUuid``)."""
    import sqlalchemy
    from sqlalchemy.dialects import postgresql, sqlite

    namespaces = (sqlalchemy, postgresql, sqlite)  # sa., postgresql., sqlite.
    for kind in type(type_).__mro__:
        if any(getattr(names, kind.__name__, None) is kind for names in namespaces):
            return type_ if kind is type(type_) else type_.adapt(kind)
    return type_


@functools.cache
def _impl_of(dialect: str) -> DefaultImpl:
    """Alembic's implementation for ``dialect``, as an offline migration would have it."""
    return MigrationContext.configure(dialect_name=dialect).impl
