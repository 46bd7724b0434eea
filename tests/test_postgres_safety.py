"""Production safety on a real PostgreSQL server: session settings, audit, backups, waiting."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import (
    PG_ADMIN,
    REFERENCE_CATEGORIES,
    SETVAL,
    PgDatabase,
    Project,
    head_revision,
    pg_execute,
    pg_fetch,
    popen,
    revision,
    running_query,
    settings_revision,
    versions_of,
    wait_until,
)
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.postgres
SERVER = make_url(PG_ADMIN)


@pytest.fixture
def pg_project(pg_project: Project) -> Project:
    """Here a statement that waits for a table lock gives up after a second."""
    pg_project.extend_env("ci", "LOCK_TIMEOUT=1s\n")
    return pg_project


def add_email(project: Project) -> None:
    body = 'op.add_column("users", sa.Column("email", sa.String(100)))'
    project.add_revision("alter", revision("alter1", head_revision(), body, message="add email"))


def dumps(project: Project) -> list[Path]:
    return sorted((project.root / "var" / "backups").glob("ci-*.dump"))


def migrate_while_users_is_locked(
    project: Project, database: PgDatabase, mode: str, table: str = "users"
) -> tuple[float, int, str]:
    """`invoke migrate --env=ci` while another session holds a ``mode`` lock on users (a
    long report query, or the app), or on ``table``; its seconds, exit code and stderr."""

    async def scenario() -> tuple[float, int, str]:
        holder = await asyncpg.connect(database.dsn)
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(f"lock table {table} in {mode} mode")
        try:
            started = time.monotonic()
            result = await asyncio.to_thread(project.invoke, "migrate", "--env=ci")
            return time.monotonic() - started, result.returncode, result.stderr
        finally:
            await transaction.rollback()
            await holder.close()

    return asyncio.run(scenario())


def test_migrations_run_with_the_env_files_session_settings(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    settings_revision(pg_project)
    pg_project.ok("migrate", "--env=ci")

    [row] = pg_fetch(pg_database.dsn, "select * from seen")
    assert (row["lt"], row["st"], row["app"]) == ("1s", "15min", "migrations")


def test_a_migration_waiting_behind_a_long_query_fails_fast(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    pg_project.ok("migrate", "--env=ci")
    add_email(pg_project)

    seconds, code, stderr = migrate_while_users_is_locked(pg_project, pg_database, "access share")

    assert code == 1, stderr
    assert (
        "upgrade of revision alter1 (add email) failed: it waited 1s (LOCK_TIMEOUT) for a lock "
        "that another session holds (canceling statement due to lock timeout)\n"
    ) in stderr
    assert stderr.endswith(  # nothing in the revision to fix: not "fix it and run again"
        "alter1 was rolled back; run the task again once that session (a long transaction?) "
        "is done, or raise LOCK_TIMEOUT\n"
    )
    assert seconds < 15
    rows = pg_fetch(pg_database.dsn, "select version_num from alembic_version")
    assert [r["version_num"] for r in rows] == [head_revision()]


def test_a_run_that_cannot_read_the_version_table_says_which_limit_ended_it(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A session holding the version table locked (a DBA's LOCK TABLE, plain Alembic's
    DDL) stopped the run's first read: the error named only the driver's exception."""
    pg_project.ok("migrate", "--env=ci")
    add_email(pg_project)

    _, code, stderr = migrate_while_users_is_locked(
        pg_project, pg_database, "access exclusive", table="alembic_version"
    )

    assert code == 1, stderr
    assert stderr.endswith(
        ": it waited 1s (LOCK_TIMEOUT) for a lock that another session holds (canceling "
        "statement due to lock timeout)\nno revision was run; run the task again once that "
        "session (a long transaction?) is done, or raise LOCK_TIMEOUT\n"
    )
    rows = pg_fetch(pg_database.dsn, "select version_num from alembic_version")
    assert [r["version_num"] for r in rows] == [head_revision()]


