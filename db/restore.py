"""Restoring a SQLite backup, and setting a corrupt database file aside (restore, reset)."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL, make_url

from db.backups import (
    BACKUP_DIR,
    backups,
    checked,
    copy_database,
    new_file,
    quick_check,
    read_only,
    sqlite_backup,
)
from db.environments import Environment
from db.errors import ConfigError, DbError, GuardRefused, Interrupted, LockTimeout, UsageError
from db.locks import LOCK_WAIT
from db.versions import VERSION_TABLE

if TYPE_CHECKING:
    from db.runner import RunOptions


def set_aside_corrupt(env: Environment, url: URL, options: RunOptions) -> Path | None:
    """Move a corrupt SQLite file (with its journal, or its WAL files) into the backups, as
    it is, so that a reset can start a new one: nothing in it can be dropped. None when it
    is sound (a locked one is waited for, as by ``check_file``)."""
    path = Path(url.database or "") if url.get_backend_name() == "sqlite" else None
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return None
    return _set_aside(env, path) if checked(env, path, options) else None


@dataclass(frozen=True)
class Chosen:
    """The backup a restore puts back, checked, and what it is at."""

    path: Path
    at: str  # its revision(s) in words ("base" for none)


def choose(env: Environment, url: URL, backup: Path | None, allow_mismatch: bool = False) -> Chosen:
    """The backup to restore: ``backup``, or the newest. It must be a sound SQLite
    database with a version table, last migrated as this environment (and fleet target)
    unless ``allow_mismatch``."""
    if url.get_backend_name() != "sqlite":
        raise ConfigError(f"{env.name} is PostgreSQL: restore a pg_dump backup with pg_restore")
    live = Path(url.database or "")
    if backup is not None and not backup.is_file():  # not "no backup": one was named
        what = "is a folder, not a backup" if backup.is_dir() else "does not exist"
        raise UsageError(
            f"{env.relative(backup)} {what}: nothing was restored; the backups are in "
            f"{BACKUP_DIR}, and without --file the newest is taken"
        )
    chosen = backup or next(iter(backups(env)), None)
    if chosen is None:
        raise DbError(f"no backup to restore for {env.label} (looked in {BACKUP_DIR})")
    if live.exists() and chosen.resolve() == live.resolve():
        raise DbError(f"{env.relative(chosen)} is the live database itself: pick a backup")
    try:
        _check_backup(env, chosen)
    except DbError as exc:
        older = [path for path in backups(env) if path != chosen][:1] if backup is None else []
        if not older:
            raise
        other = env.relative(older[0])  # the newest was taken for the user: say what is next
        raise DbError(
            f"{exc}; the one before it: `invoke restore {env.flags} --file={other}`"
        ) from None
    made = _migrated_as(chosen)
    if made is not None and made != env.label and not allow_mismatch:
        raise GuardRefused(
            f"{env.relative(chosen)} is a backup of {made}, not {env.label}: nothing was "
            "restored; pass --allow-env-mismatch to put it here anyway (migrate will ask "
            "for it too)"
        )
    return Chosen(chosen, _at(chosen) or "base")


def restore(
    env: Environment,
    url: URL,
    chosen: Path,
    stopped: Callable[[], None] = lambda: None,
    lock_wait: float = LOCK_WAIT,
) -> Path | None:
    """Put the backup ``chosen`` (see :func:`choose`) back in place of the database, keeping
    the database it replaces as a backup first; returns where that went.

    ``stopped`` raises Interrupted (a signal) to end the restore before the copy is done,
    leaving the database as it was; so does a database another connection keeps locked for
    ``lock_wait`` seconds.
    """
    live = Path(url.database or "")
    try:
        stopped()
        kept = _keep_replaced(env, live, stopped, lock_wait)
    except (Interrupted, LockTimeout) as exc:
        raise _not_restored(exc, env, live, _AS_IT_WAS) from None
    try:
        stopped()
        copy_database(chosen, live, stopped, lock_wait)
    except (Interrupted, LockTimeout) as exc:
        raise _not_restored(exc, env, live, _unrestored(env, live, kept)) from None
    except (sqlite3.Error, OSError) as exc:  # a full disk
        raise DbError(
            f"restoring {env.relative(chosen)} failed ({exc}), so {_unrestored(env, live, kept)}; "
            f"free some space for {env.relative(live)} and run it again"
        ) from None
    return kept


def _at(path: Path) -> str:
    """The revision(s) the SQLite database in ``path`` is at, in words ("" for none)."""
    with closing(read_only(path)) as db:
        rows = db.execute(f"select version_num from {VERSION_TABLE}").fetchall()
    return ", ".join(str(row[0]) for row in rows)


def replaced(url: URL) -> str:
    """What the database a restore replaces is at, in words: what a protected environment
    shows before it asks."""
    live = Path(url.database or "")
    if not live.is_file() or live.stat().st_size == 0:
        return "no database yet"
    try:
        return f"the database at {_at(live) or 'base'}"
    except sqlite3.Error as exc:  # corrupt, or not migrated: kept aside as it is all the same
        return f"the database, which cannot be read ({exc})"


_AS_IT_WAS = "nothing was restored: the database is as it was"


def _not_restored(
    exc: Interrupted | LockTimeout, env: Environment, live: Path, left: str
) -> DbError:
    """The error of a restore that a signal, or another connection's lock, ended; ``left``:
    what it left, in words."""
    if isinstance(exc, Interrupted):
        return Interrupted(f"interrupted: {left}", exc.signum)
    return LockTimeout(
        f"{env.relative(live)}: {exc} (a migration, or the app in a long transaction?), so "
        f"{left}; stop it, or wait longer with --lock-wait"
    )


def _unrestored(env: Environment, live: Path, kept: Path | None) -> str:
    """What a restore that failed part way left, in words. Over a sound database, SQLite
    rolled the copy back; a new file (there was none, or a corrupt one moved aside) goes."""
    if kept is not None and kept.suffix != ".corrupt":
        return _AS_IT_WAS
    for suffix in _COMPANIONS + ("",):
        Path(f"{live.resolve()}{suffix}").unlink(missing_ok=True)
    moved = f" (the corrupt one is in {env.relative(kept)})" if kept is not None else ""
    return f"nothing was restored and there is no database file{moved}"


def _check_backup(env: Environment, path: Path) -> None:
    try:
        problem = quick_check(path)
    except LockTimeout:
        problem = "another connection keeps it locked"
    if problem is None:
        with closing(read_only(path)) as db:
            found = db.execute(
                "select 1 from sqlite_master where type = 'table' and name = 'alembic_version'"
            ).fetchone()
        problem = None if found else "it has no alembic_version table"
    if problem:
        raise DbError(
            f"{env.relative(path)} is not a usable backup ({problem}); nothing was restored"
        )


def _migrated_as(path: Path) -> str | None:
    """The environment (``shops.alpha`` for a fleet's target) that last migrated the
    database in ``path``, from its audit trail; None if it has none."""
    with closing(read_only(path)) as db:
        columns = {row[1] for row in db.execute("pragma table_info(migration_log)")}
        if "environment" not in columns:
            return None
        target = "target" if "target" in columns else "null"
        row = db.execute(
            f"select environment, {target} from migration_log order by id desc limit 1"
        ).fetchone()
    if row is None:
        return None
    return f"{row[0]}.{row[1]}" if row[1] else str(row[0])


_COMPANIONS = ("-journal", "-wal", "-shm")  # the files SQLite keeps beside a database


def _keep_replaced(
    env: Environment, live: Path, stopped: Callable[[], None], lock_wait: float
) -> Path | None:
    """Keep the database a restore replaces: as a verified backup, or, when corrupt, moved
    aside as it is (SQLite cannot copy over a file it cannot read). A file another
    connection keeps locked is waited for, ``lock_wait`` seconds at most."""
    if not live.is_file() or live.stat().st_size == 0:
        return None
    if quick_check(live, lock_wait, stopped) is None:  # kept even with BACKUP_KEEP=0
        return sqlite_backup(env, make_url(f"sqlite:///{live}"), least=1, stopped=stopped)
    return _set_aside(env, live)


def _set_aside(env: Environment, live: Path) -> Path:
    """Move a corrupt file aside with its journal, or its write-ahead log and that log's
    index (WAL mode: the last commits may be only there), which go first: one left behind
    would be played back into the new file, and the kept copy would lack those commits.

    Where ``live`` is a link, the file it names goes (SQLite keeps the journal beside that
    file), and the link stays, to name the new one. On another disk than the backups, the
    files are copied, and removed only once every copy is whole."""
    kept = new_file(env, "corrupt")
    real = live.resolve()
    moves = [
        (Path(f"{real}{suffix}"), Path(f"{kept}{suffix}"))
        for suffix in _COMPANIONS + ("",)
        if Path(f"{real}{suffix}").exists()
    ]
    try:
        for source, aside in moves:
            os.replace(source, aside)
    except OSError as exc:  # one folder: the first rename fails, or none does
        if exc.errno != errno.EXDEV:
            raise
        _copy_aside(env, live, moves)
    for _, aside in moves:
        aside.chmod(0o600)  # as every backup: the rows are the app's
    return kept


def _copy_aside(env: Environment, live: Path, moves: list[tuple[Path, Path]]) -> None:
    """``_set_aside`` across disks: every file copied, then the originals removed; a copy
    that fails (a full disk) is removed with the others, and the files stay as they were."""
    try:
        for source, aside in moves:
            shutil.copy2(source, aside)
    except OSError as exc:
        for _, aside in moves:
            aside.unlink(missing_ok=True)
        raise DbError(
            f"cannot keep the corrupt {env.relative(live)} in {BACKUP_DIR} ({exc.strerror}), "
            f"so nothing was changed: free some space in {BACKUP_DIR} and run the task again"
        ) from None
    for source, _ in moves:
        source.unlink()
