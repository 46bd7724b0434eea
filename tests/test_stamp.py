"""Adopting a database made with ``Base.metadata.create_all()``: ``invoke stamp``."""

from __future__ import annotations

import asyncio
import signal

import pytest
from conftest import (
    PgDatabase,
    Project,
    head_revision,
    log_rows,
    pg_execute,
    pg_fetch,
    popen,
    revision,
    scratch_of,
    version,
    versions_of,
    wait_until,
)
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import Base

HEAD = head_revision()


def made_by_the_app(url: str) -> None:
    engine = create_engine(url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()


@pytest.fixture
def adopted(project: Project) -> Project:
    (project.root / "var").mkdir()
    made_by_the_app(f"sqlite:///{project.root / 'var' / 'dev.sqlite3'}")
    return project


def test_migrate_on_a_database_made_without_migrations_points_to_stamp(adopted: Project) -> None:
    error = adopted.fails("migrate")

    assert "table categories already exists" in error
    assert "adopted with `invoke stamp --env=dev REV`" in error


def test_a_table_in_the_way_of_a_later_revision_is_not_called_a_database_made_without_migrations(
    project: Project,
) -> None:
    """The hint was given for any "already exists" in a run's first revision, also on a
    database that migrations made, where a table made by hand is in the way."""
    project.migrated()
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))'
    project.add_revision("notes", revision("notes1", HEAD, body, message="add notes"))
    with project.sqlite() as db:
        db.execute("create table notes (id integer)")

    error = project.fails("migrate")

    assert "table notes already exists" in error
    assert f"the database is at {HEAD}; notes1 was rolled back; fix it and run the task" in error
    assert "made without migrations" not in error and "stamp" not in error


def test_stamp_adopts_a_matching_database(adopted: Project) -> None:
    result = adopted.ok("stamp", "head")

    assert f"recorded {HEAD} as applied, not run" in result.stderr
    assert version(adopted) == [HEAD]
    assert [row[1] for row in log_rows(adopted)] == ["stamp"]
    assert "nothing to do" in adopted.ok("migrate").stderr
    assert f"{HEAD}  applied" in adopted.ok("history").stdout


def test_stamp_on_a_protected_environment_needs_confirming(adopted: Project) -> None:
    adopted.write_env("safe", "DATABASE_URL=sqlite:///var/dev.sqlite3\nPROTECTED=true\n")

    refused = adopted.invoke("stamp", "head", "--env=safe")

    assert refused.returncode == 4, refused.stderr
    assert "safe is protected and there is no terminal to confirm on: pass --yes" in refused.stderr
    assert version(adopted) == []
    stamped = adopted.ok("stamp", "head", "--env=safe", "--yes")
    assert f"recorded {HEAD} as applied" in stamped.stderr
    assert version(adopted) == [HEAD]


def test_a_stamp_back_says_what_it_took_away_and_the_trail_records_it(project: Project) -> None:
    project.add_revision("empty", revision("empty001", HEAD))  # no schema change: stamp agrees
    project.ok("migrate")

    again = project.ok("stamp", "head")
    assert "dev: already at empty001: nothing recorded" in again.stderr  # nothing changed
    back = project.ok("stamp", HEAD)

    assert f"dev: recorded {HEAD} as its revision, not run; no longer applied: empty001" in (
        back.stderr
    )
    assert version(project) == [HEAD]
    assert [(row[0], row[1]) for row in log_rows(project)][-1] == ("empty001", "unstamp")
    project.add_revision(
        "empty", revision("empty001", HEAD) + "EDITED = True  # once stamped away\n"
    )
    status = project.ok("status")  # no longer applied: its edit is no applied file's change
    assert "changed after revision" not in status.stderr and "pending: 1" in status.stdout


