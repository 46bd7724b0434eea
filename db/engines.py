"""Engines for an environment's URL: the one place that decides sync or async."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, pool
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from db.environments import CONNECT_TIMEOUT
from db.errors import ConfigError, ConnectError, cause_of, first_line
from db.urls import mask

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")
_CONNECT_ERRORS = (DBAPIError, OSError, asyncio.TimeoutError)


def is_async(url: URL) -> bool:
    """Whether the URL's driver is an asyncio one (asyncpg, aiosqlite)."""
    return bool(url.get_dialect().is_async)


def make_engine(
    url: URL,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    migrating: bool = False,
    create: bool = True,
) -> Engine:
    """A pool-less sync engine; SQLite gets real transactions for DDL.

    ``migrating`` turns SQLite's foreign key enforcement off (batch mode rebuilds tables);
    env.py checks the keys itself before each revision commits. ``create=False`` (a run
    that only reads): a SQLite file not made yet reads as the empty database it would be,
    and neither it nor its folder is made.
    """
    options = _options(url, connect_timeout, migrating, create)
    if not create and sqlite_file_missing(url):
        url = url.set(database=":memory:")
    engine = create_engine(url, **options)
    _sqlite_transactions(engine, foreign_keys=not migrating)
    return engine


def make_async_engine(
    url: URL,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    migrating: bool = False,
    pool: Mapping[str, float] | None = None,
    schema: str | None = None,
    pooler: bool = False,
) -> AsyncEngine:
    """Like :func:`make_engine`, for an asyncio driver (asyncpg, aiosqlite).

    ``pool`` (``pool_size``, ``max_overflow``, ``pool_timeout``, ``pool_recycle``) gives the
    engine a real pool, checked before each use: the app's engine. Without it, none.
    ``schema`` (PostgreSQL) puts that schema alone on each connection's ``search_path``.
    ``pooler``: ``url`` may be a pooler in transaction mode (PgBouncer), which hands the
    server connection to another client between transactions. Then no prepared statement
    is named (the next server connection lacks it), and ``schema`` is set in each
    transaction, never on the connection, which the next client would get with it.
    """
    from sqlalchemy.ext.asyncio import create_async_engine  # only async runs pay for it

    options = _options(url, connect_timeout, migrating)
    if pooler and url.get_driver_name() == "asyncpg":
        options["connect_args"].update(UNCACHED_STATEMENTS, statement_cache_size=0)
    if pool is not None:
        del options["poolclass"]
        options.update(pool_pre_ping=True, **pool)
    engine = create_async_engine(url, **options)
    _sqlite_transactions(engine.sync_engine, foreign_keys=not migrating)
    if schema is not None and pooler:
        _search_path_each_transaction(engine.sync_engine, schema)
    elif schema is not None:
        _search_path(engine.sync_engine, schema)
    return engine


def _search_path(engine: Engine, schema: str) -> None:
    """Every connection works in ``schema``: unqualified names (the revisions' tables, the
    audit trail) are created and found there. A plain ``SET``, so PgBouncer in session mode
    keeps it (it refuses ``search_path`` as a startup parameter)."""
    quoted = '"' + schema.replace('"', '""') + '"'

    @event.listens_for(engine, "connect", insert=True)  # before the dialect reads its schema
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET search_path TO {quoted}")
        cursor.close()
        dbapi_connection.commit()  # the driver began a transaction: a rollback would undo it


def _search_path_each_transaction(engine: Engine, schema: str) -> None:
    """Each transaction works in ``schema`` (``SET LOCAL``, gone at its end): behind a
    pooler in transaction mode, a transaction is all that one server connection serves.
    So AUTOCOMMIT, with no transaction to set it in, is refused: it would run in whatever
    schema the server connection had."""
    statement = 'SET LOCAL search_path TO "' + schema.replace('"', '""') + '"'

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            raise ConfigError(
                f"AUTOCOMMIT cannot work in SCHEMA {schema} here: behind a pooler in "
                "transaction mode the schema is set in each transaction; run it in one"
            )
        connection.exec_driver_sql(statement)


def _options(
    url: URL, connect_timeout: float, migrating: bool, create: bool = True
) -> dict[str, Any]:
    connect_args: dict[str, Any] = {"timeout": connect_timeout}
    if _sqlite_file(url):
        _sqlite_place(Path(url.database or ""), create)
    if migrating and url.get_driver_name() == "asyncpg":
        connect_args.update(UNCACHED_STATEMENTS)
    return {"connect_args": connect_args, "poolclass": pool.NullPool}


