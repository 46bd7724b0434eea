"""The audit trail: one ``migration_log`` row per revision applied, rolled back or accepted.

Rows are written on the revision's own connection, inside its transaction, so a revision
and its row commit (or vanish) together. They also carry the SHA-256 of the revision file,
which later runs compare with the file on disk.
"""

from __future__ import annotations

import ast
import functools
import getpass
import hashlib
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    DateTime,
    Insert,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    cast,
    extract,
    false,
    func,
    inspect,
    literal,
    null,
    select,
    text,
    update,
)
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.expression import Executable

from db.environments import NAME_MAX, Environment
from db.errors import DbError

UTC = timezone.utc
Execute = Callable[[Executable], Any]
LOG = Table(
    "migration_log",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("revision", String(64), nullable=False),
    # up, down, accept, stamp, unstamp (a stamp back past it), env (renamed); run-up/run-down:
    # a non-transactional revision that started and has not finished; aborted: one an
    # operator said was rolled back
    Column("direction", String(8), nullable=False),
    Column("environment", String(NAME_MAX), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("os_user", String(128)),
    Column("host", String(255)),
    Column("tool_version", String(32)),
    Column("git_commit", String(40)),
    Column("checksum", String(64)),
    Column("last_statement", Text),  # run-up/run-down: the last statement started
    Column("code_checksum", String(64)),  # the file's code, without comments and formatting
    Column("target", String(NAME_MAX)),  # the fleet target the row was written for
)
_ADDED = (
    "last_statement TEXT",
    "code_checksum VARCHAR(64)",
    f"target VARCHAR({NAME_MAX})",
)  # columns newer than the table
_INSERT = LOG.insert()


@dataclass(frozen=True)
class Who:
    """Who runs the migration, with which code, and for which fleet target."""

    os_user: str
    host: str
    tool_version: str
    git_commit: str | None
    target: str | None = None

    @classmethod
    def here(cls, env: Environment) -> Who:
        return replace(_machine(env.root), target=env.target or None)


@functools.cache
def _machine(root: Path) -> Who:
    """The user, host, tool version and code commit of this process, read once: a fleet's
    worker writes them on target after target (the commit is the code this process loaded)."""
    try:
        version = metadata.version("shop-migrations")
    except metadata.PackageNotFoundError:
        version = "unknown"
    # each cut to its column's size: a long $LOGNAME, or a SHA-256 repository's 64-digit
    # commit, would otherwise fail every revision's row on PostgreSQL
    commit = _git_commit(root)
    return Who(
        _fit("os_user", _user()),
        _fit("host", socket.gethostname()),
        _fit("tool_version", version),
        commit and _fit("git_commit", commit),
    )


def _fit(column: str, value: str) -> str:
    length: int = LOG.c[column].type.length  # type: ignore[attr-defined]  # a String's
    return value[:length]


def _user() -> str:
    """The OS user; a container's bare UID (no name for it in /etc/passwd, nor in $USER)
    as ``uid 1000``, where ``getpass`` raises."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


@dataclass(frozen=True)
class Entry:
    id: int
    revision: str
    direction: str
    environment: str
    started_at: datetime
    os_user: str | None
    host: str | None
    checksum: str | None
    code_checksum: str | None = None
    target: str | None = None  # the fleet target it was written for


def checksum(path: str | Path) -> str:
    """SHA-256 of a revision file, with line endings normalised."""
    return _file_checksum(*_version(path))


def code_checksum(path: str | Path) -> str | None:
    """SHA-256 of what a revision does: its parsed code without docstrings, comments or
    formatting, so a reformatted file still matches, written alike by every Python version.
    None if the file does not parse."""
    return _code_checksum(*_version(path))


def _version(path: str | Path) -> tuple[str, int, int, int]:
    """A file and what tells one version of it from another, to key the caches below: a
    fleet's worker applies the same files to target after target."""
    found = os.stat(path)
    return str(path), found.st_ino, found.st_mtime_ns, found.st_size


@functools.lru_cache(maxsize=4096)
def _file_checksum(path: str, *_version: int) -> str:
    data = Path(path).read_bytes().replace(b"\r\n", b"\n")
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=4096)
def _code_checksum(path: str, *_version: int) -> str | None:
    tree = _code_of(path)
    return None if tree is None else hashlib.sha256(_code(tree).encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _dumped_checksum(path: str, *_version: int) -> str | None:
    """The code's checksum as the tool wrote it before, which a trail written then holds: of
    ``ast.dump``'s text, which each Python version writes otherwise (3.12 adds
    ``type_params=[]``, 3.13 leaves out what is empty)."""
    tree = _code_of(path)
    return None if tree is None else hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def _code_of(path: str) -> ast.Module | None:
    """A file's parsed code without its docstrings; None if it does not parse."""
    try:
        tree = ast.parse(Path(path).read_bytes())  # as Python reads it: a BOM, a coding line
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return tree


def _code(node: object) -> str:
    """A parsed file as text, the same on every Python version: each node with the fields
    that hold something (a newer Python adds fields that older code leaves empty)."""
    if isinstance(node, ast.AST):
        parts = []
        for name in node._fields:
            value = getattr(node, name, None)
            if value is None or (type(value) is list and not value):
                continue
            parts.append(f"{name}={_code(value)}")
        return f"{type(node).__name__}({','.join(parts)})"
    if type(node) is list:
        return f"[{','.join([_code(item) for item in node])}]"
    return repr(node)


def unchanged(path: str | Path, recorded: str | None, recorded_code: str | None) -> bool:
    """Whether a file still does what was recorded: the same bytes (fast), or the same code."""
    if recorded is None or recorded == checksum(path):
        return True
    if recorded_code is None:
        return False
    return recorded_code in (code_checksum(path), _dumped_checksum(*_version(path)))


def ensure_table(execute: Execute) -> None:
    """Create the table if missing; ``execute`` is a connection's, or Alembic's offline one."""
    execute(CreateTable(LOG, if_not_exists=True))
    connection = getattr(execute, "__self__", None)
    if isinstance(connection, Connection):  # a table made by an older version of the tool
        columns = _ours(_columns(connection))
        for added in _ADDED:
            if added.split()[0] not in columns:
                connection.exec_driver_sql(f"ALTER TABLE migration_log ADD COLUMN {added}")


@dataclass(frozen=True)
class Row:
    """One audit row to write: what ran, where, when, for how long, by whom, from which file."""

    revision: str
    direction: str
    environment: str
    started_at: datetime
    seconds: float
    who: Who
    file_checksum: str | None
    code: str | None = None

    def values(self) -> dict[str, Any]:
        who = self.who
        return {
            "revision": self.revision,
            "direction": self.direction,
            "environment": self.environment,
            "started_at": self.started_at,
            "duration_ms": round(self.seconds * 1000),
            "os_user": who.os_user,
            "host": who.host,
            "tool_version": who.tool_version,
            "git_commit": who.git_commit,
            "target": who.target,
            "checksum": self.file_checksum,
            "code_checksum": self.code,
        }


def record(target: Connection | MigrationContext, row: Row) -> int | None:
    """Write one row, in the caller's transaction (or as SQL, for an offline context).

    Returns the new row's id (None offline)."""
    values = row.values()
    if isinstance(target, MigrationContext) and target.as_sql:
        values.update(_when_applied(target.dialect.name))
        target.execute(LOG.insert().values(**values))  # rendered with the values inline
        return None
    result = _connection(target).execute(_INSERT, values)  # one compiled statement, reused
    key = result.inserted_primary_key
    return int(key[0]) if key is not None else None


def _when_applied(dialect: str) -> dict[str, ColumnElement[Any]]:
    """An offline row's time is when its SQL runs, not when it was rendered (days before,
    perhaps): the server's clock. PostgreSQL's ``now()`` is the revision's transaction's
    start, so its duration can be measured too; SQLite can say neither, so 0."""
    if dialect != "postgresql":
        return {"started_at": func.current_timestamp(), "duration_ms": literal(0)}
    elapsed = extract("epoch", func.clock_timestamp() - func.now()) * 1000
    return {"started_at": func.now(), "duration_ms": cast(func.round(elapsed), Integer)}


def record_and(connection: Connection, row: Row, also: ColumnElement[Any]) -> Any:
    """Write one row and return ``also``, evaluated in the same statement: a revision's row
    and its lock check cost one round trip, not two."""
    return connection.execute(_insert_returning(also), row.values()).scalar()


@functools.lru_cache(maxsize=8)
def _insert_returning(also: ColumnElement[Any]) -> Insert:
    """The insert with ``also`` returned, built once for all the rows of a run."""
    return _INSERT.returning(also)


def complete(target: Connection | MigrationContext, row_id: int, row: Row) -> None:
    """Turn a run-up/run-down row into a finished one, in the caller's transaction."""
    values = row.values()
    values.pop("started_at")
    _connection(target).execute(update(LOG).where(LOG.c.id == row_id).values(**values))


def set_statement(connection: Connection, row_id: int, statement: str) -> None:
    connection.execute(
        update(LOG).where(LOG.c.id == row_id).values(last_statement=statement[:2000])
    )


def _connection(target: Connection | MigrationContext) -> Connection:
    connection = target.connection if isinstance(target, MigrationContext) else target
    if connection is None:
        raise RuntimeError("an online migration context without a connection")
    return connection


def _ours(columns: set[str]) -> set[str]:
    """``columns``, if they are those of this tool's audit trail (an older one lacks only
    the ``_ADDED`` ones); an app's own table of that name is refused, not read or altered."""
    missing = [c.name for c in LOG.columns if c.name not in columns and not _added(c.name)]
    if missing:
        raise DbError(
            f"the database has a table {LOG.name} that is not this tool's audit trail (it has "
            f"no {missing[0]} column): nothing was run; rename that table, since the tasks "
            "keep their audit trail under that name"
        )
    return columns


def _added(name: str) -> bool:
    return any(added.split()[0] == name for added in _ADDED)


def _columns(connection: Connection) -> set[str]:
    """The table's columns, from an empty select: one cheap query, where reflecting the table
    costs several (and a fleet's worker asks on every target)."""
    return set(connection.execute(select(text("*")).select_from(LOG).where(false())).keys())


def entries(connection: Connection, schema: str | None = None) -> list[Entry]:
    """Every row, oldest first; none where the table does not exist yet in ``schema``
    (``SCHEMA``: a shared schema after it on the search path may have another database's)."""
    if not inspect(connection).has_table(LOG.name, schema=schema):
        return []
    columns = _ours(_columns(connection))
    code = LOG.c.code_checksum if "code_checksum" in columns else null()
    target = LOG.c.target if "target" in columns else null()
    rows = connection.execute(
        select(
            LOG.c.id,
            LOG.c.revision,
            LOG.c.direction,
            LOG.c.environment,
            LOG.c.started_at,
            LOG.c.os_user,
            LOG.c.host,
            LOG.c.checksum,
            code,
            target,
        ).order_by(LOG.c.id)
    )
    try:
        entries = [Entry(*tuple(row)) for row in rows]
    except (ValueError, TypeError) as exc:  # SQLite keeps any value in any column
        raise DbError(
            f"{LOG.name}, the audit trail, has a row whose started_at is no time ({exc}): "
            "fix that row, or delete it (an edit by hand?); nothing was run"
        ) from None
    # SQLite keeps no time zone; the times were written in UTC
    return [
        e if e.started_at.tzinfo else replace(e, started_at=e.started_at.replace(tzinfo=UTC))
        for e in entries
    ]


def unfinished(log: list[Entry]) -> list[Entry]:
    """Non-transactional revisions that started and were never finished or resolved."""
    return [entry for entry in log if entry.direction in ("run-up", "run-down")]


def last_statement(connection: Connection, entry: Entry) -> str | None:
    found = connection.execute(select(LOG.c.last_statement).where(LOG.c.id == entry.id))
    return found.scalar()


def resolve(connection: Connection, entry: Entry, applied: bool, who: Who) -> None:
    """Record how an unfinished revision ended, as an operator found it."""
    direction = entry.direction.removeprefix("run-") if applied else "aborted"
    connection.execute(
        update(LOG)
        .where(LOG.c.id == entry.id)
        .values(direction=direction, os_user=who.os_user, host=who.host)
    )


def applied_checksums(log: list[Entry]) -> dict[str, tuple[str | None, str | None]]:
    """Revision -> (file checksum, code checksum), for revisions whose last row says they
    are applied."""
    state: dict[str, tuple[str | None, str | None]] = {}
    for entry in log:
        if entry.direction in ("down", "unstamp"):
            state.pop(entry.revision, None)
        elif entry.direction in ("up", "accept", "stamp"):
            state[entry.revision] = (entry.checksum, entry.code_checksum)
    return state


def _git_commit(root: Path) -> str | None:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None
