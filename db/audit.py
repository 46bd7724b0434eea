"""The audit trail: one ``migration_log`` row per revision applied, rolled back or accepted.

Rows are written on the revision's own connection, inside its transaction, so a revision
and its row commit (or vanish) together. They also carry the SHA-256 of the revision file,
which later runs compare with the file on disk.
"""

from __future__ import annotations

import getpass
import hashlib
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
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
)
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.expression import Executable

UTC = timezone.utc
Execute = Callable[[Executable], Any]
LOG = Table(
    "migration_log",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("revision", String(64), nullable=False),
    Column("direction", String(8), nullable=False),  # up, down, accept, or env (renamed)
    Column("environment", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("os_user", String(128)),
    Column("host", String(255)),
    Column("tool_version", String(32)),
    Column("git_commit", String(40)),
    Column("checksum", String(64)),
)
_INSERT = LOG.insert()


@dataclass(frozen=True)
class Who:
    """Who runs the migration, and with which code."""

    os_user: str
    host: str
    tool_version: str
    git_commit: str | None

    @classmethod
    def here(cls, root: Path) -> Who:
        try:
            version = metadata.version("shop-migrations")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return cls(getpass.getuser(), socket.gethostname(), version, _git_commit(root))


@dataclass(frozen=True)
class Entry:
    revision: str
    direction: str
    environment: str
    started_at: datetime
    os_user: str | None
    host: str | None
    checksum: str | None


def checksum(path: str | Path) -> str:
    """SHA-256 of a revision file, with line endings normalised."""
    data = Path(path).read_bytes().replace(b"\r\n", b"\n")
    return hashlib.sha256(data).hexdigest()


def ensure_table(execute: Execute) -> None:
    """Create the table if missing; ``execute`` is a connection's, or Alembic's offline one."""
    execute(CreateTable(LOG, if_not_exists=True))


def record(
    target: Connection | MigrationContext,
    *,
    revision: str,
    direction: str,
    environment: str,
    started_at: datetime,
    seconds: float,
    who: Who,
    file_checksum: str | None,
) -> None:
    """Write one row, in the caller's transaction (or as SQL, for an offline context)."""
    row = {
        "revision": revision,
        "direction": direction,
        "environment": environment,
        "started_at": started_at,
        "duration_ms": round(seconds * 1000),
        "os_user": who.os_user,
        "host": who.host,
        "tool_version": who.tool_version,
        "git_commit": who.git_commit,
        "checksum": file_checksum,
    }
    if isinstance(target, MigrationContext) and target.as_sql:
        target.execute(LOG.insert().values(**row))  # rendered with the values inline
        return
    connection = target.connection if isinstance(target, MigrationContext) else target
    if connection is None:
        raise RuntimeError("an online migration context without a connection")
    connection.execute(_INSERT, row)  # one compiled statement, reused for every row


def entries(connection: Connection) -> list[Entry]:
    """Every row, oldest first; none where the table does not exist yet."""
    if not inspect(connection).has_table(LOG.name):
        return []
    rows = connection.execute(
        select(
            LOG.c.revision,
            LOG.c.direction,
            LOG.c.environment,
            LOG.c.started_at,
            LOG.c.os_user,
            LOG.c.host,
            LOG.c.checksum,
        ).order_by(LOG.c.id)
    )
    entries = [Entry(*row) for row in rows]
    # SQLite keeps no time zone; the times were written in UTC
    return [
        e if e.started_at.tzinfo else replace(e, started_at=e.started_at.replace(tzinfo=UTC))
        for e in entries
    ]


def applied_checksums(log: list[Entry]) -> dict[str, str | None]:
    """Revision -> checksum, for revisions whose last row says they are applied."""
    state: dict[str, str | None] = {}
    for entry in log:
        if entry.direction == "down":
            state.pop(entry.revision, None)
        elif entry.direction in ("up", "accept"):
            state[entry.revision] = entry.checksum
    return state


def _git_commit(root: Path) -> str | None:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None
