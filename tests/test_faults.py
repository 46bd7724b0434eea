"""Real faults on PostgreSQL: a killed session, server timeouts, signals, a restart.

Each test reads the database back and checks that what the tasks printed is what happened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from datetime import timezone
from typing import Any

import pytest
from conftest import (
    Cluster,
    Link,
    PgDatabase,
    Project,
    cluster,
    head_revision,
    holding_lock,
    lock_holders,
    network_link,
    pg_execute,
    pg_fetch,
    popen,
    revision,
    running_query,
    tmpfs,
    versions_of,
    wait_until,
)

pytestmark = pytest.mark.postgres
SLOW = 'if __import__("os").environ.get("SLOW"):\n        op.execute("select pg_sleep(30)")'


@pytest.fixture
def shop(pg_project: Project, pg_database: PgDatabase) -> Project:
    """A database at head with one product at price 10, and an env ``ci`` for it."""
    project = pg_project
    project.migrated("ci")
    pg_execute(
        pg_database.dsn,
        "insert into categories (id, name) values (1, 'books')",
        "insert into products (category_id, name, price) values (1, 'guide', 10)",
    )
    return project


def price(database: PgDatabase) -> int:
    [row] = pg_fetch(database.dsn, "select price from products")
    return int(row["price"])


def log(database: PgDatabase) -> list[tuple[str, str]]:
    rows = pg_fetch(database.dsn, "select revision, direction from migration_log order by id")
    return [(row["revision"], row["direction"]) for row in rows]


def double_then_add_one(project: Project, *, add_outside_transaction: bool) -> None:
    """p01 doubles the price, p02 adds one; the second part (with SLOW=1) sleeps.

    The sleep is in p01 when p02 is transactional, else inside p02's autocommit_block."""
    double = 'op.execute("update products set price = price * 2")'
    add = 'op.execute("update products set price = price + 1")'
    if add_outside_transaction:
        indented = SLOW.replace("\n", "\n    ")
        add = f"with op.get_context().autocommit_block():\n        {add}\n        {indented}"
    else:
        double += f"\n    {SLOW}"
    project.add_revision("p01", revision("p01", head_revision(), double, "double prices"))
    project.add_revision("p02", revision("p02", "p01", add, message="add one"))


def kill_mid_run(shop: Project, database: PgDatabase) -> tuple[tuple[int, str], tuple[int, str]]:
    """Start a slow run; when it sleeps, start a second run and kill the first one's session."""
    first = popen(shop, "migrate", "--env=ci", SLOW="1")
    [sleeping] = wait_until(
        lambda: running_query(database.dsn, "pg_sleep(30)"), "the slow revision", process=first
    )
    assert lock_holders(database) == [sleeping["pid"]]  # the lock is on the working session
    second = popen(shop, "migrate", "--env=ci", "--lock-wait=30")
    wait_until(lambda: second.printed("for the migration lock, held by"), "the second run waits")
    pg_execute(database.dsn, f"select pg_terminate_backend({sleeping['pid']})")
    results = []
    for process in (first, second):
        _, err = process.communicate(timeout=60)
        results.append((process.returncode, err))
    return results[0], results[1]


def test_a_run_that_lost_its_lock_never_claims_what_another_did(
    shop: Project, pg_database: PgDatabase
) -> None:
    """Killed inside p01, the run read the database back at p01 (put there by something
    else once its lock was gone) and said "p01 was committed", which it never sent."""
    double_then_add_one(shop, add_outside_transaction=False)
    first = popen(shop, "migrate", "--env=ci", SLOW="1")
    [sleeping] = wait_until(
        lambda: running_query(pg_database.dsn, "pg_sleep(30)"), "the slow revision", process=first
    )
    pg_execute(pg_database.dsn, "update alembic_version set version_num = 'p01'")  # elsewhere
    pg_execute(pg_database.dsn, f"select pg_terminate_backend({sleeping['pid']})")
    _, err = first.communicate(timeout=60)

    assert first.returncode == 3, err
    assert (
        "the database is at p01; p01 was rolled back, though the database now has it: "
        "something else did it since (another run, once this one lost its lock?)"
    ) in err
    assert "p01 was committed" not in err
    assert price(pg_database) == 10  # nothing of this run's p01


