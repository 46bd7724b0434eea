"""One migration at a time, held by the session that does the work.

PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``, polled) taken on the
migration connection itself. The lock cannot be lost apart from the work: if the session
dies (killed, a restart, a dropped connection), its open revision dies with it. Each
revision still checks, inside its transaction before it commits and before each
non-transactional block, that its session holds the lock: that is the fence against a
pooler handing the transaction to another backend. The key is derived from the database
and the version table, so two databases on one server never wait on each other.

A connection through a transaction-mode pooler (PgBouncer ``pool_mode=transaction``) is
refused before anything runs: session settings and session locks do not survive there.

SQLite: the whole run is one ``BEGIN IMMEDIATE`` transaction, with a savepoint per revision,
so a second run waits (busy timeout) and then finds the work done.

Tenants of one database migrate at once, each under its own lock; what they share, the
database's extensions, is made one revision at a time: ``CREATE EXTENSION IF NOT EXISTS``
in two tenants' revisions at once failed all but one (a duplicate key in
``pg_extension``), since neither saw the other's before it committed.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    RootTransaction,
    TextClause,
    and_,
    column,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError

from db.connections import with_connection
from db.errors import ConfigError, Halted, LockLost, LockTimeout, MigrationFailed, first_line

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

LOCK_WAIT = 60.0  # seconds a run waits for another's lock (a migration's, a file's), by default
NAMESPACE = 0x5A11  # first key of the two-key advisory lock, kept apart from app locks
_KEY = "hashtext(current_database() || '.' || :table)"
_MINE = (
    "select 1 from pg_locks where locktype = 'advisory' and granted and pid = pg_backend_pid() "
    f"and classid = {NAMESPACE} and objid = ({_KEY})::oid and objsubid = 2"
)
_HOLDER = text(
    "select a.pid, a.application_name from pg_locks l join pg_stat_activity a using (pid) "
    f"where l.locktype = 'advisory' and l.granted and l.classid = {NAMESPACE} "
    f"and l.objid = ({_KEY})::oid and l.objsubid = 2"
)
_PID = text("select pg_backend_pid()")
Note = Callable[[str], None]
POOLED = (
    "the connection goes through a pooler in transaction mode (PgBouncer?), where session "
    "settings and the migration lock do not hold; nothing was changed: set MIGRATION_URL in "
    "{where} to a direct URL (or a session-mode pool) for migrations"
)


@dataclass(frozen=True)
class Fence:
    """The backend that holds the lock; checked on the migration connection before each
    revision commits."""

    pid: int
    table: str

    @cached_property  # built once: each revision of the run evaluates it
    def held(self) -> ColumnElement[bool]:
        """True while the session that took the lock is the one running and still holds it:
        a condition to evaluate in a statement of the transaction about to commit."""
        mine = text(_MINE).bindparams(table=self.table).columns(column("one")).exists()
        return and_(func.pg_backend_pid() == self.pid, mine)

    def check(self, connection: Connection) -> None:
        self.verify(connection.execute(select(self.held)).scalar())

    @staticmethod
    def verify(held: object) -> None:
        """Stop before the commit unless ``held`` (the value of :attr:`held`) is true."""
        if not held:
            raise LockLost(
                "this run no longer holds the migration lock (a pooler in transaction mode "
                "moved its session, or a revision released the lock), so it stopped before "
                "committing"
            )


_CREATE_EXTENSION = re.compile(r"\s*CREATE\s+EXTENSION\b", re.IGNORECASE)
_SCHEMA_NAMED = re.compile(r"\bSCHEMA\b", re.IGNORECASE)
# a key no version table has: the database's extensions, made by one revision at a time
_EXTENSIONS = (
    f"select pg_advisory_xact_lock({NAMESPACE}, hashtext(current_database() || ' extensions'))"
)


@contextmanager
def extensions_in_turn(connection: Connection, tenant: str | None = None) -> Iterator[None]:
    """While the run lasts, a revision that creates an extension on PostgreSQL first waits
    for any other's that did (a tenant's of the same database) to commit, so its ``IF NOT
    EXISTS`` sees that one; the lock ends with the revision's transaction. In the schema of
    a ``tenant`` that shares others (SHARED_SCHEMAS), one that names no schema is refused:
    it would go into that tenant's schema, where no other tenant sees it (a database has
    each extension once)."""
    if connection.dialect.name != "postgresql":
        yield
        return

    def in_turn(_conn: Connection, cursor: Any, statement: str, *_rest: Any) -> None:
        made = _CREATE_EXTENSION.match(statement)
        if made and tenant is not None and not _SCHEMA_NAMED.search(statement):
            raise MigrationFailed(
                f"{' '.join(statement.split())} would make the extension in schema {tenant}, "
                "this tenant's, where no other tenant sees it (a database has each extension "
                "once): name a schema of SHARED_SCHEMAS, CREATE EXTENSION IF NOT EXISTS ... "
                "SCHEMA public"
            )
        if made:
            cursor.execute(_EXTENSIONS)

    event.listen(connection, "before_cursor_execute", in_turn)
    try:
        yield
    finally:
        event.remove(connection, "before_cursor_execute", in_turn)


def lock_timeout_for_this_read(connection: Connection, settings: Mapping[str, str]) -> None:
    """A read made outside a run's session (a fleet's, before the lock) waits for a table
    lock (a DBA's LOCK TABLE) no longer than the run's own would: ``lock_timeout`` for its
    transaction alone (SET LOCAL, which holds behind a transaction-mode pooler too)."""
    timeout = settings.get("lock_timeout")
    if timeout and connection.dialect.name == "postgresql":
        set_local = text("select set_config('lock_timeout', :timeout, true)")
        connection.execute(set_local, {"timeout": timeout})


async def prepare_session(
    connection: AsyncConnection, engine: AsyncEngine, settings: Mapping[str, str], where: str
) -> int:
    """Refuse a transaction-mode pooler, then apply and check the session settings.

    Returns the backend's pid. ``where`` names the env file, for the pooler message. On a
    direct connection this costs two transactions: the settings go in with the first, on
    the condition that its backend is the one the connection started on.
    """
    raw = await connection.get_raw_connection()
    startup = getattr(raw.driver_connection, "get_server_pid", lambda: None)()
    pid, applied = await _apply(connection, settings, startup, where)
    if startup is not None and pid != startup:  # another backend: behind a pooler
        if await _transaction_pooled(connection, engine, pid):
            raise ConfigError(POOLED.format(where=where))
        pid, applied = await _apply(connection, settings, pid, where)
    again, seen = await _pairs(connection, _SHOWN, names=list(applied))
    if seen != applied or again != pid:
        raise ConfigError(POOLED.format(where=where))
    return pid


async def _apply(
    connection: AsyncConnection, settings: Mapping[str, str], on: int | None, where: str
) -> tuple[int, dict[str, str]]:
    """The backend's pid, and the settings it took: none unless it is backend ``on``."""
    names = ", ".join(f"(:n{i}, :v{i})" for i in range(len(settings)))
    query = text(
        "select pg_backend_pid(), (select array_agg(array[name, set_config(name, value, false)]) "
        f"from (values {names}) as wanted(name, value) join pg_settings using (name) "
        "where pg_backend_pid() = coalesce(:on, pg_backend_pid()))"
    )
    values = {f"n{i}": name for i, name in enumerate(settings)}
    values.update({f"v{i}": value for i, value in enumerate(settings.values())})
    try:
        return await _pairs(connection, query, on=on, **values)
    except DBAPIError as exc:
        raise ConfigError(f"{where}: a PostgreSQL setting was refused: {first_line(exc)}") from exc


_SHOWN = text(
    "select pg_backend_pid(), (select array_agg(array[name, current_setting(name)]) "
    "from pg_settings where name = any(:names))"
)


async def _pairs(
    connection: AsyncConnection, query: TextClause, **params: object
) -> tuple[int, dict[str, str]]:
    """Run ``query`` in a transaction of its own: the backend's pid, and (name, value) pairs."""
    pid, pairs = (await connection.execute(query, params)).one()
    await connection.commit()
    return int(pid), dict(pairs or ())


async def _pid(connection: AsyncConnection) -> int:
    pid = int(await connection.scalar(_PID) or 0)
    await connection.commit()
    return pid


async def _transaction_pooled(connection: AsyncConnection, engine: AsyncEngine, pid: int) -> bool:
    """Behind a pooler: does our next transaction keep its backend while another client
    holds a transaction open? Only a transaction-mode pooler moves it (or makes it wait).

    A pool with no server connection free for that other client (a session pool no larger
    than the fleet's targets running on it, each of which holds one) keeps it waiting while
    we keep ours: given as long as logging in takes (a round trip ten times, and a second),
    it gives up, and our own next transactions tell, as in session mode only they each
    find our backend at once."""
    started = time.monotonic()
    if await _moves(connection, pid):
        return True
    patience = 1 + 10 * (time.monotonic() - started)
    other = engine.connect()
    try:
        other_pid = await asyncio.wait_for(_held_open(other), timeout=patience)
    except asyncio.TimeoutError:  # no server connection for it: the pool is all taken
        with suppress(Exception):  # cut short logging in, or waiting: nothing to keep
            await other.invalidate()
        return await _moves(connection, pid, times=5)
    try:
        return await _moves(connection, pid) or other_pid == pid
    finally:
        await other.close()  # its transaction rolled back


async def _held_open(other: AsyncConnection) -> int:
    """``other`` connected (``SCHEMA`` set, a statement of its own), and a transaction
    opened on it; the pid of its backend."""
    await other.start()
    await other.begin()
    return int(await other.scalar(_PID) or 0)


async def _moves(connection: AsyncConnection, pid: int, times: int = 1) -> bool:
    """Whether the next ``times`` transactions on ``connection`` leave backend ``pid``, or
    wait for one (3 seconds, or half a second each of several): the server connections
    are shared."""
    for _ in range(times):
        try:
            if await asyncio.wait_for(_pid(connection), timeout=3 if times == 1 else 0.5) != pid:
                return True
        except asyncio.TimeoutError:
            return True
    return False


@asynccontextmanager
async def pg_lock(
    connection: AsyncConnection,
    pid: int,
    table: str,
    wait: float,
    note: Note,
    stopped: Callable[[], None] = lambda: None,
) -> AsyncIterator[Fence]:
    """Hold the migration lock on ``connection``'s session, waiting up to ``wait`` seconds;
    ``stopped`` raises to end the wait (a signal: the wait changed nothing)."""
    params = {"table": table}
    # null: this session holds the lock already (evaluated before it tries to take it)
    take = text(
        f"select case when exists ({_MINE}) then null "
        f"else pg_try_advisory_lock({NAMESPACE}, {_KEY}) end"
    )
    deadline, holder = time.monotonic() + wait, None
    while not (taken := await connection.scalar(take, params)):
        if taken is None:
            raise LockLost("this session already held the migration lock: a shared pooled session?")
        if holder is None:
            row = (await connection.execute(_HOLDER, params)).first()
            holder = f"pid {row[0]}, application_name {row[1]!r}" if row else "another run"
            if wait > 0:  # no wait (a fleet's first try): the error or the retry says it all
                note(f"waiting up to {wait:g}s for the migration lock, held by {holder}")
        await connection.commit()
        stopped()
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"another migration of this database is running ({holder}); gave up "
                f"after {wait:g}s with nothing changed: retry later, or raise --lock-wait"
            )
        await asyncio.sleep(0.1)
    await connection.commit()
    failed = False
    try:
        yield Fence(pid, table)
    except BaseException:
        failed = True
        raise
    finally:
        if failed:  # the first error is the one to report; the session may be gone
            with suppress(Exception):
                await _unlock(connection, params)
        elif not await _unlock(connection, params):
            note("warning: the migration lock was already released when the run ended")


