"""Backups before a change: SQLite's backup API, or pg_dump when an env file asks for it;
and the checks of a SQLite file that come first. Putting one back is :mod:`db.restore`."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL

from db.environments import Environment
from db.errors import DbError, Interrupted, LockTimeout
from db.files import dated
from db.locks import LOCK_WAIT
from db.stop import Stop

if TYPE_CHECKING:
    from db.runner import RunOptions

BACKUP_DIR = Path("var") / "backups"
# A backup's time, in UTC, and its shape: local time went back an hour each autumn (and
# with TZ), so the newest backup could sort as older, be pruned as it was taken, or be passed
# over by restore. An older tool's stamps, in local time, have no Z.
_STAMP, _STAMP_SHAPE = "%Y%m%d-%H%M%S-%fZ", r"\d{8}-\d{6}-\d{6}Z?"


def before_change(env: Environment, url: URL, stop: Stop | None = None) -> str | None:
    """Back the database up if the environment wants it; say what happened, if anything.
    ``BACKUP_KEEP=0`` keeps none, so takes none (rather than one that is pruned at once).
    A stop requested (a signal) ends the copy or pg_dump, leaving no part of a backup, and
    raises Interrupted."""
    stop = stop or Stop()
    if _keep(env) == 0:
        return None
    if url.get_backend_name() == "sqlite":
        path = sqlite_backup(env, url, stopped=stop.check)
        return f"backed up to {env.relative(path)}" if path else None
    if env.backup != "pg_dump":
        return None
    if shutil.which("pg_dump") is None:
        return "BACKUP=pg_dump, but pg_dump is not installed here: skipped the backup"
    return f"backed up to {env.relative(pg_dump(env, url, stop))} with pg_dump"


def sqlite_backup(
    env: Environment, url: URL, least: int = 0, stopped: Callable[[], None] = lambda: None
) -> Path | None:
    """A verified copy through SQLite's backup API, mode 0600; None for an empty file.
    Then the newest ``BACKUP_KEEP`` backups are kept, and at least ``least``.

    A copy that cannot be written or does not pass ``quick_check`` is deleted, and the run
    stops before any change; so is one that ``stopped`` ends (it raises Interrupted).
    """
    source = Path(url.database or "")
    if not source.is_file() or source.stat().st_size == 0:
        return None
    check_sqlite(env, source)
    target = new_file(env, "sqlite3")
    try:
        copy_database(source, target, stopped)
        with closing(sqlite3.connect(target)) as copy:  # a copy of a WAL-mode file is one too,
            copy.execute("PRAGMA journal_mode=DELETE")  # and would grow a -wal and a -shm
        problem = quick_check(target)
        if problem:
            raise sqlite3.DatabaseError(f"the copy fails quick_check: {problem}")
    except Interrupted:
        target.unlink(missing_ok=True)
        raise
    except (sqlite3.Error, OSError) as exc:
        target.unlink(missing_ok=True)
        raise DbError(
            f"the backup to {env.relative(target)} failed ({exc}), so nothing was changed: "
            f"free some space in {BACKUP_DIR} and run the task again"
        ) from None
    _prune(env, "sqlite3", least)
    return target


def check_file(env: Environment, url: URL, options: RunOptions | None = None) -> None:
    """Refuse a SQLite database file that is not sound, or that a change could not write
    (nothing to check on a server). One that another connection keeps locked is waited
    for, ``options.lock_wait`` seconds at most, as the migration lock is."""
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        check_sqlite(env, path, options)
        check_writable(env, path)


def checked(env: Environment, path: Path, options: RunOptions | None) -> str | None:
    """``quick_check`` of a file a task is about to change, waiting ``options.lock_wait``
    seconds at most while another connection keeps it locked. Nothing has been changed
    when the wait runs out, or a signal ends it, and the error says so."""
    try:
        if options is None:
            return quick_check(path)
        return quick_check(path, options.lock_wait, options.stop.check, options.note)
    except LockTimeout as exc:
        raise LockTimeout(
            f"{env.relative(path)}: {exc} (the app writing a large transaction, or a "
            "migration?), so nothing was changed: retry when it is done, or wait longer "
            "with --lock-wait"
        ) from None
    except Interrupted as exc:
        why = f"interrupted while waiting for {env.relative(path)}: nothing was changed"
        raise Interrupted(why, exc.signum) from None


def check_writable(env: Environment, path: Path) -> None:
    """Refuse, before a backup or the lock, a file SQLite could only read: on a read-only
    file system, or not writable; its folder too, where SQLite writes its journal."""
    folder = "its journal (and a new database) in that folder"
    for place, what in ((path, "the database"), (path.parent, folder)):
        if place.exists() and not os.access(place, os.W_OK):
            raise DbError(
                f"{env.relative(place)} is read-only (a read-only file system, or its "
                f"permissions), and SQLite must write {what}: nothing was run; make it "
                "writable and run the task again"
            )


def check_sqlite(env: Environment, path: Path, options: RunOptions | None = None) -> None:
    """Refuse a SQLite file that fails ``PRAGMA quick_check``, before anything touches it;
    one another connection keeps locked is waited for (``options.lock_wait``)."""
    if not path.is_file():
        return
    problem = checked(env, path, options)
    if problem:
        raise DbError(
            f"{env.relative(path)} fails SQLite's quick_check ({problem}): the file is "
            f"corrupt, so nothing was run and no backup was made of it; {repair(env.flags)}"
        )


def repair(flags: str) -> str:
    """What to do about a corrupt SQLite file: ``flags`` are the task's --env (and --only)."""
    return (
        f"put a good backup back with `invoke restore {flags}`, or, with none, start it over "
        f"with `invoke reset {flags}` (which keeps the corrupt file)"
    )


