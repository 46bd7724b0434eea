"""Connecting to an environment's database: retries with backoff, a signal that ends the
wait, and a failed login said in one line, with what to do about it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from db.engines import is_async, make_async_engine, make_engine
from db.environments import CONNECT_TIMEOUT, NETWORK_TIMEOUT, Environment
from db.errors import ConfigError, ConnectError, cause_of, first_line
from db.urls import mask

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")
_CONNECT_ERRORS = (DBAPIError, OSError, asyncio.TimeoutError)


# what to do when the server turns a login away, by SQLSTATE
_LOGIN_ADVICE = {
    "53300": "the server has no free connection: all of its max_connections are in use; try "
    "again when one is free",
    "3D000": "create that database first, or fix the database name in the URL",
    "28000": "fix the user in the URL, or let it in: create the role, or add it to the "
    "server's pg_hba.conf",
    "28P01": "check the password the env file gives (DATABASE_PASSWORD)",
}
_SSL_REQUIRED = ("require", "verify-ca", "verify-full")
_NOT_POSTGRES = "is a PostgreSQL server listening on that host and port?"


def connect_error(
    url: URL, exc: BaseException, waited: float = 0, busy_advice: str = ""
) -> ConnectError:
    """A one-line ConnectError naming the masked URL and the driver's reason, after retrying
    for ``waited`` seconds; ``busy_advice``: how the caller could wait for a free connection."""
    reason, text = cause_of(exc), first_line(exc)
    if tls := _tls_trouble(url, reason, text):  # an OSError too: before the network's
        text = tls
    elif isinstance(reason, (asyncio.TimeoutError, TimeoutError)):
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
    if advice := _login_advice(url, state, waited, busy_advice):
        text += f" ({advice})"
    statement_pool = "statement pooling mode" in text  # PgBouncer's, refusing BEGIN
    if statement_pool:
        text += (
            " (a pooler in statement mode runs no transactions: set MIGRATION_URL in the env "
            "file to a direct URL, or a session-mode pool, for migrations)"
        )
    if url.password:
        text = text.replace(url.password, "***")
    tried = f", tried for {waited:g}s" if waited else ""
    error = ConnectError(f"cannot connect to {mask(url)}{tried}: {text}")
    error.busy = busy
    if statement_pool:  # a setting to change, as for a pooler in transaction mode
        error.exit_code = ConfigError.exit_code
    return error


def _login_advice(url: URL, state: str | None, waited: float, busy_advice: str) -> str:
    """What to do when the server turned the login away, by SQLSTATE; "" for the rest."""
    if state == "53300" and waited:  # the error says how long it tried
        return "the server has no free connection: all of its max_connections are in use"
    if state == "53300" and busy_advice:
        return f"{_LOGIN_ADVICE[state]}, or {busy_advice}"
    if state == "28P01":
        return _wrong_password(url)
    return _LOGIN_ADVICE.get(state or "", "")


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


def _tls_trouble(url: URL, reason: BaseException, text: str) -> str | None:
    """What went wrong checking the server's certificate, and what to do; None where
    nothing did. The root certificate's file is read before anything connects, so its
    errors (a file not there, one with no certificate) are its own; asyncpg's words for a
    verification that failed are the errno of Operation not permitted."""
    root = os.environ.get("PGSSLROOTCERT")
    ca = "give the certificate of the CA that signed the server's in PGSSLROOTCERT, or in "
    ca += "~/.postgresql/root.crt"
    if isinstance(reason, ssl.SSLCertVerificationError):
        if reason.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, IP_ADDRESS_...
            return (
                f"the server's certificate is not for this host: {reason.verify_message} "
                "(write the host as the certificate names it, or use ssl=verify-ca, which "
                "checks only who signed it)"
            )
        return f"the server's certificate was not accepted: {reason.verify_message} ({ca})"
    if "root certificate file" in text:  # asyncpg's, where ~/.postgresql/root.crt is not
        return f"{text} (ssl={url.query.get('ssl')} checks the server's certificate: {ca})"
    ssl_mode = str(url.query.get("ssl", "")).lower()
    if not root or ssl_mode not in _SSL_REQUIRED:
        return None
    signer = "name the file of the certificate of the CA that signed the server's"
    if isinstance(reason, ssl.SSLError) and reason.library == "X509":
        return f"PGSSLROOTCERT names {root}, which holds no certificate: {signer}"
    if isinstance(reason, OSError) and not Path(root).is_file():
        return f"PGSSLROOTCERT names {root}, which is no file that can be read: {signer}"
    return None


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
    engine: Engine,
    wait: float = 0,
    stopped: Callable[[], None] = lambda: None,
    busy_advice: str = "",
) -> Iterator[Connection]:
    """Connect, retrying for up to ``wait`` seconds; a refused, timed-out or rejected
    login becomes ConnectError. ``stopped`` raises to end the wait (a signal).
    ``busy_advice``: as for :func:`connect_error`."""
    delays = backoff(wait)
    while True:
        try:
            connection = engine.connect()
            break
        except (*_CONNECT_ERRORS, sqlite3.Error) as exc:
            delay = next(delays, None)
            if delay is None:
                raise connect_error(engine.url, exc, wait, busy_advice) from exc
            for nap in naps(delay, stopped):
                time.sleep(nap)
    with connection:
        yield connection


@asynccontextmanager
async def connect_async(
    engine: AsyncEngine,
    wait: float = 0,
    stopped: Callable[[], None] = lambda: None,
    busy_advice: str = "",
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
                raise connect_error(engine.url, exc, wait, busy_advice) from exc
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
    search_path: Sequence[str] = (),
    stopped: Callable[[], None] = lambda: None,
    network_timeout: float = NETWORK_TIMEOUT,
) -> T:
    """Run ``fn`` on a new connection to ``url``, through the sync or async driver it names;
    retry connecting for ``wait`` seconds, unless ``stopped`` raises (a signal: as for
    :func:`connect_async`). ``search_path``: as for :func:`make_async_engine`.
    What ``fn`` does (a read, mostly: status goes through ``DATABASE_URL`` where there is
    no ``MIGRATION_URL``) works through a pooler in transaction mode too."""
    if is_async(url):
        engine = make_async_engine(
            url,
            connect_timeout=connect_timeout,
            search_path=search_path,
            pooler=True,
            network_timeout=network_timeout,
        )
        return run_coroutine(_with_async(engine, fn, wait, stopped))
    sync_engine = make_engine(url, connect_timeout=connect_timeout, create=False)  # reads
    try:
        with connect(sync_engine, wait, stopped) as connection:
            return fn(connection)
    finally:
        sync_engine.dispose()


def with_database(
    env: Environment, fn: Callable[[Connection], T], stopped: Callable[[], None] = lambda: None
) -> T:
    """:func:`with_connection` to ``env``'s database, in its ``SCHEMA`` alone (what it reads
    is the tenant's, never a shared schema's), with its timeouts."""
    return with_connection(
        env.url(),
        fn,
        connect_timeout=env.connect_timeout,
        search_path=env.search_path[:1],
        stopped=stopped,
        network_timeout=env.network_timeout,
    )


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
