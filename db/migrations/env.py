"""Alembic's environment: offline SQL, sync SQLite, async PostgreSQL, or a caller's connection.

The URL arrives as ``config.attributes["url"]`` (a SQLAlchemy URL object, so a password never
passes through ConfigParser) and the run's settings as ``config.attributes["settings"]``.
A caller may instead hand over an Engine or a Connection as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from contextlib import nullcontext
from logging.config import fileConfig
from typing import TYPE_CHECKING, Any

from alembic import context
from alembic.operations import MigrationScript
from sqlalchemy import Connection, text

from db.engines import (
    connect,
    connect_async,
    is_async,
    make_async_engine,
    make_engine,
    run_coroutine,
)
from db.errors import ConfigError, MigrationFailed
from db.locks import pg_lock, sqlite_run
from db.runner import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
settings: Settings = config.attributes.get("settings") or Settings(environment="?")
VERSION_TABLE = "alembic_version"


def skip_empty_autogenerate(_context: Any, _revision: Any, directives: list[Any]) -> None:
    """Write no revision file when autogenerate finds no difference."""
    script: MigrationScript = directives[0]
    if script.upgrade_ops is not None and script.upgrade_ops.is_empty():
        directives[:] = []


def check_foreign_keys(ctx: Any, **_kw: Any) -> None:
    """SQLite runs migrations with foreign keys off; refuse to commit a revision that broke them."""
    if ctx.dialect.name == "sqlite" and not ctx.as_sql:
        broken = ctx.connection.execute(text("PRAGMA foreign_key_check")).fetchall()
        if broken:
            tables = ", ".join(sorted({row[0] for row in broken}))
            raise MigrationFailed(f"the revision leaves rows with broken foreign keys in {tables}")


def include_name(name: str | None, type_: str, _parents: Any) -> bool:
    """Autogenerate leaves the tool's own tables alone."""
    return not (type_ == "table" and name in (VERSION_TABLE, "migration_log"))


def target_metadata() -> Any:
    """The models' metadata, imported only by the runs that compare against it."""
    if not settings.models:
        return None
    from db.models import Base

    return Base.metadata


def options(*after_each: Any) -> dict[str, Any]:
    """``context.configure`` options shared by every path."""
    return {
        "target_metadata": target_metadata(),
        "version_table": VERSION_TABLE,
        "render_as_batch": True,  # revisions must also run on SQLite, which alters by copying
        "transaction_per_migration": True,
        "process_revision_directives": skip_empty_autogenerate,
        "include_name": include_name,
        "on_version_apply": [
            check_foreign_keys,
            *config.attributes.get("on_version_apply", []),
            *after_each,
        ],
    }


def run_migrations_offline() -> None:
    """Print the SQL for the URL's dialect, with values inlined; connect to nothing."""
    context.configure(
        url=url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **options()
    )
    if url().get_backend_name() == "postgresql":
        for name, value in {
            **settings.server_settings,
            "standard_conforming_strings": "on",
        }.items():
            if name != "client_connection_check_interval":
                context.execute(f"SET {name} = '{value}'")
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection, *after_each: Any) -> None:
    context.configure(connection=connection, **options(*after_each))
    with context.begin_transaction():
        context.run_migrations()


def run_sqlite(connection: Connection) -> None:
    """One write transaction for the whole run, a savepoint per revision.

    SQLite has no DDL that must run outside a transaction, so a revision's
    ``autocommit_block()`` (there for PostgreSQL) runs inside it, keeping the revision atomic.
    """
    with sqlite_run(connection, settings.lock_wait, settings.note) as next_revision:
        context.configure(connection=connection, **options(lambda **_kw: next_revision()))
        context.get_context().autocommit_block = nullcontext  # type: ignore[method-assign, assignment]
        with context.begin_transaction():
            context.run_migrations()


async def run_async_migrations(engine: AsyncEngine) -> None:
    try:
        if settings.lock:
            async with pg_lock(
                engine, VERSION_TABLE, settings.lock_wait, settings.note, settings.wait
            ):
                async with connect_async(engine) as connection:
                    await connection.run_sync(do_run_migrations)
                    await connection.commit()  # what a run wrote outside any revision
        else:
            async with connect_async(engine, settings.wait) as connection:
                await connection.run_sync(do_run_migrations)
                await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Use the caller's connection or engine, else one built from the URL, sync or async."""
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        do_run_migrations(given)
        return
    if given is not None and hasattr(given, "sync_engine"):  # a caller's AsyncEngine
        run_coroutine(run_async_migrations(given))
        return
    engine_options: dict[str, Any] = {
        "connect_timeout": settings.connect_timeout,
        "migrating": True,
        "server_settings": settings.server_settings,
    }
    if given is None and is_async(url()):
        run_coroutine(run_async_migrations(make_async_engine(url(), **engine_options)))
        return
    engine = given or make_engine(url(), **engine_options)
    with connect(engine, settings.wait) as connection:
        if settings.lock and connection.dialect.name == "sqlite":
            run_sqlite(connection)
        else:
            do_run_migrations(connection)
            connection.commit()
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
