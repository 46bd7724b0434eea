"""Throwaway workspaces for the benchmark: our project, and plain Alembic's templates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INVOKE = [sys.executable, "-m", "invoke"]
ALEMBIC = [sys.executable, "-m", "alembic"]
# A user's Python caches the revisions' bytecode; with PYTHONDONTWRITEBYTECODE set (as in
# some shells and containers) every run of every tool would compile them all again.
CHILD_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
PROJECT_FILES = [
    *("tasks.py", "alembic.ini", "pyproject.toml", ".squawk.toml", "cli", "db", "environments")
]

REVISION = '''"""create table t{n:04d}"""

import sqlalchemy as sa
from alembic import op

revision = "r{n:04d}"
down_revision = {down}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "t{n:04d}",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("price", sa.Numeric(10, 2), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_t{n:04d}_name", "t{n:04d}", ["name"])


def downgrade() -> None:
    op.drop_index("ix_t{n:04d}_name", table_name="t{n:04d}")
    op.drop_table("t{n:04d}")
'''

MODELS_HEADER = '''"""N synthetic tables, as the synthetic revisions create them."""

from sqlalchemy import Column, DateTime, Integer, MetaData, Numeric, String, Table, Text
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={conventions!r})
'''

MODEL = """
t{n:04d} = Table(
    "t{n:04d}",
    Base.metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, index=True),
    Column("price", Numeric(10, 2), nullable=False),
    Column("note", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""


def write_revisions(versions: Path, count: int) -> None:
    """``count`` revisions in a chain, each creating a five-column table with an index."""
    shutil.rmtree(versions, ignore_errors=True)
    versions.mkdir(parents=True)
    for n in range(1, count + 1):
        down = repr(f"r{n - 1:04d}") if n > 1 else "None"
        (versions / f"r{n:04d}.py").write_text(REVISION.format(n=n, down=down))


def project(root: Path, count: int, env: str, url: str, *, models: bool = False) -> Path:
    """A copy of this project with ``count`` synthetic revisions and an env named ``env``."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    write_revisions(root / "db" / "migrations" / "versions", count)
    (root / "environments" / f"{env}.env").write_text(f"DATABASE_URL={url}\n")
    if models:  # models that match the revisions, so `invoke check` compares N tables
        tables = "".join(MODEL.format(n=n) for n in range(1, count + 1))
        from db.models import NAMING_CONVENTION

        header = MODELS_HEADER.format(conventions=NAMING_CONVENTION)
        (root / "db" / "models.py").write_text(header + tables)
    return root


def plain_alembic(root: Path, count: int, template: str, url: str) -> Path:
    """``alembic init -t TEMPLATE`` with the same revisions: what a user would otherwise run."""
    root.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "alembic", "init", "-t", template, "migrations"],
        check=True,
        capture_output=True,
        cwd=root,
    )
    ini = root / "alembic.ini"
    text = ini.read_text().replace("driver://user:pass@localhost/dbname", url.replace("%", "%%"))
    ini.write_text(text)
    write_revisions(root / "migrations" / "versions", count)
    return root


def floor_sql(plain: Path, target: Path, dialect: str) -> Path:
    """The same DDL as one SQL file: plain Alembic's offline SQL in a single transaction."""
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
        cwd=plain,
        capture_output=True,
        text=True,
        check=True,
    )
    body = "\n".join(line for line in done.stdout.splitlines() if line not in ("BEGIN;", "COMMIT;"))
    # psql -1 wraps the file in one transaction itself; sqlite3 needs it written out
    target.write_text(f"BEGIN;\n{body}\nCOMMIT;\n" if dialect == "sqlite" else body + "\n")
    return target


def checksum_validation_ms(root: Path, count: int, rounds: int = 5) -> float:
    """Milliseconds to compare ``count`` applied revisions' recorded checksums with files."""
    import os
    import statistics
    import time
    from datetime import datetime, timezone

    from db import audit, guards
    from db.environments import load_environment
    from db.runner import load_scripts, make_config

    project(root, count, "bench", "sqlite:///var/bench.sqlite3")
    env = load_environment(root, "bench", os.environ)
    script = load_scripts(make_config(env, offline=True))
    now = datetime.now(timezone.utc)
    log = [
        audit.Entry(0, rev.revision, "up", "bench", now, "me", "host", audit.checksum(rev.path))
        for rev in script.walk_revisions()
    ]
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        assert not guards.changed_files(log, script, env)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def run(command: list[str], cwd: Path) -> float:
    """Seconds the command took; it must succeed."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=CHILD_ENV)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{done.stderr[-2000:]}")
    return seconds


def psql_floor(dsn: str, sql: Path) -> list[str]:
    """The floor: ``psql`` running a SQL file in one transaction, stopping at an error."""
    return ["psql", "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(sql)]