def test_a_killed_session_stops_its_run_and_the_next_run_applies_each_revision_once(
    shop: Project, pg_database: PgDatabase
) -> None:
    double_then_add_one(shop, add_outside_transaction=False)

    (code1, err1), (code2, err2) = kill_mid_run(shop, pg_database)

    assert code1 == 3, err1
    assert "lost the connection, and with it the migration lock" in err1
    # the second run may have applied p01 by the time the first reads the database back
    assert re.search(f"the database is at ({head_revision()}|p01|p02); p01 was rolled back", err1)
    assert "applied p01" not in err1
    assert code2 == 0, err2
    assert "applied p01" in err2 and "applied p02" in err2
    assert price(pg_database) == 21  # 10 * 2 + 1: each revision exactly once
    assert versions_of(pg_database.dsn) == ["p02"]
    assert log(pg_database)[-2:] == [("p01", "up"), ("p02", "up")]
    assert not lock_holders(pg_database)


def test_a_killed_non_transactional_revision_is_never_run_again_blindly(
    shop: Project, pg_database: PgDatabase
) -> None:
    double_then_add_one(shop, add_outside_transaction=True)

    (code1, err1), (code2, err2) = kill_mid_run(shop, pg_database)

    assert code1 == 3, err1
    assert "the database is at p01; this run kept p01" in err1
    assert "p02 stopped in its non-transactional part" in err1
    assert "last statement started: select pg_sleep(30)" in err1
    assert "invoke resolve --env=ci p02 --applied" in err1
    assert code2 == 4, err2
    assert "revision p02 started its non-transactional part" in err2
    assert "(last statement started: select pg_sleep(30))" in err2
    assert price(pg_database) == 21  # the block's update committed once, and only once
    assert versions_of(pg_database.dsn) == ["p01"]
    assert log(pg_database)[-2:] == [("p01", "up"), ("p02", "run-up")]

    resolved = shop.ok("resolve", "p02", "--applied", "--env=ci")
    assert "recorded p02 as applied; the database is at p02" in resolved.stderr
    assert "nothing to do" in shop.ok("migrate", "--env=ci").stderr
    assert price(pg_database) == 21
    assert versions_of(pg_database.dsn) == ["p02"]
    assert log(pg_database)[-2:] == [("p01", "up"), ("p02", "up")]


def test_a_revision_that_releases_the_lock_is_rolled_back_before_it_commits(
    shop: Project, pg_database: PgDatabase
) -> None:
    """The lock is checked in the statement that writes each revision's audit row, so a
    revision whose session no longer holds it never commits."""
    add = 'op.execute("update products set price = price + 1")'
    let_go = 'op.execute("select pg_advisory_unlock_all()")'
    shop.add_revision("p01", revision("p01", head_revision(), add, "add one"))
    shop.add_revision("p02", revision("p02", "p01", f"{add}\n    {let_go}", "add one, let go"))

    result = shop.invoke("migrate", "--env=ci")

    assert result.returncode == 3, result.stderr
    assert "lost the migration lock during the upgrade of revision p02" in result.stderr
    assert "the database is at p01; this run kept p01; p02 was rolled back" in result.stderr
    assert price(pg_database) == 11
    assert versions_of(pg_database.dsn) == ["p01"]
    assert log(pg_database)[-1] == ("p01", "up")
    assert not lock_holders(pg_database)


def test_a_non_transactional_revision_that_releases_the_lock_is_not_recorded_as_applied(
    shop: Project, pg_database: PgDatabase
) -> None:
    block = (
        "with op.get_context().autocommit_block():\n"
        '        op.execute("update products set price = price + 1")\n'
        '        op.execute("select pg_advisory_unlock_all()")'
    )
    shop.add_revision("p01", revision("p01", head_revision(), block, "add one, let go"))

    result = shop.invoke("migrate", "--env=ci")

    assert result.returncode == 3, result.stderr
    assert "lost the migration lock during the upgrade of revision p01" in result.stderr
    assert f"the database is at {head_revision()}" in result.stderr
    assert "p01 stopped in its non-transactional part" in result.stderr
    assert "invoke resolve --env=ci p01 --applied" in result.stderr
    assert price(pg_database) == 11  # the block committed, once
    assert versions_of(pg_database.dsn) == [head_revision()]
    assert log(pg_database)[-1] == ("p01", "run-up")