def test_a_squashed_history_is_adopted_by_stamping_the_revision_that_replaces_it(
    project: Project,
) -> None:
    """Revisions squashed into one: the database's revision is in no file any more, and
    every task (stamp too) refused it, so the only way on was editing alembic_version by
    hand. stamp now records the new revision once the schema matches it."""
    project.add_revision("empty", revision("empty001", HEAD))
    project.migrated()
    [first] = project.versions.glob(f"*_{HEAD}_*.py")
    squashed = first.read_text().replace(f'revision: str = "{HEAD}"', 'revision: str = "squash01"')
    for old in project.versions.glob("*.py"):
        old.unlink()
    project.add_revision("squash01", squashed.replace("create shop tables", "all of it"))

    status = project.invoke("status")
    assert status.returncode == 1
    assert "(squashed into a new one? `invoke stamp --env=dev NEW` records it)" in status.stderr
    project.add_revision("squash01", squashed.replace('"purchases",', '"sales",'))  # differs
    assert project.invoke("stamp", "squash01").returncode == 4 and version(project) == ["empty001"]
    project.add_revision("squash01", squashed.replace("create shop tables", "all of it"))

    stamped = project.ok("stamp", "squash01")

    assert stamped.stderr.endswith(
        "dev: recorded squash01 as its revision, not run, in place of empty001, which no file has\n"
    )
    assert version(project) == ["squash01"]
    rows = [(row[0], row[1]) for row in log_rows(project)][-3:]
    assert set(rows) == {(HEAD, "unstamp"), ("empty001", "unstamp"), ("squash01", "stamp")}
    project.write_env("dev", "DATABASE_URL=sqlite:///var/dev.sqlite3\nPROTECTED=true\n")
    after = project.ok("migrate", "--yes")  # no "file is missing" refusal on a protected env
    assert after.stderr.endswith("dev: nothing to do, the database is already there\n")
    assert "check passed" in project.ok("check").stderr


def test_check_finds_applied_revisions_without_checksums_and_stamp_records_them(
    project: Project,
) -> None:
    """A database migrated by plain Alembic (or whose trail was emptied) has applied
    revisions that nothing checked: `check` said "files unchanged", and `stamp` at its
    revision said "nothing recorded", so their files could never be checked."""
    project.add_revision("empty", revision("empty001", HEAD))
    project.ok("migrate")
    with project.sqlite() as db:
        db.execute("delete from migration_log")

    problems = project.invoke("check")

    assert problems.returncode == 5, problems.stderr
    assert f"2 applied revision(s) have no checksum in migration_log ({HEAD}, empty001)" in (
        problems.stderr
    )
    assert "`invoke stamp --env=dev empty001` compares the schema and records them" in (
        problems.stderr
    )
    history = project.ok("history").stdout  # no when and by whom to show, and it says so
    assert history.count("  [when and by whom: not recorded]\n") == 2
    stamped = project.ok("stamp", "empty001")
    assert (
        "dev: already at empty001; recorded the checksums of 2 revision(s) applied without "
        f"any: {HEAD}, empty001\n"
    ) in stamped.stderr
    assert {(row[0], row[1]) for row in log_rows(project)} == {
        (HEAD, "stamp"),
        ("empty001", "stamp"),
    }
    assert "check passed" in project.ok("check").stderr
    assert "nothing recorded" in project.ok("stamp", "empty001").stderr
    with project.sqlite() as db:  # a row without a checksum records no file either
        db.execute("update migration_log set checksum = null where revision = 'empty001'")
    assert "1 applied revision(s) have no checksum" in project.invoke("check").stderr
    assert "recorded the checksums of 1 revision(s)" in project.ok("stamp", "empty001").stderr
    project.add_revision("empty", revision("empty001", HEAD) + "EDITED = True\n")
    assert "changed after revision empty001" in project.invoke("check").stderr  # now checked


@pytest.mark.parametrize("spec", ["head-1", "-1", f"{HEAD}+1"])
def test_stamp_of_steps_asks_for_the_revision_itself(adopted: Project, spec: str) -> None:
    """Alembic's stamp takes no steps: it said "No such revision or branch 'head-1'", and
    of ``-1`` that a partial id needs four characters."""
    error = adopted.fails("stamp", spec)

    assert error.endswith(
        f"error: stamp takes a revision named by its id, not by steps ({spec}): name the "
        "revision itself; see `invoke history --env=dev`\n"
    )
    assert version(adopted) == []


def test_stamp_refuses_a_schema_that_differs_unless_forced(adopted: Project) -> None:
    """It said which of the two had a table ("only on one side"), and printed a changed
    table's columns whole, the database's and the revision's, one dict after the other."""
    with adopted.sqlite() as db:
        db.execute("drop table purchases")
        db.execute("alter table users add column nickname text")

    result = adopted.invoke("stamp", "head")

    assert result.returncode == 4, result.stderr
    assert (
        f"is not what revision {HEAD} produces (table purchases only in what {HEAD} produces; "
        "column users.nickname only in the database): nothing was recorded"
    ) in result.stderr
    assert version_table_absent(adopted)
    forced = adopted.ok("stamp", "head", "--force")
    assert f"differs (--force): table purchases only in what {HEAD} produces" in forced.stderr
    assert version(adopted) == [HEAD]