def quick_check(
    path: Path,
    wait: float = 0.0,
    stopped: Callable[[], None] = lambda: None,
    note: Callable[[str], None] = lambda _: None,
) -> str | None:
    """None when the file is a sound SQLite database, else what is wrong with it.

    A file another connection keeps locked is not corrupt: a writer committing, or one
    whose changes outgrew its cache, bars every reader until it ends (in SQLite's
    rollback-journal mode). It is tried again for ``wait`` seconds, in short tries with
    ``stopped`` (which raises to end the wait) between them, and then LockTimeout.
    """
    deadline, noted = time.monotonic() + wait, False
    while True:
        left = deadline - time.monotonic()
        try:
            busy = max(0.0, min(left, 0.25))  # SQLite's own wait, in which no signal is seen
            with closing(read_only(path, busy)) as db:
                rows = db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                return str(exc)
            if left <= 0:
                raise LockTimeout(f"another connection kept it locked for {wait:g} s") from None
            if not noted:
                writing = f"another connection to finish writing {path.name}"
                note(f"waiting up to {wait:g}s for {writing}")
                noted = True
            stopped()
            continue
        except sqlite3.Error as exc:
            return str(exc)
        found = "; ".join(str(row[0]) for row in rows)
        return None if found == "ok" else found


def read_only(path: Path, busy: float = 5.0) -> sqlite3.Connection:
    """A connection that only reads ``path``. Its URI escapes the path: in a folder named
    ``shop #2`` (or with ``?`` or ``%``), SQLite would read the rest as the URI's fragment or
    query, and open (and make) another file."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=busy)


def copy_database(
    source: Path,
    target: Path,
    stopped: Callable[[], None] = lambda: None,
    lock_wait: float = LOCK_WAIT,
) -> None:
    """Copy through SQLite's backup API, in steps; ``stopped`` raises to end the copy, and
    SQLite rolls back what it wrote (the target stays as it was). Never after the last
    step: the copy is committed by then, and stays. A target another connection keeps
    locked (a migration, or the app in a long transaction) for ``lock_wait`` seconds ends
    it the same way, with LockTimeout, instead of a wait without end."""
    locked_since: float | None = None

    def step(status: int, left: int, _total: int) -> None:
        nonlocal locked_since
        if left:
            stopped()
        if status not in _LOCKED:
            locked_since = None
            return
        locked_since = locked_since or time.monotonic()
        if time.monotonic() - locked_since > lock_wait:
            raise LockTimeout(f"another connection kept it locked for {lock_wait:g} s")

    # the target's own busy wait short (not sqlite3's 5 s a step): ``step`` counts the wait
    copy_to = closing(sqlite3.connect(target, timeout=0.1))
    with closing(sqlite3.connect(source)) as live, copy_to as copy:
        live.backup(copy, pages=_STEP_PAGES, progress=step)


_STEP_PAGES = 2048  # 8 MB of 4 kB pages a step: a signal ends a large copy within a moment
_LOCKED = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: the backup API tries the step again


def pg_dump(env: Environment, url: URL, stop: Stop) -> Path:
    """A dump of the database (a tenant's schema alone) in ``var/backups``. Behind a table
    lock (the app's, or an ALTER queued behind a long query) pg_dump waits ``LOCK_TIMEOUT``
    at most, as a migration does; a stop requested meanwhile ends it. Either way, no file."""
    target = new_file(env, "dump")
    command = ["pg_dump", "--format=custom", f"--file={target}", "--no-password"]
    command += [f"--lock-wait-timeout={env.duration('LOCK_TIMEOUT', '5s')}", *_server(url)]
    command += [f"--username={url.username or ''}"]
    # a tenant's schema alone, by its exact name: unquoted, pg_dump folds Shop to shop
    command += [f'--schema="{env.schema}"'] if env.schema else []
    environ = {**os.environ, **_named(url)}
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ
    ) as running:
        unregister = stop.on_request(running.terminate)
        try:
            said = running.communicate()[1]
        finally:
            unregister()
    if running.returncode != 0:
        target.unlink(missing_ok=True)
        stop.check()  # ended by a signal (ours, or the terminal's Ctrl-C): say so
        raise DbError(f"pg_dump failed, so nothing was migrated: {_dump_error(said)}")
    _prune(env, "dump")
    return target


def _named(url: URL) -> dict[str, str]:
    """The database, password and connection settings of the URL for pg_dump, in the
    variables libpq reads as they are (a database name given as an argument is read as
    connection settings if it holds ``=``): what asyncpg takes from the URL's query, pg_dump
    takes too, so it checks the server's certificate (``ssl=verify-full``), reads the same
    ``passfile`` and picks the same server of several (``target_session_attrs``)."""
    named = {"PGDATABASE": url.database} if url.database else {}
    named |= {"PGPASSWORD": url.password} if url.password else {}
    given = {_LIBPQ[key]: str(value) for key, value in url.query.items() if key in _LIBPQ}
    if "PGSSLMODE" in given:  # asyncpg takes verify_full for verify-full too, libpq does not
        given["PGSSLMODE"] = given["PGSSLMODE"].replace("_", "-")
    return named | given


_LIBPQ = {  # asyncpg's names of the URL's query, as libpq's variables
    "ssl": "PGSSLMODE",
    "passfile": "PGPASSFILE",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
}


def _dump_error(said: str) -> str:
    """pg_dump's error line (its last line may be a detail, such as the query), and what to
    do when the statement that failed was a table lock it waited LOCK_TIMEOUT for (ended by
    a timeout, said one way or another)."""
    lines = said.strip().splitlines()
    error = next((line for line in lines if line.startswith("pg_dump: error: ")), None)
    reason = error.removeprefix("pg_dump: error: ") if error else (lines or ["failed"])[-1]
    if "Query was: LOCK TABLE" in said:
        table = said.split("Query was: LOCK TABLE", 1)[1].split()[0]
        reason += (
            f" (it waited LOCK_TIMEOUT for a lock on {table} that another session holds): run "
            "the task again once that session is done, or raise LOCK_TIMEOUT"
        )
    return " ".join(reason.split())


def _server(url: URL) -> list[str]:
    """pg_dump's ``--host`` and ``--port`` for the server(s) asyncpg reaches: the URL's own,
    or those its query names, a socket's folder (``?host=/run/postgresql``) or several hosts
    tried in turn (``?host=a:5432&host=b:5433``, which libpq takes as lists); none given,
    libpq's default, the local socket, as asyncpg's. Never a guess such as ``localhost``,
    which may be another server with a database of the same name."""
    port = str(url.port or 5432)
    if url.host:
        return [f"--host={url.host}", f"--port={port}"]
    given = url.query.get("host")
    if not given:
        return [f"--port={port}"]
    places = [given] if isinstance(given, str) else list(given)
    pairs = [p.rsplit(":", 1) if ":" in p and not p.startswith("/") else [p, port] for p in places]
    return [f"--host={','.join(h for h, _ in pairs)}", f"--port={','.join(n for _, n in pairs)}"]


def backups(env: Environment, suffix: str = "sqlite3") -> list[Path]:
    """This environment's backups (a fleet target's own), newest first."""
    return dated(env.root / BACKUP_DIR, env.label, _STAMP_SHAPE, suffix, _taken)


def _taken(stamp: str) -> datetime:
    """The time a backup's stamp says: UTC, or an older tool's local time."""
    if stamp.endswith("Z"):
        return datetime.strptime(stamp, _STAMP).replace(tzinfo=timezone.utc)
    return datetime.strptime(stamp, _STAMP.removesuffix("Z")).astimezone()


def new_file(env: Environment, suffix: str) -> Path:
    folder = env.root / BACKUP_DIR
    stamp = datetime.now(timezone.utc).strftime(_STAMP)
    target = folder / f"{env.label}-{stamp}.{suffix}"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise DbError(
            f"cannot write a backup in {BACKUP_DIR} ({exc.strerror}), so nothing was changed: "
            "check that folder's permissions and free space"
        ) from None
    return target


def _keep(env: Environment) -> int:
    return env.count("BACKUP_KEEP", 5)


def _prune(env: Environment, suffix: str, least: int = 0) -> None:
    """Keep the newest ``BACKUP_KEEP`` backups, and at least ``least``. One already gone
    was pruned by another run at once (a restore's backup beside a migrate's)."""
    for old in backups(env, suffix)[max(_keep(env), least) :]:
        old.unlink(missing_ok=True)
