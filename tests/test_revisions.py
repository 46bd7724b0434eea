"""Every revision in db/migrations/versions, checked: add a revision and it is tested here.

The properties pytest-alembic checks (single head, stairway, up/down consistency, models
match the DDL), plus parity between SQLite and PostgreSQL, on real databases of both kinds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from conftest import PgDatabase

from db import commands, review
from db.environments import Environment, load_environment
from db.schema import differences, snapshot

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
REVISIONS = [rev.revision for rev in reversed(list(SCRIPTS.walk_revisions()))]


def just(rev: str) -> str:
    """The --to that undoes ``rev`` alone: its first parent for a merge, else REV@-1."""
    script = SCRIPTS.get_revision(rev)
    parents = script.down_revision if script else None
    return parents[0] if isinstance(parents, tuple) and len(parents) > 1 else f"{rev}@-1"


def describe(rev: str) -> str:
    script = SCRIPTS.get_revision(rev)
    return f"revision {rev} ({script.doc if script else '?'})"


def environment(tmp_path: Path, url: str) -> Environment:
    (tmp_path / "environments").mkdir(exist_ok=True)
    (tmp_path / "environments" / "t.env").write_text(f"DATABASE_URL={url}\n")
    for name in ("alembic.ini", "db"):
        if not (tmp_path / name).exists():
            (tmp_path / name).symlink_to(ROOT / name)
    return load_environment(tmp_path, "t", {})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Environment:
    if request.param == "sqlite":
        return environment(tmp_path, "sqlite:///t.sqlite3")
    return environment(tmp_path, request.getfixturevalue("pg_database").url)


def test_single_head_revision() -> None:
    heads = SCRIPTS.get_heads()
    assert len(heads) == 1, f"the revisions have {len(heads)} heads ({heads}): run invoke merge"


def test_stairway_up_down_up_leaves_no_trace(env: Environment) -> None:
    """For each revision in order: upgrade to it, undo it alone, upgrade again.

    Branches and merge points included: a branch revision is undone with REV@-1, a merge
    revision by going back to one of its parents (which leaves both branches applied).
    """
    for rev in REVISIONS:
        before = snapshot(env)
        commands.migrate(env, rev)
        upgraded = snapshot(env)
        commands.rollback(env, to=just(rev))
        trace = differences(before, snapshot(env), ("before it", "after its downgrade"))
        assert not trace, f"the downgrade of {describe(rev)} leaves a trace: {trace}"
        commands.migrate(env, rev)
        again = differences(upgraded, snapshot(env), ("the first time", "the second"))
        assert not again, f"{describe(rev)} upgrades differently the second time: {again}"


def test_model_definitions_match_the_migrated_database(env: Environment) -> None:
    commands.migrate(env)
    problems = review.check(env)
    assert not problems, f"at head ({describe(REVISIONS[-1])}): {problems}"


@pytest.mark.postgres
def test_sqlite_and_postgres_agree_at_head(tmp_path: Path, pg_database: PgDatabase) -> None:
    (tmp_path / "lite").mkdir()
    lite = environment(tmp_path / "lite", "sqlite:///t.sqlite3")
    pg = environment(tmp_path, pg_database.url)
    commands.migrate(lite)
    commands.migrate(pg)
    gaps = differences(snapshot(lite), snapshot(pg), ("on SQLite", "on PostgreSQL"))
    assert not gaps, f"at head ({describe(REVISIONS[-1])}) SQLite and PostgreSQL differ: {gaps}"