def test_a_revision_resolved_as_rolled_back_runs_again(
    shop: Project, pg_database: PgDatabase
) -> None:
    double_then_add_one(shop, add_outside_transaction=True)
    kill_mid_run(shop, pg_database)
    pg_execute(pg_database.dsn, "update products set price = price - 1")  # the operator's undo

    shop.ok("resolve", "p02", "--rolled-back", "--env=ci")
    assert "applied p02" in shop.ok("migrate", "--env=ci").stderr

    assert price(pg_database) == 21
    assert log(pg_database)[-3:] == [("p01", "up"), ("p02", "aborted"), ("p02", "up")]
    error = shop.fails("resolve", "p02", "--applied", "--env=ci")
    assert "revision p02 has no unfinished run" in error


def test_resolve_needs_to_be_told_how_the_revision_ended(shop: Project) -> None:
    error = shop.fails("resolve", "p02", "--env=ci")
    assert "pass --applied or --rolled-back, one of them" in error
    result = shop.invoke("resolve", "p02", "--applied", "--rolled-back", "--env=ci")
    assert result.returncode == 2 and "--rolled-back, not both" in result.stderr


def test_server_idle_timeouts_never_fail_a_good_run(shop: Project, pg_database: PgDatabase) -> None:
    pg_execute(
        pg_database.dsn,
        f"alter database \"{pg_database.name}\" set idle_session_timeout = '400ms'",
        f"alter database \"{pg_database.name}\" set idle_in_transaction_session_timeout = '400ms'",
    )
    pause = '__import__("time").sleep(1)\n    op.execute("select 1")'  # 2.5x the timeouts
    shop.add_revision("i1", revision("idle01", head_revision(), pause))
    shop.add_revision("i2", revision("idle02", "idle01", pause))

    result = shop.invoke("migrate", "--env=ci")

    assert result.returncode == 0, result.stderr
    assert versions_of(pg_database.dsn) == ["idle02"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_rolls_back_the_running_revision_and_says_where_the_database_is(
    shop: Project, pg_database: PgDatabase, signum: int, code: int
) -> None:
    shop.add_revision("s1", revision("sig01", head_revision(), 'op.create_table("t1")'))
    body = f'op.create_table("t2")\n    {SLOW}'
    shop.add_revision("s2", revision("sig02", "sig01", body, message="slow one"))
    run = popen(shop, "migrate", "--env=ci", SLOW="1")
    wait_until(lambda: running_query(pg_database.dsn, "pg_sleep(30)"), "the sleep", process=run)

    os.kill(run.pid, signum)
    _, err = run.communicate(timeout=20)

    assert run.returncode == code, err
    name = signal.Signals(signum).name
    assert f"  stopping at the next safe point ({name} again stops at once)\n" in err
    last = err.strip().splitlines()[-1]
    assert (
        last == "interrupted: the database is at sig01; this run kept sig01; sig02 was rolled back"
    )
    assert "applied sig01" in err and "applied sig02" not in err
    assert versions_of(pg_database.dsn) == ["sig01"]
    tables = pg_fetch(pg_database.dsn, "select tablename from pg_tables where tablename like 't_'")
    assert [row["tablename"] for row in tables] == ["t1"]
    assert not lock_holders(pg_database)


def test_a_signal_during_a_revisions_python_step_rolls_it_back_on_postgres(
    shop: Project, pg_database: PgDatabase
) -> None:
    """No statement runs while a revision's Python code does, so none is cancelled: the
    revision committed once the step returned, and the run said "migrated" and exited 0."""
    shop.add_revision("p1", revision("py01", head_revision(), 'op.create_table("t1")'))
    body = 'op.create_table("t2")\n    __import__("time").sleep(2)'
    shop.add_revision("p2", revision("py02", "py01", body, message="python step"))
    run = popen(shop, "migrate", "--env=ci")
    wait_until(lambda: run.printed("applying py02"), "the Python step", process=run)

    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=20)

    assert run.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last == "interrupted: the database is at py01; this run kept py01; py02 was rolled back"
    assert versions_of(pg_database.dsn) == ["py01"]
    tables = pg_fetch(pg_database.dsn, "select tablename from pg_tables where tablename like 't_'")
    assert [row["tablename"] for row in tables] == ["t1"]
    assert not lock_holders(pg_database)


