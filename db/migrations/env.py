"""Alembic's environment: offline SQL, sync SQLite, async PostgreSQL, or a caller's connection.

The run arrives as one typed object, ``config.attributes["run"]`` (:class:`db.runner.Run`):
the URL (an object, so a password never passes through ConfigParser), the settings, and the
progress hooks. A caller may instead hand over an Engine or a Connection as
``config.attributes["connection"]``; a caller's engine is the caller's to dispose of.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from alembic import context
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import Connection, MetaData, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db import generated_columns, offline  # noqa: F401  (offline: text compiled with its values)
from db.autogen import (
    AUTOGENERATE,
    comparable,
    include_name,
    register_plugin,
)
from db.batch_copies import refuse_postgresql_copies, unreflected_indexes_unsaid
from db.connections import connect, connect_async, run_coroutine
from db.engines import is_async, make_async_engine, make_engine
from db.errors import BrokenModels, MigrationFailed
from db.failures import describe
from db.locks import (
    Fence,
    canceller,
    extensions_in_turn,
    lock_timeout_for_this_read,
    pg_lock,
    prepare_session,
    sqlite_run,
)
from db.rendering import render_item, skip_empty
from db.runner import Run, configure_logging
from db.sequences import check_sequences, inserts_noted
from db.versions import VERSION_TABLE, version_of

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

config = context.config
ONLINE_ONLY = {
    "client_connection_check_interval",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    # psql has its own (libpq's keepalives_idle, ...), and the SQL may go through any client
    *("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count"),
    "tcp_user_timeout",
}
if config.config_file_name is not None:
    configure_logging(config.config_file_name)


def the_run() -> Run:
    """The invoke tasks' Run, or one built from ``sqlalchemy.url`` for plain Alembic use."""
    if "run" in config.attributes:
        found: Run = config.attributes["run"]
        return found
    url = config.get_main_option("sqlalchemy.url")
    if not url and "connection" not in config.attributes:  # `alembic upgrade head`, typed
        raise CommandError(  # which Alembic's command line says in one line, as FAILED: ...
            "no database URL: migrate through the invoke tasks (`invoke migrate --env=dev`), "
            "which give Alembic the environment's"
        )
    return Run(environment="", url=make_url(url or "sqlite://"))


run = the_run()


def check_foreign_keys(ctx: MigrationContext, **_kw: Any) -> None:
    """SQLite runs migrations with foreign keys off; refuse to commit a revision that broke them."""
    if ctx.dialect.name == "sqlite" and not ctx.as_sql and ctx.connection is not None:
        broken = ctx.connection.execute(text("PRAGMA foreign_key_check")).fetchall()
        if broken:
            tables = ", ".join(sorted({row[0] for row in broken}))
            raise MigrationFailed(f"the revision leaves rows with broken foreign keys in {tables}")


def target_metadata() -> MetaData | None:
    """The models' metadata, imported only by the runs that compare against it; a models
    file that cannot be imported is named, with its line, not a traceback."""
    if not run.models:
        return None
    try:
        from db.models import Base
    except Exception as exc:
        raise BrokenModels.of(exc) from exc
    return comparable(Base.metadata)


OnApply = Callable[..., None]  # Alembic's on_version_apply hook: (ctx, step, heads, run_args)


def options(checks: tuple[OnApply, ...] = (), last: tuple[OnApply, ...] = ()) -> dict[str, Any]:
    """``context.configure`` options shared by every path.

    Before each revision commits: the foreign key (SQLite) and sequence (PostgreSQL) checks,
    ``checks``, the audit row, ``last``.
    """
    audit_row = [run.progress.after_each] if run.progress is not None else []
    register_plugin()  # named in autogenerate_plugins
    generated_columns.register()  # SQLite's batch copies, and reflection, of sa.Computed
    refuse_postgresql_copies()  # recreate="always" on PostgreSQL
    return {
        "target_metadata": target_metadata(),
        "version_table": VERSION_TABLE,
        "version_table_schema": run.schema,
        "render_as_batch": True,  # revisions must also run on SQLite, which alters by copying
        "transaction_per_migration": True,
        "process_revision_directives": skip_empty,
        "include_name": include_name,
        "compare_server_default": True,  # off in Alembic: a changed default unseen
        "autogenerate_plugins": AUTOGENERATE,
        "render_item": render_item,
        "on_version_apply": [check_foreign_keys, check_sequences, *checks, *audit_row, *last],
    }


