"""Fleets on real PostgreSQL servers: schema per tenant, locks held by other runs, two
servers, and a target whose connection is killed part way."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from conftest import (
    REFERENCE_CATEGORIES,
    SETVAL,
    Cluster,
    PgDatabase,
    Project,
    catalog_env,
    cluster,
    head_revision,
    holding_lock,
    network_link,
    pg_execute,
    pg_fetch,
    popen,
    revision,
    running_query,
    sqlite_catalog,
    wait_until,
)
from sqlalchemy import text
from sqlalchemy.engine import make_url

from db.environments import load_environment
from db.session import session_factory

HEAD = head_revision()
SHOPS = ("alpha", "beta", "gamma")
pytestmark = pytest.mark.postgres


def schema_versions(dsn: str, schema: str) -> list[str]:
    rows = pg_fetch(
        dsn,
        "select 1 from information_schema.tables "
        f"where table_schema = '{schema}' and table_name = 'alembic_version'",
    )
    if not rows:
        return []
    return [
        r["version_num"] for r in pg_fetch(dsn, f"select version_num from {schema}.alembic_version")
    ]


@pytest.fixture
def tenants(project: Project, pg_database: PgDatabase) -> Project:
    project.write_env(
        "tenants", f"DATABASE_URL={pg_database.url}\nSCHEMA={{target}}\nTARGETS={','.join(SHOPS)}\n"
    )
    return project


def test_each_tenant_is_checked_for_ids_its_sequence_has_not_given_and_the_fix_fits_all(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """The sequence check runs in each tenant's schema, and the setval it gives names no
    schema (a sequence named in the message, alpha.categories_id_seq, would set alpha's
    alone): the same revision then sets each tenant's own."""
    tenants.add_revision("books", revision("books01", HEAD, REFERENCE_CATEGORIES))

    result = tenants.invoke("migrate", "--env=tenants", "--jobs=1")

    lines = result.stderr.splitlines()
    failed = [line for line in lines if line.startswith("[1/3 alpha] failed: upgrade of")]
    assert result.returncode == 6 and len(failed) == 1, result.stderr
    assert "into categories that its sequence alpha.categories_id_seq has not given" in failed[0]
    dialect = 'under if op.get_context().dialect.name == "postgresql"'
    assert f'op.execute("{SETVAL}"), {dialect}; the database is at {HEAD}' in failed[0]
    fixed = f'{REFERENCE_CATEGORIES}\n    op.execute("{SETVAL}")'
    tenants.add_revision("books", revision("books01", HEAD, fixed))

    tenants.ok("migrate", "--env=tenants")

    for shop in SHOPS:
        added = pg_fetch(
            pg_database.dsn, f"insert into {shop}.categories (name) values ('x') returning id"
        )
        assert added[0]["id"] == 12


def test_schema_per_tenant_keeps_each_shop_in_its_schema(
    tenants: Project, pg_database: PgDatabase
) -> None:
    result = tenants.ok("migrate", "--env=tenants")

    assert result.stderr.count(f"migrated: {HEAD}") == 3
    dsn = pg_database.dsn
    for shop in SHOPS:
        assert schema_versions(dsn, shop) == [HEAD]
        tables = {
            r["table_name"]
            for r in pg_fetch(
                dsn,
                f"select table_name from information_schema.tables where table_schema = '{shop}'",
            )
        }
        assert {"users", "products", "purchases", "migration_log", "alembic_version"} <= tables
        rows = pg_fetch(dsn, f"select revision, target from {shop}.migration_log")
        assert [(r["revision"], r["target"]) for r in rows] == [(HEAD, shop)]
    public = pg_fetch(
        dsn, "select table_name from information_schema.tables where table_schema = 'public'"
    )
    assert public == []
    status = tenants.ok("status", "--env=tenants").stdout
    assert status.count(f"at {HEAD}, nothing pending") == 3
    history = tenants.ok("history", "--env=tenants").stdout  # failed on SCHEMA={target}
    assert f"{HEAD}  applied on 3/3  " in history
    seeded = tenants.ok("seed", "--env=tenants", "--only=beta")
    assert "added 3 users" in seeded.stderr
    assert pg_fetch(dsn, "select count(*) as n from beta.users")[0]["n"] == 3
    assert pg_fetch(dsn, "select count(*) as n from alpha.users")[0]["n"] == 0