@pytest.fixture
def own_server(pg_server: str) -> Iterator[Cluster]:
    with cluster("--auth=trust") as found:
        pg_execute(f"postgresql://postgres@127.0.0.1:{found.port}/postgres", "create database shop")
        yield found


def test_a_server_restart_mid_run_reports_the_first_error(
    project: Project, own_server: Cluster
) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{own_server.port}/shop"
    project.write_env("own", f"DATABASE_URL={dsn.replace('postgresql:', 'postgresql+asyncpg:')}\n")
    project.add_revision("r1", revision("rst01", head_revision(), SLOW))
    run = popen(project, "migrate", "--env=own", SLOW="1")
    wait_until(lambda: running_query(dsn, "pg_sleep(30)"), "the sleep", process=run)

    own_server.restart()
    _, err = run.communicate(timeout=60)

    assert run.returncode == 3, err
    assert "during the upgrade of revision rst01" in err
    assert "terminating connection due to administrator command" in err
    assert "InterfaceError" not in err
    at = err.strip().splitlines()[-1]
    assert at.startswith(f"the database is at {head_revision()}; this run kept {head_revision()}")
    assert "rst01 was rolled back" in at
    assert versions_of(dsn) == [head_revision()]


@pytest.fixture
def far_server(pg_server: str) -> Iterator[tuple[Cluster, Link]]:
    """A server of our own in a network namespace, behind a link a test can cut."""
    with network_link() as link, cluster("--auth=trust", link=link) as found:
        pg_execute(found.socket_dsn, "create database shop")
        yield found, link


# Where the revision waits when the link is cut (as pg_stat_activity shows it), what it
# runs, and what became of it: in the server (a statement running), in the task (its
# session idle in its transaction, its next statement unsent), or in its COMMIT (a
# deferred trigger's sleep), whose answer never comes.
NAP = 'if __import__("os").environ.get("SLOW"):\n        '
NOT_COMMITTED = "far01 did not commit"
WAITS = {
    "server": ("query like '%pg_sleep(30)%'", SLOW, NOT_COMMITTED),
    "task": (
        "query like '%before_the_nap%'",
        NAP + 'op.execute("select 1 as before_the_nap")\n        __import__("time").sleep(20)',
        NOT_COMMITTED,
    ),
    "commit": (
        "query ilike 'commit%' and wait_event = 'PgSleep'",
        NAP
        + "\n        ".join(
            f'op.execute("{statement}")'
            for statement in (
                "create table naps (id int)",
                "create function nap() returns trigger language plpgsql as "
                "'begin perform pg_sleep(30); return null; end'",
                "create constraint trigger nap after insert on naps deferrable "
                "initially deferred for each row execute function nap()",
                "insert into naps values (1)",
            )
        ),
        "whether far01 committed is not known: `invoke status --env=far` tells, once the "
        "server answers",
    ),
}


