"""Engines for an environment's URL: the one place that decides sync or async."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import sqlite3
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, pool
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from db.environments import mask
from db.errors import ConnectError

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0
_CONNECT_ERRORS = (DBAPIError, OSError, asyncio.TimeoutError)


def is_async(url: URL) -> bool:
    """Whether the URL's driver is an asyncio one (asyncpg, aiosqlite)."""
    return bool(url.get_dialect().is_async)


def make_engine(
    url: URL, *, connect_timeout: float = CONNECT_TIMEOUT, migrating: bool = False
) -> Engine | AsyncEngine:
    """A pool-less engine; SQLite gets real transactions for DDL and a busy timeout.

    ``migrating`` turns SQLite's foreign key enforcement off (batch mode rebuilds tables);
    env.py checks the keys itself before each revision commits.
    """
    if url.get_backend_name() == "sqlite":
        if url.database not in (None, "", ":memory:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"connect_args": {"timeout": connect_timeout}}
    else:
        options = {"connect_args": {"timeout": connect_timeout}, "poolclass": pool.NullPool}
    if is_async(url):
        async_engine = create_async_engine(url, **options)
        _sqlite_transactions(async_engine.sync_engine, foreign_keys=not migrating)
        return async_engine
    engine = create_engine(url, **options)
    _sqlite_transactions(engine, foreign_keys=not migrating)
    return engine


def _sqlite_transactions(engine: Engine, *, foreign_keys: bool) -> None:
    """SQLAlchemy's documented recipe: let SQLite see BEGIN, so DDL rolls back too."""
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
        connection.exec_driver_sql("BEGIN")


def connect_error(url: URL, exc: BaseException) -> ConnectError:
    """A one-line ConnectError naming the masked URL and the driver's reason."""
    reason = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(reason).strip().splitlines()
    text = lines[0] if lines else type(reason).__name__
    if isinstance(reason, (asyncio.TimeoutError, TimeoutError)):
        text = "timed out (raise CONNECT_TIMEOUT in the env file if the server is slow)"
    elif isinstance(reason, socket.gaierror):
        text = f"unknown host ({reason.strerror})"
    elif isinstance(reason, OSError) and reason.errno:
        text = f"{os.strerror(reason.errno)} (is the server running on that host and port?)"
    if url.password:
        text = text.replace(url.password, "***")
    return ConnectError(f"cannot connect to {mask(url)}: {text}")


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """Connect, turning a refused, timed-out or rejected login into ConnectError."""
    try:
        connection = engine.connect()
    except (*_CONNECT_ERRORS, sqlite3.Error) as exc:
        raise connect_error(engine.url, exc) from exc
    with connection:
        yield connection


@asynccontextmanager
async def connect_async(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """Like :func:`connect`, for an async engine; disposes of the engine afterwards."""
    try:
        try:
            connection = await engine.connect()
        except _CONNECT_ERRORS as exc:
            raise connect_error(engine.url, exc) from exc
        try:
            yield connection
        finally:
            await connection.close()
    finally:
        await engine.dispose()


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coro).result()
