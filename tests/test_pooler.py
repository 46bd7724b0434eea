"""Behind PgBouncer: session mode works as a direct connection does; transaction mode is
refused unless MIGRATION_URL gives migrations a direct connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from conftest import (
    PG_ADMIN,
    PgDatabase,
    Project,
    head_revision,
    lock_holders,
    pg_execute,
    pg_fetch,
    pgbouncer,
    popen,
    revision,
    scratch_of,
    settings_revision,
    versions_of,
)
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from db.environments import load_environment
from db.models import Category
from db.session import session_factory

pytestmark = pytest.mark.postgres
SERVER = make_url(PG_ADMIN)
HEAD = head_revision()


@pytest.fixture
def session_pool(pg_server: str) -> Iterator[int]:
    with pgbouncer(SERVER.port or 5432, "session") as port:
        yield port


@pytest.fixture
def transaction_pool(pg_server: str) -> Iterator[int]:
    with pgbouncer(SERVER.port or 5432, "transaction") as port:
        yield port


def pooled(database: PgDatabase, port: int) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database.name}"


def test_session_mode_migrates_with_the_session_settings_and_releases_the_lock(
    project: Project, pg_database: PgDatabase, session_pool: int
) -> None:
    project.write_env("ci", f"DATABASE_URL={pooled(pg_database, session_pool)}\nLOCK_TIMEOUT=1s\n")
    settings_revision(project)

    project.ok("migrate", "--env=ci")

    [row] = pg_fetch(pg_database.dsn, "select * from seen")
    assert (row["lt"], row["st"], row["app"]) == ("1s", "15min", "migrations")
    assert not lock_holders(pg_database)  # unlocked, although PgBouncer keeps the session


def test_session_mode_runs_at_once_apply_each_revision_once(
    project: Project, pg_database: PgDatabase, session_pool: int
) -> None:
    project.write_env("ci", f"DATABASE_URL={pooled(pg_database, session_pool)}\n")
    slow = 'op.execute("select pg_sleep(0.5)")\n    op.create_table("made_{}")'
    project.add_revision("a", revision("run01", head_revision(), slow.format(1)))
    project.add_revision("b", revision("run02", "run01", slow.format(2)))

    runs = [popen(project, "migrate", "--env=ci") for _ in range(3)]
    results = [(run.wait(timeout=120), run.communicate()[1]) for run in runs]

    assert [code for code, _ in results] == [0, 0, 0], results
    assert sum("applied run01" in err for _, err in results) == 1
    rows = pg_fetch(pg_database.dsn, "select revision from migration_log where direction = 'up'")
    assert sorted(row["revision"] for row in rows) == sorted([head_revision(), "run01", "run02"])


def test_a_schema_fleet_through_a_session_pool_as_small_as_its_jobs_migrates(
    project: Project, pg_database: PgDatabase, pg_server: str
) -> None:
    """Each target holds one of the pool's server connections for its session, and the
    pooler check asked for a second one: with every connection taken, the targets waited
    for each other until PgBouncer's query_wait_timeout (two minutes), then failed."""
    shops = ("s1", "s2", "s3")
    with pgbouncer(SERVER.port or 5432, "session", pool_size=2) as port:
        project.write_env(
            "tenants",
            f"DATABASE_URL={pooled(pg_database, port)}\nSCHEMA={{target}}\n"
            f"TARGETS={','.join(shops)}\n",
        )

        result = project.invoke("migrate", "--env=tenants", "--jobs=3")

    assert result.returncode == 0, result.stderr
    assert "3 targets: 3 migrated" in result.stderr
    for shop in shops:
        rows = pg_fetch(pg_database.dsn, f"select version_num from {shop}.alembic_version")
        assert [row["version_num"] for row in rows] == [head_revision()]