def test_a_stamp_stopped_by_another_targets_failure_says_where_it_is(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """A stamp halted before its record said "before its next revision", as if a revision
    had been running, and not where the target was (a worker, in-process)."""
    from db import workers
    from db.fleet import Target

    tenants.ok("migrate", "--env=tenants", "--only=alpha")
    workers._STOP.halt("another target failed, so it stopped before its next revision")
    try:
        outcome = workers.work(
            tenants.root, "tenants", dict(os.environ), Target("alpha"), "stamp", {"revision": HEAD}
        )
    finally:
        workers._STOP.halted = None

    assert (outcome.state, outcome.current) == ("stopped", (HEAD,))
    assert outcome.detail == (
        "another target failed, so it stopped before stamping: the database is at "
        f"{HEAD}; nothing was recorded"
    )
    rows = pg_fetch(pg_database.dsn, "select direction from alpha.migration_log")
    assert [r["direction"] for r in rows] == ["up"]


def test_a_schema_made_for_the_migrating_role_needs_no_create_on_the_database(
    project: Project, pg_database: PgDatabase
) -> None:
    """A DBA makes each tenant's schema for a role that may not create schemas: PostgreSQL
    checks that privilege even for ``CREATE SCHEMA IF NOT EXISTS``, so a run must not ask."""
    role, admin = f"shop_{uuid.uuid4().hex[:10]}", pg_database.dsn
    pg_execute(admin, f"create role {role} login", f"create schema alpha authorization {role}")
    try:
        url = make_url(pg_database.url).set(username=role).render_as_string(hide_password=False)
        project.write_env("tenants", f"DATABASE_URL={url}\nSCHEMA={{target}}\nTARGETS=alpha,beta\n")

        result = project.invoke("migrate", "--env=tenants", "--keep-going")

        assert result.returncode == 6, result.stderr
        assert "  migrated    alpha" in result.stderr
        assert (
            "beta: cannot create schema beta: ProgrammingError: permission denied for database "
            f"{pg_database.name}; no revision was run; create it for the migrating role"
        ) in result.stderr
        assert schema_versions(admin, "alpha") == [HEAD]
        assert pg_fetch(admin, "select 1 from pg_namespace where nspname = 'beta'") == []
    finally:
        pg_execute(admin, f"drop owned by {role}", f"drop role {role}")


def test_a_sqlite_catalog_serves_a_schema_fleet_with_a_password(
    project: Project, pg_database: PgDatabase
) -> None:
    # the fleet's DATABASE_PASSWORD and SCHEMA are its targets', not the catalog's
    sqlite_catalog(project, "slug text", ("alpha",), ("beta",))
    tenants = (
        f"DATABASE_URL={pg_database.url}\nDATABASE_PASSWORD=trusted-anyway\nSCHEMA={{target}}\n"
    )
    project.write_env("tenants", catalog_env(tenants, "select slug from shops order by slug"))

    result = project.ok("migrate", "--env=tenants")

    assert "2 targets: 2 migrated" in result.stderr
    assert [schema_versions(pg_database.dsn, s) for s in ("alpha", "beta")] == [[HEAD], [HEAD]]


def test_a_locked_catalog_table_ends_the_query_at_lock_timeout(
    project: Project, pg_database: PgDatabase
) -> None:
    """An ALTER of the catalog table (the platform migrating its own database) held the
    query, and the task waited with it, without a word, for as long as that took."""
    pg_execute(pg_database.dsn, "create table catalog_shops (slug text)")
    tenants = f"DATABASE_URL={pg_database.url}\nSCHEMA={{target}}\nLOCK_TIMEOUT=1s\n"
    project.write_env(
        "tenants", catalog_env(tenants, "select slug from catalog_shops", pg_database.url)
    )

    locked = "begin; lock table catalog_shops in access exclusive mode; select pg_sleep(120)"
    app = subprocess.Popen(["psql", pg_database.dsn, "-c", locked], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: running_query(pg_database.dsn, "pg_sleep(120)"), "the app's lock")
        run = popen(project, "status", "--env=tenants")
        _, err = run.communicate(timeout=30)  # it waited for as long as the lock was held
    finally:
        app.terminate()
        app.wait(timeout=10)

    assert run.returncode == 1, err
    assert err.endswith(
        "error: tenants: TARGETS_QUERY waited 1s (LOCK_TIMEOUT) on the catalog, and gave up "
        "(canceling statement due to lock timeout): run the task again once the session that "
        "holds it (a migration of the catalog?) is done, or raise LOCK_TIMEOUT\n"
    )


def test_a_postgres_catalog_lists_the_shops_and_its_failures_name_it(
    project: Project, pg_database: PgDatabase
) -> None:
    catalog = pg_database.url
    pg_execute(
        pg_database.dsn,
        "create table catalog_shops (slug text, active boolean)",
        "insert into catalog_shops values ('alpha', true), ('beta', true), ('gamma', false)",
    )
    tenants = f"DATABASE_URL={pg_database.url}\nSCHEMA={{target}}\n"
    query = "select slug from catalog_shops where active order by slug"
    project.write_env("tenants", catalog_env(tenants, query, catalog))

    result = project.ok("migrate", "--env=tenants")

    assert "2 targets: 2 migrated" in result.stderr
    assert [schema_versions(pg_database.dsn, s) for s in ("alpha", "beta")] == [[HEAD], [HEAD]]
    assert schema_versions(pg_database.dsn, "gamma") == []
    # a third column, meant as a filter, would be ignored: refused, naming the file
    project.write_env(
        "tenants", catalog_env(tenants, "select slug, null, active from catalog_shops", catalog)
    )
    columns = project.fails("status", "--env=tenants")
    assert (
        "error: tenants: TARGETS_QUERY returns 3 columns: it must return a target's name" in columns
    )
    assert "fix it in environments/tenants.env" in columns
    # the header shows the fleet's URL, so a catalog that cannot be reached is named as such
    gone = make_url(catalog).set(password="cat:s3cret@", database=f"{pg_database.name}_gone")
    project.write_env("tenants", catalog_env(tenants, query, gone.render_as_string(False)))
    unreachable = project.invoke("status", "--env=tenants")
    assert unreachable.returncode == 1, unreachable.stderr
    assert (
        "error: tenants: cannot list the targets from the catalog (TARGETS_DATABASE_URL): "
        "cannot connect to postgresql+asyncpg://"
    ) in unreachable.stderr
    assert f":***@{gone.host}:{gone.port}/{gone.database}: database " in unreachable.stderr
    assert "s3cret" not in unreachable.stdout + unreachable.stderr


def test_a_schema_fleet_reads_who_runs_it_once_before_the_workers_fork(
    tenants: Project, tmp_path: Path
) -> None:
    # each run of `git` (the commit an audit row names) leaves a line: done before the
    # workers fork, it runs once; a worker doing it on its first target adds one of its own
    calls = tmp_path / "git-calls"
    shim = tmp_path / "bin" / "git"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 128\n')
    shim.chmod(0o755)

    tenants.ok("migrate", "--env=tenants", "--jobs=3", PATH=f"{shim.parent}:{os.environ['PATH']}")

    assert calls.read_text().splitlines() == ["rev-parse HEAD"]


def test_a_target_locked_by_another_run_is_retried_last(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """The lock is keyed by schema: beta's lock held elsewhere leaves alpha and gamma free,
    and beta is migrated at the end, once its lock is let go."""
    with holding_lock(pg_database.dsn, "beta.alembic_version"):
        run = popen(tenants, "migrate", "--env=tenants", "--jobs=1")
        wait_until(
            lambda: schema_versions(pg_database.dsn, "gamma") == [HEAD], "gamma migrated", 60, run
        )
        assert schema_versions(pg_database.dsn, "beta") == []
        wait_until(
            lambda: pg_fetch(
                pg_database.dsn,
                "select 1 from pg_stat_activity where application_name = 'migrations' "
                "and datname = current_database() and query like '%pg_try_advisory_lock%'",
            ),
            "the retry to wait for beta's lock",
            60,
            run,
        )
    _, err = run.communicate(timeout=120)

    assert run.returncode == 0, err
    lines = err.splitlines()
    locked = next(
        i for i, line in enumerate(lines) if "beta] locked by another run: retried last" in line
    )
    gamma = next(i for i, line in enumerate(lines) if "gamma] migrated" in line)
    beta = next(i for i, line in enumerate(lines) if f"beta] migrated: {HEAD}" in line)
    assert locked < gamma < beta
    assert lines[beta + 1].startswith("  waiting up to 60s for the migration lock, held by pid")
    assert "waiting up to 0s" not in err  # the first try, which did not wait
    for shop in SHOPS:
        rows = pg_fetch(pg_database.dsn, f"select revision, direction from {shop}.migration_log")
        assert [(r["revision"], r["direction"]) for r in rows] == [(HEAD, "up")]


def test_a_target_another_run_migrated_before_its_last_try_says_so(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """beta came back locked: behind, with its lock held by another run. By its last try
    that run had taken it to head, and the line said only "already at", as if beta had
    been there all along."""
    slow = 'op.create_table("slow", sa.Column("id", sa.Integer))\n    __import__("time").sleep(1)'
    tenants.add_revision("slow", revision("slow1", HEAD, slow))
    with holding_lock(pg_database.dsn, "beta.alembic_version"):
        run = popen(tenants, "migrate", "--env=tenants", "--jobs=1")
        wait_until(lambda: run.printed("beta] locked by another run"), "beta's first try", 60, run)
        # what the other run does under beta's lock, while this one migrates gamma
        pg_execute(
            pg_database.dsn,
            "create schema beta",
            "create table beta.alembic_version (version_num varchar(32) primary key)",
            "insert into beta.alembic_version values ('slow1')",
        )
    _, err = run.communicate(timeout=120)

    assert run.returncode == 0, err
    assert "beta] already at slow1 (migrated by another run)" in err
    assert "alpha] migrated" in err and "gamma] migrated" in err
    assert err.count("(migrated by another run)") == 1


def sessions_of(admin: str, database: str) -> int:
    """Sessions the database has had, counted once every session to it has ended (a
    backend writes its statistics before it leaves pg_stat_activity)."""
    wait_until(
        lambda: not pg_fetch(admin, f"select 1 from pg_stat_activity where datname = '{database}'"),
        f"the sessions to {database} to end",
    )
    found = pg_fetch(admin, f"select sessions from pg_stat_database where datname = '{database}'")
    return int(found[0]["sessions"])


def test_a_target_is_read_and_migrated_on_one_connection(
    tenants: Project, pg_database: PgDatabase, pg_server: str
) -> None:
    """Each target's revision is read on its migration session, before the lock: a target
    with work to do, and one already at head, each cost its server one connection."""
    before = sessions_of(pg_server, pg_database.name)

    assert tenants.ok("migrate", "--env=tenants").stderr.count(f"migrated: {HEAD}") == 3
    migrated = sessions_of(pg_server, pg_database.name)
    assert tenants.ok("migrate", "--env=tenants").stderr.count(f"already at {HEAD}") == 3
    again = sessions_of(pg_server, pg_database.name)

    assert (migrated - before, again - migrated) == (3, 3)


def test_a_target_already_at_head_is_not_kept_waiting_by_its_lock(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """A target with nothing to do is read without its lock, so another run holding that
    lock neither delays it nor makes it a locked target."""
    tenants.ok("migrate", "--env=tenants")
    with holding_lock(pg_database.dsn, "beta.alembic_version"):
        result = tenants.invoke("migrate", "--env=tenants", "--lock-wait=0")

    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"already at {HEAD}") == 3
    assert "locked" not in result.stderr


def while_locked(
    project: Project, dsn: str, table: str, *args: str
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """`invoke ARGS` while another session holds ``table`` locked (a DBA's LOCK TABLE), for
    20 s at most; its seconds and result."""

    async def scenario() -> tuple[float, subprocess.CompletedProcess[str]]:
        holder = await asyncpg.connect(dsn)
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(f"lock table {table} in access exclusive mode")
        try:  # without a limit, the run would end only when the lock is released
            started = time.monotonic()
            run = asyncio.create_task(asyncio.to_thread(project.invoke, *args))
            await asyncio.wait({run}, timeout=20)
            await transaction.rollback()
            return time.monotonic() - started, await run
        finally:
            await holder.close()

    return asyncio.run(scenario())


def test_a_target_whose_version_table_a_dba_keeps_locked_fails_after_lock_timeout(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """The reads a fleet makes before a target's run (the one that finds it has nothing to
    do, a protected fleet's plan) are no run's session: a DBA's LOCK TABLE on the target's
    version table kept the fleet waiting for as long as it was held, where one database's
    run gives up after LOCK_TIMEOUT and says so."""
    tenants.ok("migrate", "--env=tenants")
    tenants.extend_env("tenants", "LOCK_TIMEOUT=1s\n")
    locked = (tenants, pg_database.dsn, "beta.alembic_version")

    seconds, result = while_locked(*locked, "migrate", "--env=tenants")

    assert result.returncode == 6, result.stderr
    assert "beta] failed: database error on " in result.stderr
    assert "it waited 1s (LOCK_TIMEOUT) for a lock that another session holds" in result.stderr
    assert result.stderr.count(f"already at {HEAD}") == 2 and seconds < 15, seconds

    tenants.extend_env("tenants", "PROTECTED=true\n")
    seconds, result = while_locked(*locked, "rollback", "--env=tenants", "--yes")

    assert result.returncode == 6, result.stderr
    unreadable = (
        "  1 target(s): unreadable: cannot read its version: LockNotAvailableError: canceling "
        "statement due to lock timeout; another session holds a lock on its tables (a long "
        "transaction, a DBA's LOCK TABLE?): run it again once that session is done, or raise "
        "LOCK_TIMEOUT  [beta]\n"
    )
    assert unreadable in result.stderr and seconds < 15, seconds
    assert "beta] failed: not run, as its plan was not read: " in result.stderr
    assert schema_versions(pg_database.dsn, "beta") == [HEAD]
    assert schema_versions(pg_database.dsn, "alpha") == []  # the others were rolled back


@pytest.fixture
def second_server() -> Iterator[Cluster]:
    with cluster() as found:
        yield found


def test_a_fleet_across_two_servers(
    project: Project, pg_server: str, second_server: Cluster
) -> None:
    near = f"fleet_two_hosts_{uuid.uuid4().hex[:12]}"  # of this run alone: suites may share
    local = f"{pg_server.rsplit('/', 1)[0]}/{near}"
    port = second_server.port
    other = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    pg_execute(pg_server, f"CREATE DATABASE {near}")
    pg_execute(other, "CREATE DATABASE shop_far")
    asyncpg_url = "postgresql+asyncpg://postgres@127.0.0.1"
    (project.root / "shops.txt").write_text(
        f"near {asyncpg_url}:5432/{near}\nfar {asyncpg_url}:{port}/shop_far\n"
    )
    project.write_env(
        "shops", "DATABASE_URL=postgresql+asyncpg://unused/x\nTARGETS_FILE=shops.txt\n"
    )
    try:
        result = project.ok("migrate", "--env=shops", "--json")
        assert [t["current"] for t in json.loads(result.stdout)["targets"]] == [
            [HEAD],
            [HEAD],
        ]
        assert pg_fetch(local, "select version_num from alembic_version")[0][0] == HEAD
        far = f"postgresql://postgres@127.0.0.1:{port}/shop_far"
        assert pg_fetch(far, "select target from migration_log")[0][0] == "far"
        second_server.stop()  # one host down: the other's targets go on, each task says so
        down = f"far: cannot connect to {asyncpg_url}:{port}/shop_far: Connection refused"
        for task in ("status", "seed", "migrate"):  # seed failed with a bare exception name
            result = project.invoke(task, "--env=shops")
            assert result.returncode == 6, result.stderr
            assert f"  failed      {down}" in result.stderr
            assert "Traceback" not in result.stderr
        assert pg_fetch(local, "select count(*) from users")[0][0] == 3  # near was seeded
    finally:
        pg_execute(pg_server, f"DROP DATABASE IF EXISTS {near} WITH (FORCE)")


def test_a_target_cut_off_by_the_network_fails_alone_after_network_timeout(
    project: Project, pg_server: str
) -> None:
    """One target's server sits behind a link that is cut while its revision runs: that
    target fails after NETWORK_TIMEOUT, saying so, and the fleet run ends (it once waited
    for good); the other target is migrated, and the cut one is where it was."""
    near = f"fleet_cut_{uuid.uuid4().hex[:12]}"  # of this run alone: suites may share
    pg_execute(pg_server, f"CREATE DATABASE {near}")
    body = (
        'if op.get_bind().scalar(sa.text("select current_database()")) == "shop_far":\n'
        '        op.execute("select pg_sleep(30)")'
    )
    project.add_revision("slow", revision("slow01", HEAD, body, message="slow"))
    try:
        with network_link() as link, cluster("--auth=trust", link=link) as server:
            pg_execute(server.socket_dsn, "CREATE DATABASE shop_far")
            far = server.socket_dsn.replace("/postgres?", "/shop_far?")
            at = "postgresql+asyncpg://postgres@"
            (project.root / "shops.txt").write_text(
                f"near {at}127.0.0.1:5432/{near}\nfar {at}{link.server}:{server.port}/shop_far\n"
            )
            project.write_env(
                "shops",
                "DATABASE_URL=postgresql+asyncpg://unused/x\nTARGETS_FILE=shops.txt\n"
                "NETWORK_TIMEOUT=4\n",
            )
            run = popen(project, "migrate", "--env=shops", "--jobs=2")
            err = run.when(lambda: running_query(far, "pg_sleep(30)"), "far's sleep", link.cut, 60)

            assert run.returncode == 3, err  # the one failure is a lost lock
            assert (
                "far] failed: lost the connection, and with it the migration lock, during the "
                "upgrade of revision slow01 (slow): the server stopped answering for 4s "
                "(NETWORK_TIMEOUT): the network or the server's host is down"
            ) in err
            assert "  failed      far: lost the connection" in err and "Traceback" not in err
            local = f"{pg_server.rsplit('/', 1)[0]}/{near}"
            assert pg_fetch(local, "select version_num from alembic_version")[0][0] == "slow01"
            link.mend()
            assert pg_fetch(far, "select version_num from alembic_version")[0][0] == HEAD
    finally:
        pg_execute(pg_server, f"DROP DATABASE IF EXISTS {near} WITH (FORCE)")


@pytest.fixture
def slow_fleet(tenants: Project) -> Project:
    schema = 'op.get_context().opts["version_table_schema"]'
    body = f'op.execute("select pg_sleep(30)") if {schema} == "beta" else None'
    tenants.add_revision("slow", revision("slow01", HEAD, body))
    return tenants


def test_a_target_whose_connection_is_killed_fails_alone(
    slow_fleet: Project, pg_database: PgDatabase
) -> None:
    run = popen(slow_fleet, "migrate", "--env=tenants", "--jobs=3", "--keep-going")
    [backend] = wait_until(
        lambda: running_query(pg_database.dsn, "pg_sleep(30)"), "beta's sleep", 60, run
    )
    pg_execute(pg_database.dsn, f"select pg_terminate_backend({backend['pid']})")
    _, err = run.communicate(timeout=120)

    assert run.returncode == 3, err  # the one failure is a lost lock
    assert "beta] failed: lost the connection, and with it the migration lock" in err
    assert f"; the database is at {HEAD}; this run kept {HEAD}; slow01 was rolled back;" in err
    assert "  failed      beta: lost the connection" in err and "Traceback" not in err
    assert schema_versions(pg_database.dsn, "beta") == [HEAD]  # slow01 rolled back whole
    assert (
        schema_versions(pg_database.dsn, "alpha")
        == ["slow01"]
        == schema_versions(pg_database.dsn, "gamma")
    )
    rerun = slow_fleet.invoke("status", "--env=tenants").stdout
    assert "beta] at " + HEAD + ", 1 pending" in rerun


def test_sigterm_stops_a_fleet_run_and_it_says_where_each_target_is(
    slow_fleet: Project, pg_database: PgDatabase
) -> None:
    run = popen(slow_fleet, "migrate", "--env=tenants", "--jobs=1", "--only=beta,gamma")
    wait_until(lambda: running_query(pg_database.dsn, "pg_sleep(30)"), "beta's sleep", 60, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)

    assert run.returncode == 143, err
    assert f"beta] failed: interrupted: the database is at {HEAD}; this run kept {HEAD}; " in err
    assert "slow01 was rolled back" in err
    assert "gamma] skipped (interrupted)" in err
    assert schema_versions(pg_database.dsn, "beta") == [HEAD]
    assert schema_versions(pg_database.dsn, "gamma") == []


@contextmanager
def sessions_held(dsn: str, count: int) -> Iterator[None]:
    """``count`` idle sessions on the server, by psql processes ended (by PID) after."""
    sleeping = (
        "select count(*) as n from pg_stat_activity "
        "where query = 'select pg_sleep(120)' and pid <> pg_backend_pid()"
    )
    held = [
        subprocess.Popen(["psql", "-X", "-q", "-d", dsn, "-c", "select pg_sleep(120)"])
        for _ in range(count)
    ]
    try:
        wait_until(lambda: pg_fetch(dsn, sleeping)[0]["n"] == count, f"{count} sessions")
        yield
    finally:
        for process in held:
            process.kill()
            process.wait()
        # a backend in pg_sleep does not notice its client went: end it, and see it gone
        pg_execute(dsn, sleeping.replace("count(*) as n", "pg_terminate_backend(pid, 5000)"))
        wait_until(lambda: pg_fetch(dsn, sleeping)[0]["n"] == 0, "the sessions ended")


def test_a_target_whose_server_is_full_is_tried_again_last(project: Project) -> None:
    """A server with no free connection (a fleet's own targets can fill it) turns a target
    away: it is tried again once the others are done, instead of failing the run."""
    with cluster() as server:
        # five connections, the last for superusers (the test's own); the fleet runs as shop
        admin = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        pg_execute(
            admin,
            "alter system set max_connections = 5",
            "alter system set superuser_reserved_connections = 1",
        )
        server.restart()
        pg_execute(
            admin,
            "create role shop login",
            "create database shop_a owner shop",
            "create database shop_b owner shop",
        )
        slow = revision("slow1", HEAD, 'op.execute("select pg_sleep(2)")')  # holds its slot
        project.add_revision("slow", slow)
        url = f"postgresql+asyncpg://shop@127.0.0.1:{server.port}/shop_{{target}}"
        project.write_env("full", f"DATABASE_URL={url}\nTARGETS=a b\n")

        with sessions_held(admin, 3):  # one connection left for the two targets
            result = project.invoke("migrate", "--env=full", "--jobs=2")

        assert result.returncode == 0, result.stderr
        # one of the two at least: which gets the last connection is the race's to decide
        assert "its server had no free connection: retried last" in result.stderr
        assert result.stderr.count("migrated: ") == 2
        for shop in ("a", "b"):
            dsn = f"postgresql://postgres@127.0.0.1:{server.port}/shop_{shop}"
            assert [r["version_num"] for r in pg_fetch(dsn, "select * from alembic_version")] == [
                "slow1"
            ]


def test_a_full_server_is_said_with_what_each_task_can_do_about_it(project: Project) -> None:
    """No free connection: a task says to try again, or how to make it wait for one (status
    has no --wait, but reads CONNECT_WAIT), and after waiting, how long it waited; a fleet's
    target, still turned away when tried again last, how to run fewer at once. It said to
    lower --jobs (one database has none) or give --wait (status has none)."""
    with cluster() as server:
        admin = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        pg_execute(
            admin,
            "alter system set max_connections = 3",
            "alter system set superuser_reserved_connections = 1",
        )
        server.restart()
        pg_execute(admin, "create role shop login", "create database shop_a owner shop")
        url = f"postgresql+asyncpg://shop@127.0.0.1:{server.port}/shop_{{target}}"
        project.write_env("one", f"DATABASE_URL={url.format(target='a')}\n")
        project.write_env("many", f"DATABASE_URL={url}\nTARGETS=a\n")
        project.write_env("patient", f"DATABASE_URL={url.format(target='a')}\nCONNECT_WAIT=1.5\n")
        turned_away = "superuser connections (the server has no free connection"

        with sessions_held(admin, 2):  # none left but the superusers' own
            status = project.fails("status", "--env=one")
            status_waited = project.fails("status", "--env=patient")
            migrate = project.fails("migrate", "--env=one")
            waited = project.fails("migrate", "--env=one", "--wait=1.5")
            fleet = project.invoke("migrate", "--env=many")

        for said in (status, migrate):
            assert said.endswith(
                f"{turned_away}: all of its max_connections are in use; try again when one is "
                "free, or let the run wait for one: CONNECT_WAIT=SECONDS in environments/one.env"
                " (or --wait=SECONDS, on migrate and rollback))\n"
            ), said
        for said in (status_waited, waited):
            assert f":{server.port}/shop_a, tried for 1.5s: remaining connection" in said, said
            assert said.endswith(f"{turned_away}: all of its max_connections are in use)\n")
        assert fleet.returncode == 6, fleet.stderr
        assert "a] its server had no free connection: retried last" in fleet.stderr
        assert (
            f"/shop_a, tried for 10s: remaining connection slots are reserved for "
            f"non-replication {turned_away}: all of its max_connections are in use); run fewer "
            "targets at once on that server: lower --jobs or MAX_CONNECTIONS_PER_HOST"
        ) in fleet.stderr
        shop_a = f"postgresql://postgres@127.0.0.1:{server.port}/shop_a"
        assert pg_fetch(shop_a, "select to_regclass('alembic_version') as t")[0]["t"] is None


def test_fleet_status_names_a_target_whose_run_never_finished(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """beta's downgrade was stopped in its non-transactional block: the fleet's status said
    it was "at p01, nothing pending", up to date, as on one database."""
    undo = (
        "with op.get_context().autocommit_block():\n"
        '        op.execute("select 1")\n'
        '        if __import__("os").environ.get("SLOW"):\n'
        '            op.execute("select pg_sleep(30)")'
    )
    text = revision("p01", HEAD).replace(
        "downgrade() -> None:\n    pass", f"downgrade() -> None:\n    {undo}"
    )
    tenants.add_revision("p01", text)
    tenants.ok("migrate", "--env=tenants")
    run = popen(tenants, "rollback", "--env=tenants", "--only=beta", "--yes", SLOW="1")
    [sleeping] = wait_until(
        lambda: running_query(pg_database.dsn, "pg_sleep(30)"), "the slow downgrade", process=run
    )
    pg_execute(pg_database.dsn, f"select pg_terminate_backend({sleeping['pid']})")
    _, err = run.communicate(timeout=60)
    assert run.returncode == 3, err  # the lost connection, as on one database

    result = tenants.invoke("status", "--env=tenants", "--check")

    assert result.returncode == 5, result.stderr
    said = "the downgrade of revision p01 started its non-transactional part at "
    [line] = [line for line in result.stderr.splitlines() if line.startswith("  unfinished")]
    assert line.startswith(f"  unfinished  beta: {said}"), line
    assert "`invoke resolve --env=tenants --only=beta p01 --applied` if all" in line
    data = json.loads(tenants.ok("status", "--env=tenants", "--json").stdout)
    rows = {row["target"]: row for row in data["targets"]}
    assert rows["beta"]["state"] == "unfinished" and rows["beta"]["up_to_date"] is False
    assert rows["alpha"]["state"] == "at head" and rows["alpha"]["up_to_date"] is True
    assert schema_versions(pg_database.dsn, "beta") == ["p01"]

    for protected in (False, True):  # refused, as on one database; planned as such
        if protected:
            tenants.extend_env("tenants", "PROTECTED=true\n")
        migrated = tenants.invoke("migrate", "--env=tenants", "--yes")
        assert migrated.returncode == 4, migrated.stderr  # a guard refused
        assert f"  failed      beta: {said}" in migrated.stderr
        if not protected:
            assert "tenants: 3 targets: 2 up to date, 1 failed" in migrated.stderr
    plan = "1 target(s): a non-transactional run never finished: refused until resolved  [beta]"
    assert plan in migrated.stderr


# A column of the type an extension has (citext: text compared whatever its case)
CITEXT_EMAIL = (
    "from sqlalchemy.dialects import postgresql\n"
    '    op.add_column("users", sa.Column("email", postgresql.CITEXT()))'
)
SHARED_HINT = (
    "(with SCHEMA, the search path holds that schema alone: if an extension installed in "
    "another schema (public?) has it, name that schema in SHARED_SCHEMAS in the env file)"
)


def test_an_extension_in_a_shared_schema_serves_every_tenant_whose_tables_stay_its_own(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """Each tenant's search path is its schema alone, so a type that an extension installed
    in public has was not found, in every tenant (and creating the extension in a revision
    puts it in the first tenant's schema, where no other sees it). SHARED_SCHEMAS puts
    public after the tenant's schema; what public holds besides is not the tenant's: the
    platform's own tables are drafted as nothing, and its audit trail (another
    environment's) stops no new tenant."""
    dsn = pg_database.dsn
    pg_execute(dsn, "create extension citext")
    tenants.write_env("platform", f"DATABASE_URL={pg_database.url}\n")
    tenants.ok("migrate", "--env=platform")  # public: the platform's tables and trail
    pg_execute(dsn, "create table public.shops (id int primary key)")
    tenants.add_revision("email", revision("email1", HEAD, CITEXT_EMAIL))

    error = tenants.fails("migrate", "--env=tenants", "--only=alpha")

    assert f'failed: ProgrammingError: type "citext" does not exist {SHARED_HINT}' in error
    assert schema_versions(dsn, "alpha") == [HEAD]
    tenants.extend_env("tenants", "SHARED_SCHEMAS=public\n")

    tenants.ok("migrate", "--env=tenants")

    for shop in SHOPS:
        assert schema_versions(dsn, shop) == ["email1"]
        typed = "select udt_schema, udt_name from information_schema.columns where "
        typed += f"table_schema = '{shop}' and table_name = 'users' and column_name = 'email'"
        assert [tuple(row) for row in pg_fetch(dsn, typed)] == [("public", "citext")]
        trail = pg_fetch(dsn, f"select distinct environment from {shop}.migration_log")
        assert [row["environment"] for row in trail] == ["tenants"]
    sql = tenants.ok("offline-sql", "--env=tenants", "--only=beta").stdout
    assert 'SET search_path TO "beta", "public";' in sql
    models = tenants.root / "db" / "models.py"
    first_name = "    first_name: Mapped[str | None] = mapped_column(String(128))\n"
    citext = 'Text().with_variant(CITEXT(), "postgresql")'
    email = f"    email: Mapped[str | None] = mapped_column({citext})\n"
    text = models.read_text().replace(first_name, first_name + email)
    imported = "from sqlalchemy.dialects.postgresql import CITEXT\nfrom decimal import"
    models.write_text(text.replace("from decimal import", imported))
    assert tenants.ok("check", "--env=tenants").stderr.count("check passed") == 3


# A revision that makes the extension it needs, where all tenants share it, and takes a
# moment after: the others' run meanwhile
TRIGRAMS = (
    'op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public")\n'
    '    op.execute("SELECT pg_sleep(1)")'
)


def test_tenants_that_make_one_extension_at_once_make_it_in_turn(
    tenants: Project, pg_database: PgDatabase
) -> None:
    """Each tenant's revision ran CREATE EXTENSION IF NOT EXISTS at once: none saw another's
    before it committed, so all but one failed on a duplicate key in pg_extension. One that
    names no schema would make it in the first tenant's alone: refused, before it runs."""
    tenants.extend_env("tenants", "SHARED_SCHEMAS=public\n")
    unshared = TRIGRAMS.replace(" SCHEMA public", "")
    tenants.add_revision("trigrams", revision("trgm01", HEAD, unshared))

    refused = tenants.invoke("migrate", "--env=tenants", "--only=alpha")

    assert refused.returncode == 6
    assert (
        "upgrade of revision trgm01 (hand written) failed: CREATE EXTENSION IF NOT EXISTS "
        "pg_trgm would make the extension in schema alpha, this tenant's, where no other "
        "tenant sees it (a database has each extension once): name a schema of "
        "SHARED_SCHEMAS, CREATE EXTENSION IF NOT EXISTS ... SCHEMA public; the database is "
        f"at {HEAD}"
    ) in refused.stderr
    assert not pg_fetch(pg_database.dsn, "select 1 from pg_extension where extname = 'pg_trgm'")
    tenants.add_revision("trigrams", revision("trgm01", HEAD, TRIGRAMS))

    result = tenants.ok("migrate", "--env=tenants", f"--jobs={len(SHOPS)}")

    assert f"{len(SHOPS)} migrated" in result.stderr
    for shop in SHOPS:
        assert schema_versions(pg_database.dsn, shop) == ["trgm01"]
    made = "select n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace "
    made += "where e.extname = 'pg_trgm'"
    assert [row["nspname"] for row in pg_fetch(pg_database.dsn, made)] == ["public"]


@pytest.mark.parametrize("pooler", [False, True], ids=["direct", "pooler"])
def test_the_apps_sessions_have_the_shared_schemas_after_the_shops(
    project: Project, pg_database: PgDatabase, pooler: bool
) -> None:
    """The app's engine, set on connecting or (behind a pooler in transaction mode, where
    MIGRATION_URL is set) in each transaction."""
    migration = f"MIGRATION_URL={pg_database.url}\n" if pooler else ""
    project.write_env(
        "tenants",
        f"DATABASE_URL={pg_database.url}\n{migration}SCHEMA={{target}}\nTARGETS=alpha\n"
        "SHARED_SCHEMAS=public\n",
    )
    env = load_environment(project.root, "tenants", {})

    async def search_path() -> str | None:
        sessions = session_factory(env, "alpha")
        async with sessions() as session, session.begin():
            found = await session.scalar(text("show search_path"))
        await sessions.kw["bind"].dispose()
        return found

    assert asyncio.run(search_path()) == "alpha, public"