@pytest.mark.parametrize("waiting", list(WAITS))
def test_a_network_partition_mid_run_ends_the_run_and_its_session_within_network_timeout(
    project: Project, far_server: tuple[Cluster, Link], waiting: str
) -> None:
    """Packets between the task and the server vanish mid-revision. The task once waited
    for good (no keepalive on asyncpg's socket), and the server kept the session, its
    open revision and its locks, for as long as its own TCP gave it (hours when idle).
    Now the server ends the session after NETWORK_TIMEOUT, well before the revision's wait
    ends (20s or more), and the task gives the server up once it waits on it that long,
    saying what it knows of the revision."""
    server, link = far_server
    url = f"postgresql+asyncpg://postgres@{link.server}:{server.port}/shop"
    project.write_env("far", f"DATABASE_URL={url}\nNETWORK_TIMEOUT=4\n")
    project.migrated("far")
    where, slow, said = WAITS[waiting]
    project.add_revision("far", revision("far01", head_revision(), slow, message="far"))
    local = server.socket_dsn.replace("/postgres?", "/shop?")

    def session(condition: str) -> list[Any]:
        mine = "pid <> pg_backend_pid()"  # whose query would match
        return pg_fetch(local, f"select pid from pg_stat_activity where {mine} and {condition}")

    def cut() -> None:
        link.cut()
        gone = "application_name = 'migrations'"
        wait_until(lambda: not session(gone), "the server ending the session", 12)

    run = popen(project, "migrate", "--env=far", SLOW="1")
    err = run.when(lambda: session(where), "the revision's wait", cut, 60)

    assert not pg_fetch(local, "select 1 from pg_locks where locktype = 'advisory'")
    assert run.returncode == 3, err
    assert (
        "error: lost the connection, and with it the migration lock, during the upgrade of "
        "revision far01 (far): the server stopped answering for 4s (NETWORK_TIMEOUT): the "
        "network or the server's host is down\nits revision could not be read back ("
    ) in err
    assert err.endswith(f"; {said}; run the task again\n"), err
    link.mend()
    assert versions_of(local) == [head_revision()]  # far01 was rolled back
    assert "migrated 1 revision" in project.ok("migrate", "--env=far").stderr


def test_a_run_waiting_for_the_lock_gives_a_silent_server_up_after_network_timeout(
    project: Project, far_server: tuple[Cluster, Link]
) -> None:
    """The link is cut while the run waits for the migration lock, asking the server
    again and again: its question goes unanswered, and it once kept asking for as long as
    TCP retries (a quarter of an hour), whatever --lock-wait said."""
    server, link = far_server
    url = f"postgresql+asyncpg://postgres@{link.server}:{server.port}/shop"
    project.write_env("far", f"DATABASE_URL={url}\nNETWORK_TIMEOUT=4\n")
    project.migrated("far")
    project.add_revision("far", revision("far01", head_revision(), message="far"))
    local = server.socket_dsn.replace("/postgres?", "/shop?")

    with holding_lock(local, "alembic_version"):
        run = popen(project, "migrate", "--env=far", "--lock-wait=120")
        waiting = "for the migration lock, held by"
        err = run.when(lambda: run.printed(waiting), "the run to wait", link.cut, 60)

    assert run.returncode == 1, err
    assert err.endswith(
        f"error: database error on {url}: the server stopped answering for 4s "
        "(NETWORK_TIMEOUT): the network or the server's host is down\nno revision was run; "
        "run the task again once the server answers\n"
    ), err
    link.mend()
    assert versions_of(local) == [head_revision()]


def test_a_full_disk_on_the_server_rolls_the_revision_back_and_says_so(
    project: Project, own_server: Cluster
) -> None:
    """The database lives on a small tmpfs (a tablespace there): a revision that writes
    more than fits fails with PostgreSQL's 53100, and the run says the disk is full."""
    admin = f"postgresql://postgres@127.0.0.1:{own_server.port}/postgres"
    with tmpfs(own_server.base / "small", "24m") as small:
        shutil.chown(small, "postgres", "postgres")
        pg_execute(
            admin,
            f"create tablespace small location '{small}'",
            "create database tiny tablespace small",
        )
        try:
            dsn = admin.rsplit("/", 1)[0] + "/tiny"
            project.write_env(
                "tiny", f"DATABASE_URL={dsn.replace('postgresql:', 'postgresql+asyncpg:')}\n"
            )
            big = (
                "op.execute(\"create table big as select repeat('x', 1000) as x "
                'from generate_series(1, 40000)")'
            )
            project.add_revision("big", revision("big01", head_revision(), big, message="big"))

            error = project.fails("migrate", "--env=tiny")

            assert "failed: the disk is full (DiskFullError: could not extend file" in error
            assert error.endswith(
                f"the database is at {head_revision()}; this run kept {head_revision()}; big01 "
                "was rolled back; free some space and run the task again\n"
            )
            assert versions_of(dsn) == [head_revision()]
            tables = pg_fetch(dsn, "select 1 from pg_tables where tablename = 'big'")
            assert not tables
        finally:
            pg_execute(admin, "drop database if exists tiny", "drop tablespace if exists small")


