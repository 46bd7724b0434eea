"""Fixtures: a throwaway copy of the project, and throwaway PostgreSQL databases.

Acceptance tests run the real ``invoke`` commands in a copy of the project, so they see
exactly what a user sees. PostgreSQL tests skip with a reason where no server answers,
and fail instead under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
COPIED = ["tasks.py", "alembic.ini", "pyproject.toml", ".squawk.toml", "db", "environments"]


@dataclass
class Project:
    """A copy of the project in a temporary directory, driven through ``invoke``."""

    root: Path
    environ: dict[str, str]

    def invoke(
        self, *args: str, cwd: Path | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "invoke", *args],
            cwd=cwd or self.root,
            env={**self.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=int(os.environ.get("TEST_INVOKE_TIMEOUT", "120")),
        )

    def ok(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        result = self.invoke(*args, **env)
        assert result.returncode == 0, f"invoke {' '.join(args)} failed:\n{result.stderr}"
        return result

    def fails(self, *args: str, **env: str) -> str:
        """Run a task that must fail cleanly; return its stderr."""
        result = self.invoke(*args, **env)
        assert result.returncode != 0, f"invoke {' '.join(args)} should fail:\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert starts, f"no 'error:' line:\n{result.stderr}"
        assert len(lines) - starts[0] <= 2, f"the error takes more than two lines:\n{result.stderr}"
        return result.stderr

    def write_env(self, name: str, text: str) -> None:
        (self.root / "environments" / f"{name}.env").write_text(text, encoding="utf-8")

    @property
    def versions(self) -> Path:
        return self.root / "db" / "migrations" / "versions"

    def add_revision(self, name: str, body: str) -> None:
        (self.versions / f"{name}.py").write_text(body, encoding="utf-8")

    def sqlite(self, relative: str = "var/dev.sqlite3") -> sqlite3.Connection:
        return sqlite3.connect(self.root / relative)


def head_revision() -> str:
    """The id of the bundled head revision, read from the files."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_heads()
    assert len(heads) == 1
    return heads[0]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "project"
    root.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source,
                root / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.local.env"),
            )
        else:
            shutil.copy2(source, root / name)
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("INVOKE_") and not key.endswith("_DB_PASSWORD")
    }
    environ["PYTHONDONTWRITEBYTECODE"] = "1"
    return Project(root, environ)


# --- PostgreSQL -------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _execute(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _fetch(dsn: str, query: str) -> list[Any]:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await connection.fetch(query))
    finally:
        await connection.close()


def pg_fetch(dsn: str, query: str) -> list[Any]:
    return run(_fetch(dsn, query))  # type: ignore[no-any-return]


def pg_execute(dsn: str, *statements: str) -> None:
    run(_execute(dsn, *statements))


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin DSN of a reachable PostgreSQL server, or skip (fail under CI)."""
    try:
        run(_fetch(PG_ADMIN, "select 1"))
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        reason = f"PostgreSQL not reachable at {PG_ADMIN} ({exc}); set TEST_PG_URL to use another"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI requires PostgreSQL: {reason}")
        pytest.skip(reason)
    return PG_ADMIN


@dataclass
class PgDatabase:
    name: str
    dsn: str  # for asyncpg / psql
    url: str  # for an env file (asyncpg driver)


def _new_database(admin: str) -> PgDatabase:
    name = f"mig_{uuid.uuid4().hex[:12]}"
    pg_execute(admin, f'CREATE DATABASE "{name}"')
    dsn = admin.rsplit("/", 1)[0] + f"/{name}"
    return PgDatabase(name, dsn, dsn.replace("postgresql://", "postgresql+asyncpg://", 1))


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[PgDatabase]:
    """A fresh, empty database on the server, dropped afterwards."""
    database = _new_database(pg_server)
    yield database
    pg_execute(pg_server, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')


@pytest.fixture
def pg_database_2(pg_server: str) -> Iterator[PgDatabase]:
    database = _new_database(pg_server)
    yield database
    pg_execute(pg_server, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')
