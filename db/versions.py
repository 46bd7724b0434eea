"""A database's revision(s), as its version table holds them."""

from __future__ import annotations

from collections.abc import Callable

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, column, table
from sqlalchemy.engine import URL

from db.connections import with_connection
from db.environments import NETWORK_TIMEOUT

VERSION_TABLE = "alembic_version"
VERSION_ID_MAX = 32  # characters: Alembic's alembic_version.version_num is a VARCHAR(32)


def current_heads(
    url: URL,
    connect_timeout: float,
    schema: str | None = None,
    wait: float = 0,
    stopped: Callable[[], None] = lambda: None,
    network_timeout: float = NETWORK_TIMEOUT,
) -> tuple[str, ...]:
    """The revision(s) in a database's version table, read without env.py or the lock;
    ``stopped`` raises to give up connecting (a signal to a fleet's status)."""

    def read(connection: Connection) -> tuple[str, ...]:
        return version_of(connection, schema)

    return with_connection(
        url,
        read,
        connect_timeout=connect_timeout,
        wait=wait,
        search_path=(schema,) if schema else (),
        stopped=stopped,
        network_timeout=network_timeout,
    )


def applied_revisions(script: ScriptDirectory, current: tuple[str, ...]) -> set[str]:
    """Every revision applied to a database whose version table holds ``current``."""
    return {rev.revision for rev in script.revision_map.iterate_revisions(current, "base")}


def version_of(connection: Connection, schema: str | None = None) -> tuple[str, ...]:
    """The revision(s) in the version table, read on ``connection``."""
    opts = {"version_table": VERSION_TABLE, "version_table_schema": schema}
    return tuple(MigrationContext.configure(connection, opts=opts).get_current_heads())


def has_revision(script: ScriptDirectory, rev: str) -> bool:
    """Whether a revision file has the id ``rev``."""
    try:
        script.get_revision(rev)
    except CommandError:
        return False
    return True


def clear_versions(connection: Connection, schema: str | None = None) -> None:
    """Empty the version table (in the run's transaction): a stamp then starts from base."""
    connection.execute(table(VERSION_TABLE, column("version_num"), schema=schema).delete())