def test_stamp_behind_a_pooler_that_lists_its_databases_says_to_go_direct(
    project: Project, pg_database: PgDatabase, pg_server: str
) -> None:
    """stamp compares with a scratch database it makes on the server; a pooler that lists
    its databases cannot reach that one, and it said only `no such database`."""
    project.write_env("direct", f"DATABASE_URL={pg_database.url}\n")
    project.ok("migrate", "--env=direct")
    pg_execute(pg_database.dsn, "drop table migration_log")  # as if plain Alembic had run
    with pgbouncer(SERVER.port or 5432, "session", databases=(pg_database.name,)) as port:
        project.write_env("ci", f"DATABASE_URL={pooled(pg_database, port)}\n")

        error = project.fails("stamp", "--env=ci", HEAD)

        assert "no such database: stamp_scratch_" in error
        assert "set MIGRATION_URL in environments/ci.env to the server itself" in error
        assert error.rstrip().endswith("nothing was recorded")
        assert pg_fetch(pg_database.dsn, "select to_regclass('migration_log') as t")[0]["t"] is None
        assert pg_fetch(pg_server, scratch_of(pg_database)) == []
        project.write_env(
            "ci", f"DATABASE_URL={pooled(pg_database, port)}\nMIGRATION_URL={pg_database.url}\n"
        )
        stamped = project.ok("stamp", "--env=ci", HEAD).stderr

    assert f"ci: already at {HEAD}; recorded the checksums of 1 revision(s)" in stamped
    assert versions_of(pg_database.dsn) == [HEAD]


def test_transaction_mode_is_refused_before_anything_runs(
    project: Project, pg_database: PgDatabase, transaction_pool: int
) -> None:
    project.write_env("ci", f"DATABASE_URL={pooled(pg_database, transaction_pool)}\n")

    result = project.invoke("migrate", "--env=ci")

    assert result.returncode == 2, result.stderr
    assert "pooler in transaction mode" in result.stderr
    assert "set MIGRATION_URL in environments/ci.env" in result.stderr
    assert "Traceback" not in result.stderr
    tables = pg_fetch(pg_database.dsn, "select tablename from pg_tables where schemaname='public'")
    assert tables == []


def test_statement_mode_is_refused_with_what_to_do(project: Project, pg_server: str) -> None:
    """PgBouncer in statement mode refuses the transaction the connection opens with."""
    with pgbouncer(SERVER.port or 5432, "statement") as port:
        project.write_env(
            "ci", f"DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:{port}/test\n"
        )

        result = project.invoke("migrate", "--env=ci")

    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(
        "transaction blocks not allowed in statement pooling mode (a pooler in statement mode "
        "runs no transactions: set MIGRATION_URL in the env file to a direct URL, or a "
        "session-mode pool, for migrations)\n"
    )


def test_migration_url_takes_migrations_past_the_pooler(
    project: Project, pg_database: PgDatabase, transaction_pool: int
) -> None:
    project.write_env(
        "ci",
        f"DATABASE_URL={pooled(pg_database, transaction_pool)}\nMIGRATION_URL={pg_database.url}\n",
    )

    result = project.ok("migrate", "--env=ci")

    assert f"/{pg_database.name}" in result.stderr
    assert versions_of(pg_database.dsn) == [head_revision()]
    env = load_environment(project.root, "ci", {})
    assert env.url().port == SERVER.port
    assert env.url(app=True).port == transaction_pool  # the app keeps the pooled URL


def test_a_fleet_behind_a_transaction_pool_migrates_through_its_migration_url(
    project: Project, pg_database: PgDatabase, pg_database_2: PgDatabase, transaction_pool: int
) -> None:
    """Each target's run refuses the pooler as one database's does; a templated
    MIGRATION_URL takes every target's migrations past it, and the app keeps the pool."""
    names = f"{pg_database.name} {pg_database_2.name}"
    pooled_fleet = f"postgresql+asyncpg://postgres@127.0.0.1:{transaction_pool}/{{target}}"
    project.write_env("shops", f"DATABASE_URL={pooled_fleet}\nTARGETS={names}\n")

    refused = project.invoke("migrate", "--env=shops")

    assert refused.returncode == 6, refused.stderr
    assert refused.stderr.count("pooler in transaction mode") >= 2  # each target's line
    assert "Traceback" not in refused.stderr
    for database in (pg_database, pg_database_2):  # nothing ran on either
        assert not pg_fetch(database.dsn, "select 1 from pg_tables where schemaname = 'public'")
    direct = f"postgresql+asyncpg://postgres@{SERVER.host}:{SERVER.port or 5432}/{{target}}"
    project.extend_env("shops", f"MIGRATION_URL={direct}\n")
    project.ok("migrate", "--env=shops")
    for database in (pg_database, pg_database_2):
        assert versions_of(database.dsn) == [head_revision()]
    env = load_environment(project.root, "shops", {})
    assert f":{transaction_pool}/{{target}}" in env.get("DATABASE_URL")  # the app's, pooled


