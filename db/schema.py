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


def differences(left: Schema, right: Schema) -> list[str]:
    """Readable differences between two pictures, empty when they agree."""
    lines = [f"table {t} only on one side" for t in sorted(set(left) ^ set(right))]
    for table in sorted(set(left) & set(right)):
        for part in left[table]:
            if left[table][part] != right[table][part]:
                lines.append(f"{table}.{part}: {left[table][part]} != {right[table][part]}")
    return lines
