"""Alembic's environment: offline SQL, sync SQLite, async PostgreSQL, or a caller's connection.

The URL arrives as ``config.attributes["url"]`` (a SQLAlchemy URL object, so a password never
passes through ConfigParser). A caller may instead hand over an Engine or a Connection as
``config.attributes["connection"]``.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.operations import MigrationScript
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engines import CONNECT_TIMEOUT, connect, connect_async, make_engine, run_coroutine
from db.errors import ConfigError, MigrationFailed
from db.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def skip_empty_autogenerate(_context: Any, _revision: Any, directives: list[Any]) -> None:
    """Write no revision file when autogenerate finds no difference."""
    script: MigrationScript = directives[0]
    if script.upgrade_ops is not None and script.upgrade_ops.is_empty():
        directives[:] = []


def check_foreign_keys(ctx: Any, **_kw: Any) -> None:
    """SQLite runs migrations with foreign keys off; refuse to commit a revision that broke them."""
    if ctx.dialect.name == "sqlite":
        broken = ctx.connection.execute(text("PRAGMA foreign_key_check")).fetchall()
        if broken:
            tables = ", ".join(sorted({row[0] for row in broken}))
            raise MigrationFailed(f"the revision leaves rows with broken foreign keys in {tables}")


def options() -> dict[str, Any]:
    """``context.configure`` options shared by every path."""
    return {
        "target_metadata": Base.metadata,
        "render_as_batch": True,  # revisions must also run on SQLite, which alters by copying
        "transaction_per_migration": True,
        "process_revision_directives": skip_empty_autogenerate,
        "on_version_apply": [check_foreign_keys, *config.attributes.get("on_version_apply", [])],
    }


def run_migrations_offline() -> None:
    """Print the SQL for the URL's dialect, with values inlined; connect to nothing."""
    context.configure(
        url=url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **options()
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, **options())
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(engine: AsyncEngine) -> None:
    async with connect_async(engine) as connection:
        await connection.run_sync(do_run_migrations)


def run_migrations_online() -> None:
    """Use the caller's connection or engine, else one built from the URL, sync or async."""
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        do_run_migrations(given)
        return
    timeout = config.attributes.get("connect_timeout", CONNECT_TIMEOUT)
    engine = given or make_engine(url(), connect_timeout=timeout, migrating=True)
    if isinstance(engine, AsyncEngine):
        run_coroutine(run_async_migrations(engine))
        return
    with connect(engine) as connection:
        do_run_migrations(connection)
    if given is None:
        engine.dispose()


def url() -> Any:
    found = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not found:
        raise ConfigError("no database URL: run migrations through the invoke tasks")
    return found


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