def run_migrations_offline() -> None:
    """Print the SQL for the URL's dialect, with values inlined; connect to nothing."""
    context.configure(
        url=run.url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **options()
    )
    if run.url.get_backend_name() == "postgresql":
        for name, value in {**run.session_settings, "standard_conforming_strings": "on"}.items():
            if name not in ONLINE_ONLY:
                # text() would read ":word" in the value as a parameter: \\: is a colon
                context.execute(f"SET {name} = {sql_string(value)}".replace(":", "\\:"))
        if run.schema:  # made only if missing, as online (see create_schema)
            context.execute(
                f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = "
                f"'{run.schema}') THEN CREATE SCHEMA \"{run.schema}\"; END IF; END$$"
            )
            path = ", ".join(f'"{schema}"' for schema in run.search_path)
            context.execute(f"SET search_path TO {path}")
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection, fence: Fence | None = None) -> None:
    checks: tuple[OnApply, ...] = ()
    if run.progress is not None:  # it checks the lock with each step's audit row
        run.progress.fence = fence
    elif fence is not None:
        checks = (lambda ctx, **_kw: fence.check(ctx.connection),)
    if run.schema and run.lock:
        create_schema(connection, run.schema)
    context.configure(connection=connection, **options(checks))
    guard_blocks(fence)
    with context.begin_transaction(), own_transactions_refused(connection):
        tenant = run.schema if run.shared_schemas else None
        with inserts_noted(connection), extensions_in_turn(connection, tenant):
            context.run_migrations()


def sql_string(value: str) -> str:
    """``value`` as a PostgreSQL string literal (APPLICATION_NAME=bob's deploy): an E''
    string where it holds a backslash, read alike whatever standard_conforming_strings is."""
    quoted = value.replace("'", "''")
    if "\\" not in value:
        return f"'{quoted}'"
    escaped = quoted.replace("\\", "\\\\")
    return f"E'{escaped}'"


def create_schema(connection: Connection, schema: str) -> None:
    """The run's schema, made if missing and committed now (Alembic runs all in one open
    transaction). One that is there needs no CREATE on the database, which PostgreSQL
    checks even for ``IF NOT EXISTS``: a DBA may have made it for the migrating role."""
    there = text("select 1 from pg_namespace where nspname = :name")
    if connection.execute(there, {"name": schema}).first() is None:
        try:
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        except DBAPIError as exc:
            raise MigrationFailed(
                f"cannot create schema {schema}: {describe(exc)}\nno revision was run; create "
                f"it for the migrating role (CREATE SCHEMA {schema} AUTHORIZATION role), or "
                "grant that role CREATE on the database"
            ) from exc
    connection.commit()


def own_transactions_refused(connection: Connection) -> AbstractContextManager[None]:
    """A revision may not end its own transaction (``op.execute("COMMIT")``)."""
    return run.progress.keeping_transactions(connection) if run.progress else nullcontext()


def guard_blocks(fence: Fence | None) -> None:
    """Before a non-transactional block: check the lock, leave an audit row, note statements."""
    ctx = context.get_context()
    plain, progress = ctx.autocommit_block, run.progress

    @contextmanager
    def guarded() -> Iterator[None]:
        if fence is not None and ctx.connection is not None:
            fence.check(ctx.connection)
        if progress is None or ctx.connection is None:
            with plain():
                yield
            return
        progress.before_block(ctx)
        with plain(), progress.noting_statements(ctx.connection):
            yield

    ctx.autocommit_block = guarded  # type: ignore[method-assign]


