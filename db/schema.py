"""A comparable picture of a database's schema: tables, columns, keys, indexes, names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, inspect

from db.connections import with_database
from db.environments import Environment

Schema = dict[str, dict[str, Any]]
TOOL_TABLES = {"alembic_version", "migration_log"}


def snapshot(env: Environment, stopped: Callable[[], None] = lambda: None) -> Schema:
    """Each table's columns (kind, nullable), primary key, foreign keys, uniques, indexes;
    ``stopped`` raises to give up connecting (a signal)."""
    return with_database(env, picture, stopped)


def picture(connection: Connection) -> Schema:
    found = inspect(connection)
    tables: Schema = {}
    for name in sorted(set(found.get_table_names()) - TOOL_TABLES):
        primary = found.get_pk_constraint(name)
        tables[name] = {
            "columns": {
                c["name"]: (kind(c["type"]), c["nullable"]) for c in found.get_columns(name)
            },
            "primary_key": (primary["name"], tuple(primary["constrained_columns"])),
            "foreign_keys": sorted(
                (
                    fk["name"],
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                )
                for fk in found.get_foreign_keys(name)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"])) for u in found.get_unique_constraints(name)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in found.get_indexes(name)
                if not i.get("duplicates_constraint")
            ),
        }
    return tables


def kind(type_: Any) -> str:
    """What a column holds, in terms both backends share: int, str, Decimal, datetime..."""
    try:
        return str(type_.python_type.__name__)
    except NotImplementedError:
        return type(type_).__name__.lower()


def differences(
    left: Schema, right: Schema, sides: tuple[str, str] = ("on one side", "on the other")
) -> list[str]:
    """Readable differences between two pictures, each said with the side it is on
    (``sides``, e.g. ``in the database``), empty when they agree."""
    lines = [f"table {t} only {_side(t in left, sides)}" for t in sorted(set(left) ^ set(right))]
    for table in sorted(set(left) & set(right)):
        ours, theirs = left[table], right[table]
        for column in sorted(set(ours["columns"]) | set(theirs["columns"])):
            lines += _column(table, column, ours["columns"], theirs["columns"], sides)
        for part in ("primary_key", "foreign_keys", "unique", "indexes"):
            lines += _part(f"{table} {part.replace('_', ' ')}", ours[part], theirs[part], sides)
    return lines


def _side(on_the_left: bool, sides: tuple[str, str]) -> str:
    return sides[0] if on_the_left else sides[1]


def _column(
    table: str, column: str, left: dict[str, Any], right: dict[str, Any], sides: tuple[str, str]
) -> list[str]:
    """How a column differs: only on one side, or in its kind or nullability."""
    name = f"{table}.{column}"
    if (column in left) != (column in right):
        return [f"column {name} only {_side(column in left, sides)}"]
    if left[column] == right[column]:
        return []
    said = [
        f"{kind} {'NULL' if nullable else 'NOT NULL'}"
        for kind, nullable in (left[column], right[column])
    ]
    return [f"column {name} is {said[0]} {sides[0]}, {said[1]} {sides[1]}"]


def _part(what: str, left: Any, right: Any, sides: tuple[str, str]) -> list[str]:
    """How a table's keys or indexes differ: each one only on one side (the primary key,
    one value, as it is on each)."""
    if left == right:
        return []
    if not isinstance(left, list):
        return [f"{what} is {left} {sides[0]}, {right} {sides[1]}"]
    only = [(item, True) for item in left if item not in right]
    only += [(item, False) for item in right if item not in left]
    return [f"{what} {item} only {_side(here, sides)}" for item, here in only]