async def _unlock(connection: AsyncConnection, params: Mapping[str, str]) -> bool:
    if connection.in_transaction():
        await connection.rollback()
    released = bool(
        await connection.scalar(text(f"select pg_advisory_unlock({NAMESPACE}, {_KEY})"), params)
    )
    await connection.commit()
    return released


def canceller(
    url: URL, pid: int, connect_timeout: float, network_timeout: float
) -> Callable[[], None]:
    """A function that cancels the statement backend ``pid`` is running, from a thread of
    its own (it is called from a signal handler, while the main thread waits on the server)."""

    def cancel(connection: Connection) -> None:
        connection.execute(text("select pg_cancel_backend(:pid)"), {"pid": pid})

    def in_thread() -> None:
        with suppress(Exception):  # the run stops at its next check all the same
            with_connection(
                url, cancel, connect_timeout=connect_timeout, network_timeout=network_timeout
            )

    return lambda: threading.Thread(target=in_thread, daemon=True).start()


@contextmanager
def sqlite_run(
    connection: Connection,
    wait: float,
    note: Note,
    on_commit: Callable[[], None],
    stopped: Callable[[], None] = lambda: None,
) -> Iterator[Callable[[], None]]:
    """One write transaction for the run; yields ``next_revision`` to call after each one.

    A revision that raises is rolled back to its savepoint; the ones before it commit, and
    ``on_commit`` is called once they have. SQLite itself may have rolled the whole
    transaction back (a full disk, an I/O error): then none of them committed, and the
    error that did it is the one raised. ``stopped``: as for :func:`pg_lock`.
    """
    outer = _begin_immediate(connection, wait, note, stopped)
    connection.exec_driver_sql("SAVEPOINT revision")
    sqlite = connection.connection.driver_connection

    def next_revision() -> None:
        connection.exec_driver_sql("RELEASE revision")
        connection.exec_driver_sql("SAVEPOINT revision")

    try:
        yield next_revision
    except BaseException:
        if not sqlite.in_transaction:  # type: ignore[union-attr]
            if outer.is_active:  # not ended by the revision itself (a Session's rollback())
                outer.rollback()  # SQLite's own rollback: only SQLAlchemy's side is left to end
            raise
        connection.exec_driver_sql("ROLLBACK TO revision")
        _commit(connection, outer, wait, note, stopped)
        on_commit()
        raise
    connection.exec_driver_sql("RELEASE revision")
    _commit(connection, outer, wait, note, stopped)
    on_commit()


