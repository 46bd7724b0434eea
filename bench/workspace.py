"""Throwaway workspaces for the benchmark: our project, and plain Alembic's templates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["tasks.py", "alembic.ini", "pyproject.toml", ".squawk.toml", "db", "environments"]

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
    if models:  # the models match the revisions, so `invoke check` compares N tables
        header = "from sqlalchemy import Column, DateTime, Integer, Numeric, String, Table, Text\n"
        tables = "".join(MODEL.format(n=n) for n in range(1, count + 1))
        with (root / "db" / "models.py").open("a") as models_file:
            models_file.write("\n" + header + tables)
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