def test_reset_behind_a_long_query_drops_nothing_and_says_why(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """reset now drops under the session's LOCK_TIMEOUT: a lock it could not get ended in a
    traceback. Before that, it waited for the query as long as the query ran."""
    pg_project.migrated("ci")
    pg_project.ok("seed", "--env=ci")

    async def scenario() -> subprocess.CompletedProcess[str]:
        reader = await asyncpg.connect(pg_database.dsn)
        transaction = reader.transaction()
        await transaction.start()
        await reader.execute("lock table users in access share mode")  # a long report query
        try:
            return await asyncio.to_thread(pg_project.invoke, "reset", "--env=ci")
        finally:
            await transaction.rollback()
            await reader.close()

    result = asyncio.run(scenario())

    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(
        "error: reset could not drop the tables: it waited 1s (LOCK_TIMEOUT) for a lock that "
        "another session holds (canceling statement due to lock timeout)\nnothing was dropped: "
        "the database is as it was; run the task again once that session (a long "
        "transaction?) is done, or raise LOCK_TIMEOUT\n"
    )
    assert pg_fetch(pg_database.dsn, "select count(*) as n from purchases")[0]["n"] == 3


def test_a_revision_past_statement_timeout_says_which_limit_ended_it(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    pg_project.extend_env("ci", "STATEMENT_TIMEOUT=300ms\n")
    pg_project.add_revision(
        "slow", revision("slow1", head_revision(), 'op.execute("select pg_sleep(5)")')
    )

    error = pg_project.fails("migrate", "--env=ci")

    assert (
        "upgrade of revision slow1 (hand written) failed: a statement ran longer than 300ms"
        in error
    )
    assert error.endswith(
        "slow1 was rolled back; raise STATEMENT_TIMEOUT in the env file, or make the revision "
        "do less at once\n"
    )
    rows = pg_fetch(pg_database.dsn, "select version_num from alembic_version")
    assert [r["version_num"] for r in rows] == [head_revision()]


def test_a_failing_revision_is_named_by_the_drivers_own_error_class(pg_project: Project) -> None:
    """SQLAlchemy maps many asyncpg errors to a bare ``Error``: the driver's class says more."""
    pg_project.add_revision("zero", revision("zero1", head_revision(), 'op.execute("select 1/0")'))

    error = pg_project.fails("migrate", "--env=ci")

    assert (
        "upgrade of revision zero1 (hand written) failed: DivisionByZeroError: division by zero\n"
        in error
    )


def test_the_audit_trail_on_postgres(pg_project: Project, pg_database: PgDatabase) -> None:
    pg_project.migrated("ci")
    pg_project.ok("rollback", "--env=ci")

    rows = pg_fetch(pg_database.dsn, "select * from migration_log order by id")

    assert [(r["revision"], r["direction"], r["environment"]) for r in rows] == [
        (head_revision(), "up", "ci"),
        (head_revision(), "down", "ci"),
    ]
    assert all(len(r["checksum"]) == 64 and r["started_at"].tzinfo for r in rows)
    pg_project.migrated("ci")
    [line] = pg_project.ok("history", "--env=ci").stdout.splitlines()
    assert f" by {rows[0]['os_user']}@{rows[0]['host']}]" in line


def test_offline_sql_writes_the_audit_trail_too(
    pg_project: Project, pg_database_2: PgDatabase
) -> None:
    """Each row says when its revision ran and for how long, not when the SQL was rendered."""
    slow = revision("slow01", head_revision(), 'op.execute("SELECT pg_sleep(0.3)")', "slow")
    pg_project.add_revision("slow", slow)
    sql = pg_project.ok("offline-sql", "--env=prod").stdout
    time.sleep(1)  # the SQL is applied later than it was rendered
    applied_after = pg_fetch(pg_database_2.dsn, "select now()")[0][0]
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pg_database_2.dsn],
        input=sql,
        text=True,
        check=True,
        capture_output=True,
    )
    rows = pg_fetch(
        pg_database_2.dsn,
        "select revision, direction, environment, started_at, duration_ms from migration_log",
    )
    assert [tuple(r[:3]) for r in rows] == [
        (head_revision(), "up", "prod"),
        ("slow01", "up", "prod"),
    ]
    assert all(r["started_at"] >= applied_after for r in rows)
    assert rows[1]["duration_ms"] >= 300


def test_pg_dump_backup_when_the_env_file_asks(project: Project, pg_database: PgDatabase) -> None:
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\nBACKUP=pg_dump\n")

    result = project.ok("migrate", "--env=ci")

    [dump] = (project.root / "var" / "backups").glob("ci-*.dump")
    assert f"backed up to var/backups/{dump.name} with pg_dump" in result.stderr
    assert dump.stat().st_size > 0 and (dump.stat().st_mode & 0o777) == 0o600