def _sqlite_file(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")


def sqlite_file_missing(url: URL) -> bool:
    """Whether ``url`` names a SQLite file that is not there yet (a first migrate makes it)."""
    return _sqlite_file(url) and not Path(url.database or "").exists()


def _sqlite_place(path: Path, create: bool) -> None:
    """Make the SQLite file's folder (if ``create``); refuse a path that is a folder, or
    that runs through a file (where SQLite would say only "unable to open database file")."""
    if path.is_dir():
        raise ConnectError(f"{path} is a folder, not a SQLite file: point DATABASE_URL at a file")
    in_the_way = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise ConnectError(
            f"cannot create {path.parent} for the SQLite database: {in_the_way} is a file; "
            "move it, or point DATABASE_URL elsewhere"
        )
    if not create:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConnectError(
            f"cannot create {path.parent} for the SQLite database ({exc.strerror}): "
            "create it, or point DATABASE_URL elsewhere"
        ) from None


# Migration sessions keep no prepared statements: each DDL statement invalidates
# SQLAlchemy's cache of them, so a migration re-prepares them anyway, and each one it drops
# costs asyncpg a round trip to close. Unnamed statements ("") need no closing; a
# 200-revision run makes a quarter fewer round trips (measured with bench/).
UNCACHED_STATEMENTS = {
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: "",
}


def _sqlite_transactions(engine: Engine, *, foreign_keys: bool) -> None:
    """SQLAlchemy's documented recipe: let SQLite see BEGIN, so DDL rolls back too.

    A connection may ask for ``BEGIN IMMEDIATE`` with ``execution_options(sqlite_begin=...)``.
    """
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get("sqlite_begin", "BEGIN"))


# what to do when the server turns a login away, by SQLSTATE
_LOGIN_ADVICE = {
    "53300": "the server has no free connection: lower --jobs or MAX_CONNECTIONS_PER_HOST, "
    "or wait for one with --wait=SECONDS",
    "3D000": "create that database first, or fix the database name in the URL",
    "28000": "fix the user in the URL, or let it in: create the role, or add it to the "
    "server's pg_hba.conf",
    "28P01": "check the password the env file gives (DATABASE_PASSWORD)",
}
_SSL_REQUIRED = ("require", "verify-ca", "verify-full")
_NOT_POSTGRES = "is a PostgreSQL server listening on that host and port?"


def connect_error(url: URL, exc: BaseException) -> ConnectError:
    """A one-line ConnectError naming the masked URL and the driver's reason."""
    reason, text = cause_of(exc), first_line(exc)
    if isinstance(reason, (asyncio.TimeoutError, TimeoutError)):
        text = "timed out (raise CONNECT_TIMEOUT in the env file if the server is slow)"
    elif isinstance(reason, socket.gaierror):
        text = f"unknown host ({reason.strerror})"
    elif isinstance(reason, OSError) and reason.errno:
        text = f"{os.strerror(reason.errno)} (is the server running on that host and port?)"
    elif "rejected SSL upgrade" in text:  # asyncpg's, for any answer but PostgreSQL's own
        text = _no_ssl(url)
    elif text == "connection was closed in the middle of operation":  # with no reason given
        text = f"the other end closed the connection ({_NOT_POSTGRES})"
    state = getattr(reason, "sqlstate", None)
    busy = state == "53300"  # too_many_connections
    if state in _LOGIN_ADVICE:
        advice = _wrong_password(url) if state == "28P01" else _LOGIN_ADVICE[state]
        text += f" ({advice})"
    statement_pool = "statement pooling mode" in text  # PgBouncer's, refusing BEGIN
    if statement_pool:
        text += (
            " (a pooler in statement mode runs no transactions: set MIGRATION_URL in the env "
            "file to a direct URL, or a session-mode pool, for migrations)"
        )
    if url.password:
        text = text.replace(url.password, "***")
    error = ConnectError(f"cannot connect to {mask(url)}: {text}")
    error.busy = busy
    if statement_pool:  # a setting to change, as for a pooler in transaction mode
        error.exit_code = ConfigError.exit_code
    return error


def _wrong_password(url: URL) -> str:
    """What to check, when the server turned the password away: the one the env file gives,
    or, when the URL holds none, where asyncpg found one (PGPASSWORD, then a password file:
    the URL's ``?passfile=``, PGPASSFILE, ``~/.pgpass``), if anywhere."""
    password = url.password
    if password is not None:
        advice = _LOGIN_ADVICE["28P01"]
        if password != password.strip():
            advice += ": it starts or ends with a space or a newline (a secret file's last line?)"
        return advice
    none = "the env file gives no password"
    if os.environ.get("PGPASSWORD") is not None:
        return f"{none}, so PGPASSWORD in the process environment was used: check it"
    given = url.query.get("passfile") or os.environ.get("PGPASSFILE")
    with suppress(RuntimeError, KeyError):  # no home folder
        passfile = Path(str(given)) if given else Path.home() / ".pgpass"
        if passfile.is_file():
            return (
                f"{none}, so {passfile} was read: check its line for this server, database "
                "and user (asyncpg reads a \\: or \\\\ in it as written, not as : or \\)"
            )
    return f"{none}: set DATABASE_PASSWORD in it"