def run_sqlite(connection: Connection) -> None:
    """One write transaction for the whole run, a savepoint per revision.

    SQLite has no DDL that must run outside a transaction, so a revision's
    ``autocommit_block()`` (there for PostgreSQL) runs inside it, keeping the revision atomic.
    """
    committed = run.progress.committed if run.progress is not None else lambda: None
    sqlite = connection.connection.driver_connection
    # SQLite calls this every 10,000 steps of a statement: a signal's handler gets to run
    # then, and a stop it asked for ends the statement (rolled back to the revision's start)
    sqlite.set_progress_handler(lambda: run.stop.requested, 10_000)  # type: ignore[union-attr]
    with sqlite_run(
        connection, run.lock_wait, run.note, committed, run.stop.check
    ) as next_revision:
        last = (lambda **_kw: next_revision(),)
        context.configure(connection=connection, **options(last=last))
        context.get_context().autocommit_block = nullcontext  # type: ignore[method-assign, assignment]
        with context.begin_transaction(), own_transactions_refused(connection):
            context.run_migrations()


def run_on(connection: Connection) -> None:
    """A sync connection's run: SQLite's single transaction when locked, else Alembic's own."""
    if run.lock and connection.dialect.name == "sqlite":
        run_sqlite(connection)
    else:
        do_run_migrations(connection)
        connection.commit()


def wanted(connection: Connection) -> bool:
    """Whether a changing run goes on to take the lock: ``run.before_lock`` decides from the
    revision(s) read without it, and what else it reads on the connection (the read's
    transaction ends here)."""
    if not run.lock or run.before_lock is None:
        return True
    lock_timeout_for_this_read(connection, run.session_settings)
    go = run.before_lock(version_of(connection, run.schema), connection)
    connection.rollback()
    return go


async def run_async_migrations(engine: AsyncEngine, *, owned: bool) -> None:
    try:
        async with connect_async(engine, run.wait, run.stop.check, run.busy_advice) as connection:
            if run.lock:
                if await connection.run_sync(wanted):
                    await migrate_locked(connection, engine)
            else:
                await connection.run_sync(do_run_migrations)
                await connection.commit()
    finally:
        if owned:
            await engine.dispose()


async def migrate_locked(connection: AsyncConnection, engine: AsyncEngine) -> None:
    """The migration session: settings checked, the lock held on it, revisions run on it."""
    pid = await prepare_session(connection, engine, run.session_settings, run.env_file)
    cancel = canceller(run.url, pid, run.connect_timeout, run.network_timeout)
    forget = run.stop.on_request(lambda: None if in_block() else cancel())
    try:
        lock = pg_lock(connection, pid, run.lock_name, run.lock_wait, run.note, run.stop.check)
        async with lock as fence:
            await connection.run_sync(do_run_migrations, fence)
            await connection.commit()  # what a run wrote outside any revision
    finally:
        forget()


def in_block() -> bool:
    """Whether a revision is inside its non-transactional part, which must not be cut short."""
    return run.progress is not None and run.progress.in_block


def run_migrations_online() -> None:
    """Use the caller's connection or engine, else one built from the URL, sync or async."""
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        do_run_migrations(given)
        return
    if given is not None and hasattr(given, "sync_engine"):  # a caller's AsyncEngine
        run_coroutine(run_async_migrations(given, owned=False))
        return
    if given is None and is_async(run.url):
        engine = make_async_engine(
            run.url,
            connect_timeout=run.connect_timeout,
            migrating=True,
            search_path=run.search_path,
            network_timeout=run.network_timeout,
        )
        run_coroutine(run_async_migrations(engine, owned=True))
        return
    sync_engine = given or make_engine(
        run.url, connect_timeout=run.connect_timeout, migrating=True, create=run.creates
    )
    connected = connect(sync_engine, run.wait, run.stop.check, run.busy_advice)
    with connected as connection, unreflected_indexes_unsaid():
        if wanted(connection):
            run_on(connection)
    if given is None:
        sync_engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