def dumped_tables(dump: Path) -> set[tuple[str, str]]:
    """The (schema, table) pairs a pg_dump file holds tables of."""
    listed = subprocess.run(
        ["pg_restore", "--list", str(dump)], capture_output=True, check=True, text=True
    )
    rows = [line.split() for line in listed.stdout.splitlines() if " TABLE " in line]
    return {(row[4], row[5]) for row in rows if row[3] == "TABLE" and row[4] != "DATA"}


def test_a_pg_dump_backup_holds_its_schema_by_its_exact_name(
    project: Project, pg_database: PgDatabase
) -> None:
    """pg_dump reads ``--schema=Shop`` as a pattern and folds it to ``shop``: the backup of
    SCHEMA=Shop was another tenant's schema (or no schema: pg_dump failed), said backed up."""
    pg_execute(pg_database.dsn, "create schema shop", "create table shop.other_tenant (x int)")
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\nSCHEMA=Shop\nBACKUP=pg_dump\n")
    project.migrated("ci")
    project.ok("rollback", "--env=ci")

    dump = sorted((project.root / "var" / "backups").glob("ci-*.dump"))[-1]  # rollback's
    assert ("Shop", "users") in dumped_tables(dump)
    assert ("shop", "other_tenant") not in dumped_tables(dump)


def test_a_pg_dump_backup_of_a_database_whose_name_holds_an_equals_sign(
    project: Project, pg_server: str
) -> None:
    """pg_dump reads a database name with ``=`` in it as connection settings: ``shop=eu``
    failed with 'invalid connection option "shop"', so nothing could be migrated."""
    name = f"shop=eu_{uuid.uuid4().hex[:8]}"
    pg_execute(pg_server, f'create database "{name}"')
    try:
        url = SERVER.set(drivername="postgresql+asyncpg", database=name)
        project.write_env("ci", f"DATABASE_URL={url.render_as_string(False)}\nBACKUP=pg_dump\n")

        result = project.ok("migrate", "--env=ci")

        [dump] = (project.root / "var" / "backups").glob("ci-*.dump")
        assert f"backed up to var/backups/{dump.name} with pg_dump" in result.stderr
        assert dumped_tables(dump) == set()  # the empty database, before the migration
        assert versions_of(str(url.set(drivername="postgresql"))) == [head_revision()]
    finally:
        pg_execute(pg_server, f'drop database "{name}" with (force)')


