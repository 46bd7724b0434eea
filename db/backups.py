"""Backups before a change: SQLite's backup API, or pg_dump when an env file asks for it."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import URL

from db.environments import Environment
from db.errors import ConfigError, DbError

BACKUP_DIR = Path("var") / "backups"


def before_change(env: Environment, url: URL) -> str | None:
    """Back the database up if the environment wants it; say what happened, if anything."""
    if url.get_backend_name() == "sqlite":
        path = sqlite_backup(env, url)
        return f"backed up to {env.relative(path)}" if path else None
    if env.get("BACKUP").strip().lower() != "pg_dump":
        return None
    if shutil.which("pg_dump") is None:
        return "BACKUP=pg_dump, but pg_dump is not installed here: skipped the backup"
    return f"backed up to {env.relative(pg_dump(env, url))} with pg_dump"


def sqlite_backup(env: Environment, url: URL) -> Path | None:
    """A consistent copy through SQLite's backup API, mode 0600; None for an empty file."""
    source = Path(url.database or "")
    if not source.is_file() or source.stat().st_size == 0:
        return None
    target = _new_file(env, "sqlite3")
    with sqlite3.connect(source) as live, sqlite3.connect(target) as copy:
        live.backup(copy)
    live.close()
    copy.close()
    _prune(env, "sqlite3")
    return target


def pg_dump(env: Environment, url: URL) -> Path:
    target = _new_file(env, "dump")
    command = ["pg_dump", "--format=custom", f"--file={target}", "--no-password"]
    command += [f"--host={url.host or 'localhost'}", f"--port={url.port or 5432}"]
    command += [f"--username={url.username or ''}", url.database or ""]
    environ = {**os.environ, "PGPASSWORD": url.password or ""} if url.password else None
    done = subprocess.run(command, capture_output=True, text=True, env=environ)
    if done.returncode != 0:
        target.unlink(missing_ok=True)
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise DbError(f"pg_dump failed, so nothing was migrated: {reason}")
    _prune(env, "dump")
    return target


def backups(env: Environment, suffix: str = "sqlite3") -> list[Path]:
    """This environment's backups, newest first."""
    found = (env.root / BACKUP_DIR).glob(f"{env.name}-*.{suffix}")
    return sorted(found, key=lambda p: p.name, reverse=True)


def restore(env: Environment, url: URL, backup: Path | None) -> Path:
    """Put a SQLite backup back in place of the database; returns the file used."""
    if url.get_backend_name() != "sqlite":
        raise ConfigError(f"{env.name} is PostgreSQL: restore a pg_dump backup with pg_restore")
    chosen = backup or next(iter(backups(env)), None)
    if chosen is None or not chosen.is_file():
        raise DbError(f"no backup to restore for {env.name} (looked in {BACKUP_DIR})")
    with sqlite3.connect(chosen) as copy, sqlite3.connect(url.database or "") as live:
        copy.backup(live)
    copy.close()
    live.close()
    return chosen


def _new_file(env: Environment, suffix: str) -> Path:
    folder = env.root / BACKUP_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    target = folder / f"{env.name}-{stamp}.{suffix}"
    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return target


def _prune(env: Environment, suffix: str) -> None:
    keep = int(env.number("BACKUP_KEEP", 5))
    for old in backups(env, suffix)[keep:]:
        old.unlink()