def _no_ssl(url: URL) -> str:
    """What "rejected SSL upgrade" means: PostgreSQL without SSL, where the URL requires it;
    else whatever answered is no PostgreSQL server (MariaDB's port, a web server's)."""
    ssl = str(url.query.get("ssl", "")).lower()
    if ssl in _SSL_REQUIRED:
        return (
            f"no SSL connection was possible, and ssl={ssl} requires one (turn ssl on in the "
            f"server; and {_NOT_POSTGRES})"
        )
    return f"what answered there does not speak PostgreSQL's protocol ({_NOT_POSTGRES})"


@contextmanager
def connect(
    engine: Engine, wait: float = 0, stopped: Callable[[], None] = lambda: None
) -> Iterator[Connection]:
    """Connect, retrying for up to ``wait`` seconds; a refused, timed-out or rejected
    login becomes ConnectError. ``stopped`` raises to end the wait (a signal)."""
    delays = backoff(wait)
    while True:
        try:
            connection = engine.connect()
            break
        except (*_CONNECT_ERRORS, sqlite3.Error) as exc:
            delay = next(delays, None)
            if delay is None:
                raise connect_error(engine.url, exc) from exc
            for nap in naps(delay, stopped):
                time.sleep(nap)
    with connection:
        yield connection


@asynccontextmanager
async def connect_async(
    engine: AsyncEngine, wait: float = 0, stopped: Callable[[], None] = lambda: None
) -> AsyncIterator[AsyncConnection]:
    """Like :func:`connect`, for an async engine; ``stopped`` also ends an attempt that the
    server holds (one that accepts and never answers would hold it for CONNECT_TIMEOUT)."""
    delays = backoff(wait)
    while True:
        try:
            connection = await _attempt(engine, stopped)
            break
        except Exception as exc:  # SQLAlchemy 2.0 lets asyncpg's own errors through
            if not isinstance(exc, _CONNECT_ERRORS) and not _from_driver(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise connect_error(engine.url, exc) from exc
            for nap in naps(delay, stopped):
                await asyncio.sleep(nap)
    try:
        yield connection
    finally:
        await connection.close()


async def _attempt(engine: AsyncEngine, stopped: Callable[[], None]) -> AsyncConnection:
    """One try at connecting, given up (cancelled) when ``stopped`` raises."""
    attempt = asyncio.ensure_future(engine.connect())
    try:
        while not attempt.done():
            stopped()
            await asyncio.wait({attempt}, timeout=0.1)
    except BaseException:
        attempt.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await attempt
        raise
    return attempt.result()


def _from_driver(exc: BaseException) -> bool:
    """An error the database driver raised while connecting (asyncpg's own classes)."""
    return type(exc).__module__.split(".")[0] == "asyncpg"


def backoff(wait: float) -> Iterator[float]:
    """Delays between attempts that fit in ``wait`` seconds: 0.25, 0.5, 1, 2, 4, 5, 5..."""
    deadline, delay = time.monotonic() + wait, 0.25
    while (left := deadline - time.monotonic()) > 0:
        yield min(delay, left)
        delay = min(delay * 2, 5.0)


def naps(seconds: float, stopped: Callable[[], None]) -> Iterator[float]:
    """``seconds`` in naps of at most 0.1 s, calling ``stopped`` before each: a signal's
    handler runs during a sleep but does not end it, so ``stopped`` raises instead."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        stopped()
        yield min(left, 0.1)


def with_connection(
    url: URL,
    fn: Callable[[Connection], T],
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    wait: float = 0,
    schema: str | None = None,
    stopped: Callable[[], None] = lambda: None,
) -> T:
    """Run ``fn`` on a new connection to ``url``, through the sync or async driver it names;
    retry connecting for ``wait`` seconds, unless ``stopped`` raises (a signal: as for
    :func:`connect_async`). ``schema``: as for :func:`make_async_engine`.
    What ``fn`` does (a read, mostly: status goes through ``DATABASE_URL`` where there is
    no ``MIGRATION_URL``) works through a pooler in transaction mode too."""
    if is_async(url):
        engine = make_async_engine(url, connect_timeout=connect_timeout, schema=schema, pooler=True)
        return run_coroutine(_with_async(engine, fn, wait, stopped))
    sync_engine = make_engine(url, connect_timeout=connect_timeout, create=False)  # reads
    try:
        with connect(sync_engine, wait, stopped) as connection:
            return fn(connection)
    finally:
        sync_engine.dispose()


async def _with_async(
    engine: AsyncEngine, fn: Callable[[Connection], T], wait: float, stopped: Callable[[], None]
) -> T:
    try:
        async with connect_async(engine, wait, stopped) as connection:
            return await connection.run_sync(fn)
    finally:
        await engine.dispose()


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
        in_a_loop = True
    except RuntimeError:  # the usual case; asyncio.run below, outside this handler
        in_a_loop = False
    if not in_a_loop:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coro).result()