def test_a_pg_dump_behind_a_table_lock_gives_up_after_lock_timeout(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """pg_dump waits for a lock on every table; behind the app's ACCESS EXCLUSIVE lock (or
    a migration queued behind a long query) it waited without end, the migration lock held."""
    pg_project.extend_env("ci", "BACKUP=pg_dump\n")
    pg_project.ok("migrate", "--env=ci")
    add_email(pg_project)
    [first] = dumps(pg_project)

    seconds, code, stderr = migrate_while_users_is_locked(
        pg_project,
        pg_database,
        "access exclusive",  # the app's
    )

    assert code == 1, stderr
    assert "pg_dump failed, so nothing was migrated: " in stderr
    assert (
        "(it waited LOCK_TIMEOUT for a lock on public.users that another session holds): run "
        "the task again once that session is done, or raise LOCK_TIMEOUT\n"
    ) in stderr
    assert seconds < 15
    assert versions_of(pg_database.dsn) == [head_revision()]
    assert dumps(pg_project) == [first]  # no half-written dump


def test_a_signal_during_pg_dump_ends_it_and_the_task_at_once(
    project: Project, pg_database: PgDatabase
) -> None:
    """The run only took note of SIGTERM while pg_dump ran, and went on waiting for it."""
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\nBACKUP=pg_dump\nLOCK_TIMEOUT=1min\n")
    project.ok("migrate", "--env=ci")
    add_email(project)
    [first] = dumps(project)
    locked = "begin; lock table users in access exclusive mode; select pg_sleep(120)"
    app = subprocess.Popen(["psql", pg_database.dsn, "-c", locked], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: running_query(pg_database.dsn, "pg_sleep(120)"), "the app's lock")
        run = popen(project, "migrate", "--env=ci")
        waiting = "LOCK TABLE public.users IN ACCESS SHARE MODE"
        wait_until(lambda: running_query(pg_database.dsn, waiting), "pg_dump", process=run)

        os.kill(run.pid, signal.SIGTERM)
        _, err = run.communicate(timeout=20)
    finally:
        app.terminate()
        app.wait(timeout=10)

    assert run.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last == f"interrupted: the database is at {head_revision()}; no revision was run", err
    assert not running_query(pg_database.dsn, waiting)  # pg_dump is gone too
    assert versions_of(pg_database.dsn) == [head_revision()]
    assert dumps(project) == [first]


def test_pg_dump_missing_skips_the_backup_with_a_message(
    project: Project, pg_database: PgDatabase, tmp_path: Path
) -> None:
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\nBACKUP=pg_dump\n")
    result = project.ok("migrate", "--env=ci", PATH=str(tmp_path))
    assert "pg_dump is not installed here: skipped the backup" in result.stderr


@pytest.fixture
def late_server() -> Iterator[int]:
    """A port that starts forwarding to the real server only after two seconds."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    stop = threading.Event()
    opened: list[socket.socket] = []

    def pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)  # pass the end of the stream on
        except OSError:
            pass

    def serve() -> None:
        time.sleep(2)
        with socket.create_server(("127.0.0.1", port)) as listener:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    client = listener.accept()[0]
                except TimeoutError:
                    continue
                upstream = socket.create_connection(
                    (SERVER.host or "127.0.0.1", SERVER.port or 5432)
                )
                opened.extend((client, upstream))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join()
    for connection in opened:
        connection.close()


def test_wait_retries_the_first_connection(
    project: Project, pg_database: PgDatabase, late_server: int
) -> None:
    url = make_url(pg_database.url).set(host="127.0.0.1", port=late_server)
    url = url.render_as_string(hide_password=False)
    project.write_env("late", f"DATABASE_URL={url}\n")

    assert project.invoke("status", "--env=late").returncode == 1  # not up yet
    result = project.invoke("migrate", "--env=late", "--wait=20")

    assert result.returncode == 0, result.stderr
    rows = pg_fetch(pg_database.dsn, "select version_num from alembic_version")
    assert [r["version_num"] for r in rows] == [head_revision()]


def test_accept_changes_on_postgres_is_committed(project: Project, pg_database: PgDatabase) -> None:
    project.write_env("pg", f"DATABASE_URL={pg_database.url}\nPROTECTED=true\n")
    project.migrated("pg")
    [initial] = project.versions.glob(f"*_{head_revision()}_*.py")
    initial.write_text(initial.read_text() + "\nEDITED = True\n")  # code: it counts
    assert project.invoke("status", "--env=pg").returncode == 4

    project.ok("accept-changes", head_revision(), "--env=pg", "--yes")

    assert project.ok("status", "--env=pg").returncode == 0
    rows = pg_fetch(pg_database.dsn, "select direction from migration_log order by id")
    assert [r["direction"] for r in rows] == ["up", "accept"]


def test_reset_on_an_unprotected_postgres_database(
    project: Project, pg_database: PgDatabase
) -> None:
    project.write_env("pg", f"DATABASE_URL={pg_database.url}\n")
    project.migrated("pg")
    project.ok("seed", "--env=pg")

    result = project.ok("reset", "--env=pg")

    assert "dropped the schema public (made again, empty): migrating from scratch" in (
        result.stderr
    )
    assert f"applied {head_revision()}" in result.stderr
    assert pg_fetch(pg_database.dsn, "select count(*) as n from purchases")[0]["n"] == 0


def schema_as_it_is(dsn: str) -> dict[str, object]:
    """What the public schema itself carries: its owner, grants, comment, default grants."""
    [row] = pg_fetch(
        dsn,
        "select nspowner::regrole::text as owner, nspacl::text as grants, "
        "obj_description(n.oid, 'pg_namespace') as comment, (select array_agg(defaclacl::text) "
        "from pg_default_acl where defaclnamespace = n.oid) as defaults "
        "from pg_namespace n where nspname = 'public'",
    )
    return dict(row)


def test_reset_makes_the_schema_again_as_it_was_with_new_tables(
    project: Project, pg_database: PgDatabase
) -> None:
    """reset drops the schema and makes it again: the new one was the migrating user's, with
    no grants, no comment and no default privileges, so the app's role saw no table."""
    app = f"app_{uuid.uuid4().hex[:8]}"
    grant = f"alter default privileges in schema public grant select on tables to {app}"
    pg_execute(pg_database.dsn, f"create role {app}", grant)
    try:
        project.write_env("pg", f"DATABASE_URL={pg_database.url}\n")
        project.migrated("pg")
        before = schema_as_it_is(pg_database.dsn)

        project.ok("reset", "--env=pg")

        assert schema_as_it_is(pg_database.dsn) == before
        [can] = pg_fetch(
            pg_database.dsn,
            f"select has_schema_privilege('{app}', 'public', 'usage') "
            f"and has_table_privilege('{app}', 'public.users', 'select') as read",
        )
        assert can["read"]
    finally:
        pg_execute(pg_database.dsn, f"drop owned by {app}", f"drop role {app}")


def test_reset_by_a_role_that_does_not_own_the_schema_says_what_it_needs(
    project: Project, pg_database: PgDatabase
) -> None:
    """The migration's role owns the tables but not the schema: the drop was refused with
    'must be owner of schema public', and the advice was 'fix that'."""
    role = f"mig_{uuid.uuid4().hex[:8]}"
    pg_execute(
        pg_database.dsn, f"create role {role} login", f"grant create on schema public to {role}"
    )
    try:
        url = make_url(pg_database.url).set(username=role).render_as_string(False)
        project.write_env("pg", f"DATABASE_URL={url}\n")
        project.migrated("pg")

        error = project.fails("reset", "--env=pg")

        assert (
            "reset could not drop the tables: ProgrammingError: must be owner of schema public\n"
            in error
        )
        assert error.endswith(
            "nothing was dropped: the database is as it was; reset drops the schema public and "
            "makes it again as it was, which takes its owner's rights and CREATE on the "
            f'database: run it as a role that has both, or give them to "{role}" (ALTER SCHEMA '
            f'"public" OWNER TO "{role}"; GRANT CREATE ON DATABASE "{pg_database.name}" TO '
            f'"{role}"), or drop the tables yourself\n'
        )
        assert versions_of(pg_database.dsn) == [head_revision()]
    finally:
        pg_execute(pg_database.dsn, f"drop owned by {role}", f"drop role {role}")


def test_reset_drops_the_schema_the_tables_are_in_when_it_is_named_as_the_role(
    project: Project, pg_database: PgDatabase
) -> None:
    """PostgreSQL's search path puts a schema named as the role ("$user") before public, so
    the revisions' tables went there; reset dropped public, said 'nothing to do, the
    database is already there', and every row stayed."""
    role = f"mig_{uuid.uuid4().hex[:8]}"
    pg_execute(
        pg_database.dsn,
        f"create role {role} login",
        f"create schema authorization {role}",  # the role's own schema
        f'grant create on database "{pg_database.name}" to {role}',  # to make it again
    )
    try:
        url = make_url(pg_database.url).set(username=role).render_as_string(False)
        project.write_env("pg", f"DATABASE_URL={url}\n")
        project.migrated("pg")
        project.ok("seed", "--env=pg")

        result = project.ok("reset", "--env=pg")

        assert "pg: reset and migrated 1 revision" in result.stderr
        [row] = pg_fetch(pg_database.dsn, f"select count(*) as n from {role}.users")
        assert row["n"] == 0
    finally:
        pg_execute(
            pg_database.dsn,
            f'revoke create on database "{pg_database.name}" from {role}',
            f"drop owned by {role}",
            f"drop role {role}",
        )


def test_a_data_migration_that_reads_rows_does_not_block_a_protected_migrate(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    pg_project.write_env("ci", f"DATABASE_URL={pg_database.url}\nPROTECTED=true\n")
    pg_project.migrated("ci")
    body = (
        'rows = op.get_bind().execute(sa.text("select id from categories")).fetchall()\n'
        '    op.execute(f"create table counted as select {len(rows)} as n")'
    )
    pg_project.add_revision("data", revision("data01", head_revision(), body, message="count"))

    result = pg_project.ok("migrate", "--env=ci", "--yes")

    assert "data01: not-lintable-offline: it cannot be rendered as SQL offline" in result.stderr
    assert "applied data01" in result.stderr
    assert [row["n"] for row in pg_fetch(pg_database.dsn, "select n from counted")] == [0]
    error = pg_project.fails("offline-sql", "--env=ci")
    assert "revision data01 cannot be rendered as SQL offline" in error


@pytest.mark.postgres
def test_a_revision_that_inserts_ids_its_sequence_has_not_given_fails_with_the_fix(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """Reference data inserted with its ids ran on dev, where SQLite numbers a new row after
    the largest id; on PostgreSQL the sequence stayed at 1, and once it reached 10 each of
    the app's inserts failed on a duplicate key. Rows the sequence numbered pass."""
    project = pg_project
    project.migrated("ci")
    numbered = "op.execute(\"insert into categories (name) values ('Music')\")"
    project.add_revision("music", revision("music01", head_revision(), numbered))
    project.add_revision("books", revision("books01", "music01", REFERENCE_CATEGORIES))

    error = project.fails("migrate", "--env=ci")

    assert (
        "upgrade of revision books01 (hand written) failed: the revision inserts ids into "
        "categories that its sequence public.categories_id_seq has not given (id reaches 11, "
        "the sequence 1), so the app's inserts would fail on a duplicate key: end the "
        f'revision with op.execute("{SETVAL}"), under if op.get_context().dialect.name == '
        '"postgresql"\n'
        "the database is at music01; this run kept music01; books01 was rolled back"
    ) in error
    assert versions_of(pg_database.dsn) == ["music01"]
    project.ok("migrate")  # dev numbers past the largest id by itself
    fixed = f'{REFERENCE_CATEGORIES}\n    if op.get_context().dialect.name == "postgresql":\n'
    fixed += f'        op.execute("{SETVAL}")'
    project.add_revision("books", revision("books01", "music01", fixed))

    project.ok("migrate", "--env=ci")

    rows = pg_fetch(pg_database.dsn, "insert into categories (name) values ('Games') returning id")
    assert rows[0]["id"] == 12


# A batch block told to copy its table whatever the dialect (Alembic's docs give it for
# what SQLite cannot alter)
RECREATE = (
    'with op.batch_alter_table("purchases", recreate={recreate}) as batch_op:\n'
    '        batch_op.add_column(sa.Column("note", sa.String(100)))'
)
ON_SQLITE_ONLY = '"always" if op.get_context().dialect.name == "sqlite" else "auto"'


def test_a_batch_block_that_would_copy_a_table_on_postgresql_is_refused_with_the_way_out(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """``recreate="always"`` copied the table on PostgreSQL too, which passed on an empty
    database: on one with rows, the copy's key took a new sequence starting at 1, so every
    insert of the app failed on a duplicate key. It is refused, online and offline, and
    the form that copies on SQLite only runs on both."""
    project = pg_project
    project.migrated("ci")
    project.ok("seed", "--env=ci")
    always = RECREATE.format(recreate='"always"')
    project.add_revision("note", revision("note01", head_revision(), always))
    project.ok("migrate")  # SQLite copies its table, as it must to change it

    error = project.fails("migrate", "--env=ci")
    offline = project.fails("offline-sql", "--env=ci", f"--from={head_revision()}")

    refusal = (
        'batch_alter_table("purchases", recreate="always") would copy the table on '
        "PostgreSQL too, where the copy numbers new rows from 1 again (each insert failing on "
        "a duplicate key) and loses the table's grants and triggers: leave recreate out "
        "(SQLite's table is copied whenever a change needs it), or copy on SQLite only: "
        f"recreate={ON_SQLITE_ONLY}"
    )
    assert (
        f"error: upgrade of revision note01 (hand written) failed: {refusal}\n"
        f"the database is at {head_revision()}; note01 was rolled back"
    ) in error
    assert f"error: revision note01 cannot be rendered as SQL offline: {refusal}\n" in offline
    assert versions_of(pg_database.dsn) == [head_revision()]
    sequence = "select pg_get_serial_sequence('purchases', 'id') as name"
    assert pg_fetch(pg_database.dsn, sequence)[0]["name"] == "public.purchases_id_seq"
    only_sqlite = RECREATE.format(recreate=ON_SQLITE_ONLY)
    project.add_revision("note", revision("note01", head_revision(), only_sqlite))

    project.ok("migrate", "--env=ci")
    project.ok("rollback")  # and on dev
    project.ok("migrate")

    top = pg_fetch(pg_database.dsn, "select max(id) from purchases")[0][0]
    added = "insert into purchases (user_id, product_id, price, payment_id, note) "
    added += "select user_id, product_id, price, 'new', 'x' from purchases limit 1 returning id"
    assert pg_fetch(pg_database.dsn, added)[0]["id"] == top + 1