def version_table_absent(project: Project) -> bool:
    with project.sqlite() as db:
        found = db.execute("select name from sqlite_master where name = 'alembic_version'")
        return found.fetchone() is None


@pytest.mark.postgres
def test_stamp_on_postgres_compares_with_a_scratch_database(
    project: Project, pg_database: PgDatabase, pg_server: str
) -> None:
    async def create_all() -> None:
        engine = create_async_engine(pg_database.url)
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        await engine.dispose()

    asyncio.run(create_all())
    pg_execute(pg_database.dsn, "alter table users add column nickname text")
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\n")

    error = project.fails("stamp", "head", "--env=ci")
    assert "(column users.nickname only in the database)" in error
    pg_execute(pg_database.dsn, "alter table users drop column nickname")
    project.ok("stamp", "head", "--env=ci")

    assert versions_of(pg_database.dsn) == [HEAD]
    assert pg_fetch(pg_server, scratch_of(pg_database)) == []


# A column of the type an extension has, which a DBA installed (not a revision)
CITEXT_EMAIL = (
    "from sqlalchemy.dialects import postgresql\n"
    '    op.add_column("users", sa.Column("email", postgresql.CITEXT()))'
)


@pytest.mark.postgres
def test_a_stamp_whose_scratch_migration_fails_says_where_the_database_really_is(
    project: Project, pg_database: PgDatabase, pg_server: str
) -> None:
    """The scratch database has none of the database's extensions; its migration's failure
    was told as the database's own ("the database is at f3af...; email1 was rolled back")
    while the database stood at email1, untouched."""
    pg_execute(pg_database.dsn, "create extension citext")
    project.add_revision("email", revision("email1", HEAD, CITEXT_EMAIL))
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\n")
    project.ok("migrate", "--env=ci")

    error = project.fails("stamp", "email1", "--env=ci")

    assert error.endswith(
        "error: stamp builds what email1 produces in a scratch database, to compare, and the "
        "revisions failed there: upgrade of revision email1 (hand written) failed: "
        'ProgrammingError: type "citext" does not exist\n'
        "nothing was recorded; the ci database is as it was. A revision that needs what a new "
        "database lacks (an extension: CREATE EXTENSION IF NOT EXISTS ...) must make it, as "
        "each new database needs; or pass --force to record it without comparing\n"
    )
    assert versions_of(pg_database.dsn) == ["email1"]
    assert pg_fetch(pg_server, scratch_of(pg_database)) == []
    made = f'op.execute("CREATE EXTENSION IF NOT EXISTS citext")\n    {CITEXT_EMAIL}'
    project.add_revision("email", revision("email1", HEAD, made))
    project.ok("stamp", "email1", "--env=ci")


@pytest.mark.postgres
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_a_signal_while_stamp_compares_records_nothing_and_says_so(
    project: Project, pg_database: PgDatabase, pg_server: str, debug: bool
) -> None:
    """A stamp of one database took no note of signals: SIGINT during its scratch
    migration said only `interrupted (SIGINT)`, and with --debug nothing, exit 1."""
    project.add_revision("slow", revision("slow01", HEAD, 'op.execute("select pg_sleep(59)")'))
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\n")
    project.ok("migrate", "--env=ci", f"--to={HEAD}")
    # its own scratch database's (found by its name): not another test's stamp at the time
    sleeping = (
        "select 1 from pg_stat_activity where query like 'select pg_sleep(59)%' and datname in "
        f"({scratch_of(pg_database)})"
    )
    run = popen(project, "stamp", "slow01", "--env=ci", *(["--debug"] if debug else []))
    try:
        wait_until(lambda: pg_fetch(pg_server, sleeping), "the scratch migration", process=run)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=30)  # not pg_sleep's 59
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()

    assert run.returncode == 130, err
    assert err.endswith("interrupted before stamping: nothing was recorded\n"), err
    assert ("Traceback" in err) == debug
    assert versions_of(pg_database.dsn) == [HEAD]
    assert [row["direction"] for row in pg_fetch(pg_database.dsn, LOG)] == ["up"]
    assert pg_fetch(pg_server, scratch_of(pg_database)) == []


LOG = "select direction from migration_log order by id"
