"""One migration at a time: a PostgreSQL advisory lock, or one SQLite write transaction.

PostgreSQL: a session-level ``pg_try_advisory_lock``, polled on its own AUTOCOMMIT
connection, never the migration connection (a lock there is lost or deadlocks against
``CREATE INDEX CONCURRENTLY``). The key is derived from the database and the version
table, so two databases on one server never wait on each other.

SQLite: the whole run is one ``BEGIN IMMEDIATE`` transaction, with a savepoint per revision,
so a second run waits (busy timeout) and then finds the work done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import Connection, RootTransaction, text
from sqlalchemy.exc import OperationalError

from db.engines import connect_async
from db.errors import LockTimeout

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

NAMESPACE = 0x5A11  # first key of the two-key advisory lock, kept apart from app locks
_KEY = "hashtext(current_database() || '.' || :table)"
_HOLDER = text(
    "select a.pid, a.application_name from pg_locks l join pg_stat_activity a using (pid) "
    f"where l.locktype = 'advisory' and l.granted and l.classid = {NAMESPACE} "
    f"and l.objid = ({_KEY})::oid and l.objsubid = 2"
)
Note = Callable[[str], None]


@asynccontextmanager
async def pg_lock(
    engine: AsyncEngine, version_table: str, wait: float, note: Note, connect_wait: float = 0
) -> AsyncIterator[None]:
    """Hold the migration lock for ``engine``'s database, waiting up to ``wait`` seconds."""
    params = {"table": version_table}
    async with connect_async(engine, connect_wait) as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        take = text(f"select pg_try_advisory_lock({NAMESPACE}, {_KEY})")
        deadline, holder = time.monotonic() + wait, None
        while not await connection.scalar(take, params):
            if holder is None:
                row = (await connection.execute(_HOLDER, params)).first()
                holder = f"pid {row[0]}, application_name {row[1]!r}" if row else "another run"
                note(f"waiting up to {wait:g}s for the migration lock, held by {holder}")
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"another migration of this database is running ({holder}); gave up "
                    f"after {wait:g}s with nothing changed: retry later, or raise --lock-wait"
                )
            await asyncio.sleep(0.1)
        try:
            yield
        finally:
            await connection.execute(
                text(f"select pg_advisory_unlock({NAMESPACE}, {_KEY})"), params
            )


@contextmanager
def sqlite_run(connection: Connection, wait: float, note: Note) -> Iterator[Callable[[], None]]:
    """One write transaction for the run; yields ``next_revision`` to call after each one.

    A revision that raises is rolled back to its savepoint; the ones before it commit.
    """
    outer = _begin_immediate(connection, wait, note)
    connection.exec_driver_sql("SAVEPOINT revision")

    def next_revision() -> None:
        connection.exec_driver_sql("RELEASE revision")
        connection.exec_driver_sql("SAVEPOINT revision")

    try:
        yield next_revision
    except BaseException:
        connection.exec_driver_sql("ROLLBACK TO revision")
        outer.commit()
        raise
    connection.exec_driver_sql("RELEASE revision")
    outer.commit()


def _begin_immediate(connection: Connection, wait: float, note: Note) -> RootTransaction:
    connection.execution_options(sqlite_begin="BEGIN IMMEDIATE")
    try:
        return _begin(connection, busy_timeout=0)
    except _Busy:
        note(f"waiting up to {wait:g}s for another migration of this SQLite file to finish")
    try:
        return _begin(connection, busy_timeout=wait)
    except _Busy:
        raise LockTimeout(
            f"another process kept this SQLite file locked for {wait:g}s; nothing was changed: "
            "retry later, or raise --lock-wait"
        ) from None


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