@contextmanager
def sqlite_locked(
    connection: Connection, wait: float, note: Note, stopped: Callable[[], None]
) -> Iterator[None]:
    """The block in one write transaction: the file's migration lock, taken as
    :func:`sqlite_run` takes it; committed if the block ends well, else rolled back."""
    transaction = _begin_immediate(connection, wait, note, stopped)
    try:
        yield
        _commit(connection, transaction, wait, note, stopped)
    except BaseException:
        if transaction.is_active:
            transaction.rollback()
        raise


def _begin_immediate(
    connection: Connection, wait: float, note: Note, stopped: Callable[[], None]
) -> RootTransaction:
    """The write transaction, waiting up to ``wait`` seconds for another writer to finish,
    in short tries: a signal's handler runs between them (not while SQLite waits)."""
    connection.execution_options(sqlite_begin="BEGIN IMMEDIATE")
    deadline = time.monotonic() + wait
    try:
        return _begin(connection, busy_timeout=0)
    except _Busy:
        if wait > 0:
            note(f"waiting up to {wait:g}s for another writer of this SQLite file to finish")
    while (left := deadline - time.monotonic()) > 0:
        stopped()
        with suppress(_Busy):
            return _begin(connection, busy_timeout=min(left, 0.25))
    raise LockTimeout(
        f"another process kept this SQLite file locked for {wait:g}s; nothing was changed: "
        "retry later, or raise --lock-wait"
    )