def add_one_undone_outside_a_transaction(project: Project, rev: str = "p01") -> None:
    """``rev`` adds one to the price; its downgrade takes it back in an autocommit_block,
    and sleeps there when SLOW is set."""
    undo = (
        "with op.get_context().autocommit_block():\n"
        '        op.execute("update products set price = price - 1")\n'
        "        " + SLOW.replace("\n", "\n    ")
    )
    text = revision(rev, head_revision(), 'op.execute("update products set price = price + 1")')
    project.add_revision(
        rev, text.replace("downgrade() -> None:\n    pass", f"downgrade() -> None:\n    {undo}")
    )


def kill_the_slow_downgrade(shop: Project, database: PgDatabase, *flags: str) -> str:
    """Roll back with SLOW set, and end the run's session while its downgrade sleeps in its
    non-transactional block (after taking the price back); returns what the run printed."""
    run = popen(shop, "rollback", "--env=ci", "--yes", *flags, SLOW="1")
    [sleeping] = wait_until(
        lambda: running_query(database.dsn, "pg_sleep(30)"), "the slow downgrade", process=run
    )
    pg_execute(database.dsn, f"select pg_terminate_backend({sleeping['pid']})")
    _, err = run.communicate(timeout=60)
    assert run.returncode == 3, err
    return err


def test_a_killed_non_transactional_downgrade_says_it_was_the_downgrade(
    shop: Project, pg_database: PgDatabase
) -> None:
    """For a downgrade, --applied is the flag that leaves the revision not applied: the
    messages say which run stopped, and what each flag records."""
    add_one_undone_outside_a_transaction(shop)
    shop.ok("migrate", "--env=ci")

    err = kill_the_slow_downgrade(shop, pg_database)

    hint = (
        "`invoke resolve --env=ci p01 --applied` if all of its downgrade is in the database "
        "(or --rolled-back if none is)"
    )
    assert "the downgrade of p01 stopped in its non-transactional part" in err
    assert f"so part of it may be in the database: check, then run {hint}" in err
    assert versions_of(pg_database.dsn) == ["p01"]
    assert log(pg_database)[-1] == ("p01", "run-down")
    refused = shop.invoke("migrate", "--env=ci")
    assert refused.returncode == 4, refused.stderr
    assert "the downgrade of revision p01 started its non-transactional part" in refused.stderr
    assert f"then record it with {hint}" in refused.stderr


def test_status_and_check_show_a_run_that_never_finished(
    shop: Project, pg_database: PgDatabase
) -> None:
    """The downgrade stopped part way, the version table still at p01: status said "pending:
    none" (up to date in JSON, exit 0 with --check, so a deploy gated on it went ahead),
    and check passed, while migrate and rollback refuse until it is resolved."""
    add_one_undone_outside_a_transaction(shop)
    shop.ok("migrate", "--env=ci")
    kill_the_slow_downgrade(shop, pg_database)
    said = (
        "the downgrade of revision p01 started its non-transactional part at {} UTC and never "
        "finished: check what it did, then record it with `invoke resolve --env=ci p01 --applied`"
        " if all of its downgrade is in the database (or --rolled-back if none is)"
    )
    [row] = pg_fetch(
        pg_database.dsn, "select started_at from migration_log where direction = 'run-down'"
    )
    said = said.format(f"{row['started_at'].astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}")

    status = shop.ok("status", "--env=ci").stdout
    assert status.endswith(f"pending: none\nunfinished: {said}\n"), status
    data = json.loads(shop.ok("status", "--env=ci", "--json").stdout)
    assert data["up_to_date"] is False
    assert [(u["id"], u["direction"], u["said"]) for u in data["unfinished"]] == [
        ("p01", "downgrade", said)
    ]
    gate = shop.invoke("status", "--env=ci", "--check")
    assert gate.returncode == 5, gate.stderr
    assert "ci: 1 non-transactional run(s) never finished: resolve them" in gate.stderr
    checked = shop.invoke("check", "--env=ci")
    assert checked.returncode == 5 and f"  {said}\n" in checked.stderr, checked.stderr

    shop.ok("resolve", "p01", "--rolled-back", "--env=ci")
    assert shop.ok("status", "--env=ci", "--check").stdout.endswith("pending: none\n")
    assert "check passed" in shop.ok("check", "--env=ci").stderr