def test_the_apps_sessions_through_a_transaction_pool_stay_in_their_schema(
    project: Project, pg_database: PgDatabase, pg_server: str
) -> None:
    """Where PgBouncer hands one server connection to client after client, a schema set on
    connecting is the last client's: a shop's rows went into another shop's schema, and
    asyncpg's named prepared statements were missing on the next server connection. With
    MIGRATION_URL set (DATABASE_URL is the pooler), the app's engine sets the schema in
    each transaction and names no prepared statement."""
    with pgbouncer(SERVER.port or 5432, "transaction", pool_size=1) as port:
        project.write_env(
            "tenants",
            f"DATABASE_URL={pooled(pg_database, port)}\nMIGRATION_URL={pg_database.url}\n"
            "SCHEMA={target}\nTARGETS=alpha,beta\n",
        )
        project.ok("migrate", "--env=tenants")
        env = load_environment(project.root, "tenants", {})

        async def shops_take_turns() -> None:
            alpha, beta = session_factory(env, "alpha"), session_factory(env, "beta")
            for n, sessions in enumerate([alpha, beta, alpha, beta, alpha]):
                async with sessions() as session, session.begin():
                    session.add(Category(name=f"c{n}"))
                    assert await session.scalar(select(func.count()).select_from(Category))
            for sessions in (alpha, beta):
                await sessions.kw["bind"].dispose()

        asyncio.run(shops_take_turns())
        seeded = project.ok("seed", "--env=tenants").stderr
        assert seeded.startswith(f"[tenants] postgresql+asyncpg://postgres@127.0.0.1:{port}/")

    def names(schema: str) -> list[str]:
        rows = pg_fetch(pg_database.dsn, f"select name from {schema}.categories order by id")
        return [row["name"] for row in rows]

    sample = ["E-books", "Courses", "Templates"]
    assert names("alpha") == ["c0", "c2", "c4", *sample]
    assert names("beta") == ["c1", "c3", *sample]
    assert not pg_fetch(pg_database.dsn, "select 1 from pg_tables where schemaname = 'public'")


def test_status_through_a_transaction_pool_reads_each_schema_right(
    project: Project, pg_database: PgDatabase, pg_server: str
) -> None:
    """status needs no MIGRATION_URL: it reads through DATABASE_URL. Through PgBouncer in
    transaction mode, targets read at once failed on asyncpg's named statements (another
    client's were on the server connection), and a schema set on connecting could be the
    one another target's read had set."""
    shops = [f"s{n}" for n in range(8)]
    fleet = f"SCHEMA={{target}}\nTARGETS={','.join(shops)}\n"
    project.write_env("direct", f"DATABASE_URL={pg_database.url}\n{fleet}")
    project.ok("migrate", "--env=direct", "--only=s0,s2,s4,s6")
    with pgbouncer(SERVER.port or 5432, "transaction", pool_size=2) as port:
        project.write_env("pooled", f"DATABASE_URL={pooled(pg_database, port)}\n{fleet}")

        result = project.invoke("status", "--env=pooled", "--jobs=8")
        one = project.invoke("status", "--env=pooled", "--only=s2", "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    for n, shop in enumerate(shops):
        at = f"at {head_revision()}, nothing pending" if n % 2 == 0 else "at base, 1 pending"
        assert f" {shop}] {at}\n" in result.stdout
    assert f"8 targets: 4 at head, 4 behind (4 at {head_revision()}, 4 at base)\n" in result.stderr
    assert json.loads(one.stdout)["targets"][0]["current"] == [head_revision()]