def _commit(
    connection: Connection,
    transaction: RootTransaction,
    wait: float,
    note: Note,
    stopped: Callable[[], None],
) -> None:
    """Commit the write transaction. SQLite writes the file only once every reader is done
    (the app's read transaction, a report): wait up to ``wait`` seconds for them, in short
    tries with ``stopped`` between them (a signal ends the wait; a fleet's halt, which lets
    a run finish, does not). A commit that finds the file busy leaves the transaction open,
    so it can be tried again; ended by a signal or the wait, it is rolled back, and nothing
    of it is kept."""
    sqlite = connection.connection.driver_connection
    deadline, noted = time.monotonic() + wait, False
    try:
        sqlite.execute("PRAGMA busy_timeout = 250")  # type: ignore[union-attr]
        while not _committed(sqlite):
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"readers kept this SQLite file busy for {wait:g}s (the app in a long read "
                    "transaction?), so the run could not commit"
                )
            if not noted:
                note(f"waiting up to {wait:g}s for readers of this SQLite file to finish")
                noted = True
            with suppress(Halted):  # a fleet's halt lets the run finish, and this is finishing
                stopped()
    except BaseException:
        transaction.rollback()
        raise
    transaction.commit()  # SQLAlchemy's side: SQLite has nothing open to commit now


def _committed(sqlite: Any) -> bool:
    """COMMIT, or False while readers keep the file from being written (SQLITE_BUSY)."""
    try:
        sqlite.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return False
        raise
    return True


class _Busy(Exception):
    pass


def _begin(connection: Connection, busy_timeout: float) -> RootTransaction:
    sqlite = connection.connection.driver_connection  # no autobegin: this is no transaction
    sqlite.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")  # type: ignore[union-attr]
    try:
        return connection.begin()
    except OperationalError as exc:
        if "locked" in str(exc.orig):
            raise _Busy from exc
        raise
