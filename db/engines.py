"""Engines for an environment's URL: the one place that decides sync or async. Connecting
through them (retries, a signal's stop, a failed login in words) is :mod:`db.connections`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, pool
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from db.batch_copies import keep_dependents
from db.environments import CONNECT_TIMEOUT, NETWORK_TIMEOUT
from db.errors import ConfigError, ConnectError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

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
    if migrating and engine.dialect.name == "sqlite":
        keep_dependents(engine)
    return engine


def make_async_engine(
    url: URL,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    migrating: bool = False,
    pool: Mapping[str, float] | None = None,
    search_path: Sequence[str] = (),
    pooler: bool = False,
    network_timeout: float = NETWORK_TIMEOUT,
) -> AsyncEngine:
    """Like :func:`make_engine`, for an asyncio driver (asyncpg, aiosqlite).

    ``pool`` (``pool_size``, ``max_overflow``, ``pool_timeout``, ``pool_recycle``) gives the
    engine a real pool, checked before each use: the app's engine. Without it, none. On
    SQLite the app's transactions begin ``IMMEDIATE``: two that read and then write at once
    would otherwise each wait for the other's read lock, and SQLite fails one at once
    (``database is locked``) where PostgreSQL runs both; now the second waits its turn.
    ``search_path`` (PostgreSQL: ``SCHEMA``, then ``SHARED_SCHEMAS``) is each connection's.
    ``pooler``: ``url`` may be a pooler in transaction mode (PgBouncer), which hands the
    server connection to another client between transactions. Then no prepared statement
    is named (the next server connection lacks it), and ``search_path`` is set in each
    transaction, never on the connection, which the next client would get with it.
    ``network_timeout``: see :func:`keepalive`.
    """
    from sqlalchemy.ext.asyncio import create_async_engine  # only async runs pay for it

    options = _options(url, connect_timeout, migrating)
    if pooler and url.get_driver_name() == "asyncpg":
        options["connect_args"].update(UNCACHED_STATEMENTS, statement_cache_size=0)
    if pool is not None:
        del options["poolclass"]
        options.update(pool_pre_ping=True, **pool)
        if url.get_backend_name() == "sqlite":  # the app's handlers write at once
            options["execution_options"] = {"sqlite_begin": "BEGIN IMMEDIATE"}
    engine = create_async_engine(url, **options)
    _sqlite_transactions(engine.sync_engine, foreign_keys=not migrating)
    if url.get_driver_name() == "asyncpg" and network_timeout > 0:
        _keepalive(engine.sync_engine, network_timeout)
    if search_path and pooler:
        _search_path_each_transaction(engine.sync_engine, search_path)
    elif search_path:
        _search_path(engine.sync_engine, search_path)
    return engine


def keepalive(seconds: float) -> tuple[int, int, int]:
    """TCP keepalive for a network that may go silent (a partition, a host gone): probe
    after ``idle`` seconds without traffic, every ``interval`` seconds, give up after
    ``count`` probes unanswered, about ``seconds`` in all. A busy peer's kernel answers the
    probes, so a long statement is never cut short; only a peer that is gone is given up."""
    count = 4
    idle = max(1, int(seconds // 3))
    return idle, max(1, int((seconds - idle) // count)), count


def _keepalive(engine: Engine, seconds: float) -> None:
    """Give up a server that stops answering after about ``seconds`` (else a partition
    mid-run leaves the task waiting for good): keepalive, and ``TCP_USER_TIMEOUT`` for data
    sent and never acknowledged. asyncpg has no option for either; its socket takes them.
    The server gives up on the client as well: see ``db.runner.session_settings``."""
    idle, interval, count = keepalive(seconds)
    options = (  # the names this platform has (TCP_USER_TIMEOUT and TCP_KEEPIDLE: Linux)
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
        (socket.IPPROTO_TCP, "TCP_KEEPIDLE", idle),
        (socket.IPPROTO_TCP, "TCP_KEEPINTVL", interval),
        (socket.IPPROTO_TCP, "TCP_KEEPCNT", count),
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", int(seconds * 1000)),
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        transport = dbapi_connection.driver_connection._transport  # asyncpg's own socket
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket: no network to go silent
        for level, name, value in options:
            if hasattr(socket, name):
                sock.setsockopt(level, getattr(socket, name), value)


def _search_path(engine: Engine, search_path: Sequence[str]) -> None:
    """Every connection works in the first schema of ``search_path``: unqualified names (the
    revisions' tables, the audit trail) are created there, and found there first. A plain
    ``SET``, so PgBouncer in session mode keeps it (it refuses ``search_path`` as a startup
    parameter)."""
    quoted = _quoted(search_path)

    @event.listens_for(engine, "connect", insert=True)  # before the dialect reads its schema
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET search_path TO {quoted}")
        cursor.close()
        dbapi_connection.commit()  # the driver began a transaction: a rollback would undo it


def _search_path_each_transaction(engine: Engine, search_path: Sequence[str]) -> None:
    """Each transaction works in ``search_path`` (``SET LOCAL``, gone at its end): behind a
    pooler in transaction mode, a transaction is all that one server connection serves.
    So AUTOCOMMIT, with no transaction to set it in, is refused: it would run in whatever
    schema the server connection had."""
    schema, statement = search_path[0], f"SET LOCAL search_path TO {_quoted(search_path)}"

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            raise ConfigError(
                f"AUTOCOMMIT cannot work in SCHEMA {schema} here: behind a pooler in "
                "transaction mode the schema is set in each transaction; run it in one"
            )
        connection.exec_driver_sql(statement)


def _quoted(search_path: Sequence[str]) -> str:
    return ", ".join('"' + schema.replace('"', '""') + '"' for schema in search_path)


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