def test_a_downgrade_resolved_as_applied_leaves_the_revision_not_applied(
    shop: Project, pg_database: PgDatabase
) -> None:
    add_one_undone_outside_a_transaction(shop)
    shop.ok("migrate", "--env=ci")
    kill_the_slow_downgrade(shop, pg_database)
    assert price(pg_database) == 10  # the block took the price back, and committed

    resolved = shop.ok("resolve", "p01", "--applied", "--env=ci")

    said = "recorded the downgrade of p01 as finished: it is not applied; the database is at"
    assert f"{said} {head_revision()}\n" in resolved.stderr
    assert versions_of(pg_database.dsn) == [head_revision()]
    assert log(pg_database)[-1] == ("p01", "down")
    assert "applied p01" in shop.ok("migrate", "--env=ci").stderr
    assert price(pg_database) == 11


def test_a_downgrade_resolved_as_rolled_back_leaves_the_revision_applied(
    shop: Project, pg_database: PgDatabase
) -> None:
    add_one_undone_outside_a_transaction(shop)
    shop.ok("migrate", "--env=ci")
    kill_the_slow_downgrade(shop, pg_database)
    pg_execute(pg_database.dsn, "update products set price = price + 1")  # the operator's undo
    shop.extend_env("ci", "PROTECTED=true\n")
    refused = shop.invoke("resolve", "p01", "--rolled-back", "--env=ci")
    assert refused.returncode == 4 and "pass --yes to go ahead" in refused.stderr
    assert log(pg_database)[-1] == ("p01", "run-down")

    resolved = shop.ok("resolve", "p01", "--rolled-back", "--env=ci", "--yes")

    said = (
        "recorded the downgrade of p01 as rolled back: it is still applied; the database is at p01"
    )
    assert said in resolved.stderr
    assert versions_of(pg_database.dsn) == ["p01"]
    assert log(pg_database)[-1] == ("p01", "aborted")
    assert "reverted p01" in shop.ok("rollback", "--env=ci", "--yes").stderr
    assert price(pg_database) == 10


def test_a_resolved_downgrade_keeps_the_other_branchs_head(
    shop: Project, pg_database: PgDatabase
) -> None:
    """Recording the downgrade moves the version table as the step would have: to its parent
    on its own branch. A stamp to the parent took the other branch's head away with it, so
    that branch's revision would have run a second time."""
    add_one_undone_outside_a_transaction(shop)
    shop.add_revision("x01", revision("x01", head_revision(), message="another branch"))
    shop.ok("migrate", "--env=ci", "--to=heads")
    assert versions_of(pg_database.dsn) == ["p01", "x01"]
    kill_the_slow_downgrade(shop, pg_database, "--to=p01@-1")

    resolved = shop.ok("resolve", "p01", "--applied", "--env=ci")

    assert "the database is at x01" in resolved.stderr
    assert versions_of(pg_database.dsn) == ["x01"]
    status = shop.ok("status", "--env=ci").stdout
    assert "pending: 1\n  p01  hand written" in status, status
    migrated = shop.ok("migrate", "--env=ci", "--to=heads").stderr
    assert "applied p01" in migrated and "applying x01" not in migrated, migrated
    assert versions_of(pg_database.dsn) == ["p01", "x01"]
    assert price(pg_database) == 11
