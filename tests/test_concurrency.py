"""One migration at a time: concurrent runs on one database serialize, and nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing, contextmanager, suppress
from typing import Any

import pytest
from conftest import (
    Background,
    PgDatabase,
    Project,
    head_revision,
    pg_fetch,
    popen,
    revision,
    running_query,
    version,
    wait_until,
)

from db.locks import NAMESPACE


def finish(processes: list[Background]) -> list[tuple[int, str]]:
    """Each run's exit code and stderr."""
    errors = [p.communicate(timeout=120)[1] for p in processes]
    return [(p.returncode, err) for p, err in zip(processes, errors, strict=True)]


def slow_revisions(project: Project, sleep: str) -> None:
    """Three revisions that each take about a second and leave a row behind."""
    project.add_revision(
        "s1",
        revision(
            "slow01",
            head_revision(),
            'op.create_table("side_effects", sa.Column("rev", sa.String(10)))\n'
            f"    {sleep}\n"
            "    op.execute(\"insert into side_effects values ('slow01')\")",
        ),
    )
    for rev, down in (("slow02", "slow01"), ("slow03", "slow02")):
        project.add_revision(
            rev,
            revision(
                rev,
                down,
                f"{sleep}\n    op.execute(\"insert into side_effects values ('{rev}')\")",
            ),
        )


@pytest.mark.postgres
def test_five_runs_on_one_postgres_database_apply_everything_once(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    slow_revisions(pg_project, 'op.execute("select pg_sleep(0.8)")')

    results = finish([popen(pg_project, "migrate", "--env=ci") for _ in range(5)])

    assert [code for code, _ in results] == [0] * 5, results
    rows = pg_fetch(pg_database.dsn, "select rev from side_effects order by rev")
    assert [row["rev"] for row in rows] == ["slow01", "slow02", "slow03"]
    appliers = [err for _, err in results if "applied slow01" in err]
    assert len(appliers) == 1
    waiting = [err for _, err in results if "waiting up to 60s for the migration lock" in err]
    assert any("application_name 'migrations'" in err for err in waiting)
    assert sum("nothing to do" in err for _, err in results) == 4


@pytest.mark.postgres
def test_create_index_concurrently_under_the_lock_neither_hangs_nor_breaks(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    pg_project.add_revision(
        "cic",
        revision(
            "cic001",
            head_revision(),
            'op.execute("select pg_sleep(0.5)")\n'
            "    with op.get_context().autocommit_block():\n"
            '        op.execute("CREATE INDEX CONCURRENTLY ix_users_username ON users (username)")',
            message="index usernames",
        ),
    )

    results = finish([popen(pg_project, "migrate", "--env=ci") for _ in range(5)])

    assert [code for code, _ in results] == [0] * 5, results
    index = pg_fetch(
        pg_database.dsn,
        (
            "select i.indisvalid from pg_index i join pg_class c on c.oid = i.indexrelid "
            "where c.relname = 'ix_users_username'"
        ),
    )
    assert [row["indisvalid"] for row in index] == [True]


def advisory_locks(dsn: str) -> list[int]:
    rows = pg_fetch(
        dsn,
        (
            f"select pid from pg_locks where locktype = 'advisory' and classid = {NAMESPACE} "
            "and database = (select oid from pg_database where datname = current_database())"
        ),
    )
    return [row["pid"] for row in rows]


@pytest.mark.postgres
def test_killing_the_lock_holder_frees_the_lock(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    pg_project.add_revision(
        "slow",
        revision(
            "slow01",
            head_revision(),
            'op.create_table("notes", sa.Column("id", sa.Integer))\n'
            "    import os\n"
            '    if os.environ.get("SLOW_REVISION"):\n'
            '        op.execute("select pg_sleep(60)")',
        ),
    )
    holder = popen(pg_project, "migrate", "--env=ci", SLOW_REVISION="1")
    wait_until(lambda: running_query(pg_database.dsn, "pg_sleep(60)"), "the run", process=holder)
    assert advisory_locks(pg_database.dsn)

    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    wait_until(lambda: not advisory_locks(pg_database.dsn), "the lock to go with its holder", 10)

    result = pg_project.invoke("migrate", "--env=ci", "--lock-wait=10")
    assert result.returncode == 0, result.stderr
    rows = pg_fetch(pg_database.dsn, "select version_num from alembic_version")
    assert [row["version_num"] for row in rows] == ["slow01"]


@pytest.mark.postgres
def test_a_held_lock_times_out_with_its_own_exit_code(
    pg_project: Project, pg_database: PgDatabase, pg_database_2: PgDatabase
) -> None:
    import asyncio

    import asyncpg

    async def scenario() -> tuple[subprocess.CompletedProcess[str], ...]:
        blocker = await asyncpg.connect(
            pg_database.dsn, server_settings={"application_name": "blocker"}
        )
        await blocker.execute(
            f"select pg_advisory_lock({NAMESPACE}, "
            "hashtext(current_database() || '.' || 'alembic_version'))"
        )
        try:
            pg_project.write_env("other", f"DATABASE_URL={pg_database_2.url}\n")
            waiting = await asyncio.to_thread(
                pg_project.invoke, "migrate", "--env=ci", "--lock-wait=1"
            )
            elsewhere = await asyncio.to_thread(
                pg_project.invoke, "migrate", "--env=other", "--lock-wait=1"
            )
            return waiting, elsewhere
        finally:
            await blocker.close()

    waiting, elsewhere = asyncio.run(scenario())

    assert waiting.returncode == 3, waiting.stderr
    assert "application_name 'blocker'" in waiting.stderr
    assert "gave up after 1s with nothing changed" in waiting.stderr
    assert "Traceback" not in waiting.stderr
    assert (
        pg_fetch(pg_database.dsn, "select tablename from pg_tables where schemaname='public'") == []
    )
    # another database on the same server does not wait on that lock
    assert elsewhere.returncode == 0, elsewhere.stderr


@pytest.mark.postgres
def test_a_signal_ends_the_wait_for_the_lock_with_nothing_changed(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    import asyncio

    import asyncpg

    async def scenario() -> tuple[Background, str]:
        blocker = await asyncpg.connect(pg_database.dsn)
        await blocker.execute(
            f"select pg_advisory_lock({NAMESPACE}, "
            "hashtext(current_database() || '.' || 'alembic_version'))"
        )
        run = popen(pg_project, "migrate", "--env=ci", "--lock-wait=60")
        try:
            waiting = (lambda: run.printed("waiting up to 60s"), "the wait for the lock")
            return run, await asyncio.to_thread(run.when, *waiting)
        finally:
            await blocker.close()

    run, err = asyncio.run(scenario())

    assert run.returncode == 130, err  # at once, not when the 60 s ran out
    assert (
        err.strip().splitlines()[-1] == "interrupted: the database is at base; no revision was run"
    )
    assert "Traceback" not in err
    assert (
        pg_fetch(pg_database.dsn, "select tablename from pg_tables where schemaname='public'") == []
    )


@contextmanager
def fake_server(hold: bool) -> Iterator[tuple[int, list[socket.socket]]]:
    """A port whose server accepts each connection and then closes it (a server turning
    runs away) or holds it without a word (a hung one); yields the port and what it took."""
    taken: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            with suppress(OSError):  # the listener closes at the end of the test
                while True:
                    client = listener.accept()[0]
                    taken.append(client)
                    if not hold:
                        client.close()

        threading.Thread(target=serve, daemon=True).start()
        yield listener.getsockname()[1], taken
    for client in taken:
        client.close()


def interrupted(
    project: Project,
    port: int,
    taken: list[Any],
    tries: int,
    *args: str,
    signum: int = signal.SIGINT,
) -> tuple[int | None, str]:
    """Run a task against the fake server, signal it (SIGINT) once it has tried ``tries``
    times to connect, and return its exit code and stderr."""
    url = f"postgresql+asyncpg://u@127.0.0.1:{port}/shop"
    project.write_env("down", f"DATABASE_URL={url}\nCONNECT_TIMEOUT=60\n")
    run = popen(project, *args, "--env=down")
    tried = f"{tries} tries to connect"  # then at once, not when the 60 s ran out
    err = run.when(lambda: len(taken) >= tries, tried, lambda: run.send_signal(signum))
    return run.returncode, err


@pytest.mark.parametrize(("hold", "tries", "flags"), [(False, 2, ["--wait=60"]), (True, 1, [])])
def test_a_signal_ends_the_wait_for_the_server(
    project: Project, hold: bool, tries: int, flags: list[str]
) -> None:
    """``--wait`` retries a server that turns the run away, and a hung server holds an
    attempt for CONNECT_TIMEOUT: Ctrl-C ends either at once."""
    with fake_server(hold) as (port, taken):
        code, err = interrupted(project, port, taken, tries, "migrate", *flags)

    assert code == 130, err
    # nothing to read back from a server that never answered: no "raise CONNECT_TIMEOUT"
    assert err.strip().splitlines()[-1] == "interrupted: no revision was run", err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("signum", "name"), [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")]
)
def test_a_task_that_only_reads_says_it_was_interrupted(
    project: Project, signum: int, name: str
) -> None:
    with fake_server(hold=True) as (port, taken):
        code, err = interrupted(project, port, taken, 1, "status", signum=signum)

    assert code == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"interrupted ({name})" and "Traceback" not in err


def test_sigterm_outside_a_run_gets_out_of_an_event_loop_as_ctrl_c_does() -> None:
    """A read task's SIGTERM raises Terminated wherever the main thread is: inside one of
    asyncio's callbacks, any other exception is logged and the loop waits on (a status of
    a server that never answers ran out CONNECT_TIMEOUT, now and then, instead of 143)."""
    from cli.edge import Terminated

    def handler() -> None:
        raise Terminated

    loop = asyncio.new_event_loop()
    nap = loop.create_task(asyncio.sleep(5))
    try:
        loop.call_later(0.01, handler)  # as a signal's handler runs in a callback
        with pytest.raises(Terminated):
            loop.run_until_complete(nap)
    finally:
        nap.cancel()
        with suppress(asyncio.CancelledError):
            loop.run_until_complete(nap)
        loop.close()


def test_a_signal_ends_the_wait_for_a_locked_sqlite_file(project: Project) -> None:
    project.migrated()
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))'
    project.add_revision("n", revision("notes1", head_revision(), body))
    blocker = sqlite3.connect(project.root / "var" / "dev.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    run = popen(project, "migrate", "--lock-wait=60")
    try:
        err = run.when(lambda: run.printed("waiting up to 60s"), "the wait for the file")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert run.returncode == 130, err  # at once, not when the 60 s ran out
    last = err.strip().splitlines()[-1]
    assert last == f"interrupted: the database is at {head_revision()}; no revision was run"
    with project.sqlite() as connection:
        tables = connection.execute("select name from sqlite_master where name = 'notes'")
        assert tables.fetchall() == []


@contextmanager
def writing(project: Project) -> Iterator[sqlite3.Connection]:
    """Another connection writing the dev database, holding the lock that bars readers too
    (a writer committing, or one whose changes outgrew its cache, in rollback-journal mode)."""
    writer = sqlite3.connect(project.root / "var" / "dev.sqlite3", isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        yield writer
    finally:
        if writer.in_transaction:
            writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.parametrize("task", ["migrate", "rollback", "reset"])
def test_a_file_a_writer_keeps_from_readers_is_locked_not_corrupt(
    project: Project, task: str
) -> None:
    """The check for a corrupt file read a writer's lock as corruption: the task said to
    restore a backup or reset, and reset moved the sound file aside and started a new one."""
    project.migrated()
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))'
    project.add_revision("n", revision("notes1", head_revision(), body))
    with writing(project):
        result = project.invoke(task, "--lock-wait=1")

    assert result.returncode == 3, result.stderr
    assert "waiting up to 1s for another connection to finish writing dev.sqlite3" in result.stderr
    assert result.stderr.endswith(
        "error: var/dev.sqlite3: another connection kept it locked for 1 s (the app writing a "
        "large transaction, or a migration?), so nothing was changed: retry when it is done, "
        "or wait longer with --lock-wait\n"
    )
    assert "corrupt" not in result.stderr
    assert list((project.root / "var" / "backups").glob("*.corrupt")) == []
    assert version(project) == [head_revision()]


def migrate_held(
    project: Project, held: AbstractContextManager[sqlite3.Connection], waiting: str, ending: str
) -> str:
    """``invoke migrate --lock-wait=60`` while another connection (``held``) keeps it waiting:
    once it prints ``waiting``, SIGINT stops it at once (exit 130, not when the 60 s ran
    out), or the other connection commits and the run goes on (exit 0). Its stderr."""
    with held as other:
        run = popen(project, "migrate", "--lock-wait=60")
        release = None if ending == "SIGINT" else lambda: other.execute("COMMIT")
        err = run.when(lambda: run.printed(waiting), f"the run {waiting}", release)
    assert run.returncode == (130 if ending == "SIGINT" else 0), err
    return err


@pytest.mark.parametrize("ending", ["the writer commits", "SIGINT"])
def test_a_run_waits_for_a_writer_that_keeps_readers_out(project: Project, ending: str) -> None:
    project.migrated()
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))'
    project.add_revision("n", revision("notes1", head_revision(), body))
    waiting = "waiting up to 60s for another connection to finish writing"
    err = migrate_held(project, writing(project), waiting, ending)

    if ending == "SIGINT":
        last = err.strip().splitlines()[-1]
        assert last == "interrupted while waiting for var/dev.sqlite3: nothing was changed"
        assert version(project) == [head_revision()]
    else:
        assert "applied notes1" in err
        assert version(project) == ["notes1"]


def test_a_read_of_a_file_a_writer_keeps_locked_says_what_to_do(project: Project) -> None:
    project.migrated()
    with writing(project):
        result = project.invoke("status")

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "another connection keeps the SQLite file locked (the app writing a large "
        "transaction, or a migration?): run it again when it is done"
    )


@contextmanager
def reading(project: Project) -> Iterator[sqlite3.Connection]:
    """The app in a read transaction on the dev database: SQLite commits a write only once
    every reader is done."""
    reader = sqlite3.connect(project.root / "var" / "dev.sqlite3", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("select count(*) from users").fetchall()
    try:
        yield reader
    finally:
        if reader.in_transaction:
            reader.execute("COMMIT")
        reader.close()


def two_pending(project: Project) -> None:
    for name, down in (("notes1", head_revision()), ("notes2", "notes1")):
        body = f'op.create_table("{name}", sa.Column("id", sa.Integer))'
        project.add_revision(name, revision(name, down, body))


def tables(project: Project) -> set[str]:
    with project.sqlite() as connection:
        return {row[0] for row in connection.execute("select name from sqlite_master")}


def test_readers_that_keep_a_run_from_committing_end_it_with_nothing_kept(
    project: Project,
) -> None:
    """The commit failed at once ("database is locked"), blamed on the last revision, with
    the advice to fix it."""
    project.migrated()
    two_pending(project)
    with reading(project):
        result = project.invoke("migrate", "--lock-wait=1")

    assert result.returncode == 3, result.stderr
    assert "waiting up to 1s for readers of this SQLite file to finish" in result.stderr
    assert result.stderr.strip().splitlines()[-2:] == [
        "error: readers kept this SQLite file busy for 1s (the app in a long read "
        "transaction?), so the run could not commit",
        f"the database is at {head_revision()}; notes1 of this run did not commit either; "
        "notes2 was rolled back; retry when they are done, or raise --lock-wait",
    ]
    assert version(project) == [head_revision()]
    assert not {"notes1", "notes2"} & tables(project)


@pytest.mark.parametrize("ending", ["the reader ends", "SIGINT"])
def test_a_run_waits_for_readers_to_commit(project: Project, ending: str) -> None:
    project.migrated()
    two_pending(project)
    waiting = "waiting up to 60s for readers of this SQLite file to finish"
    err = migrate_held(project, reading(project), waiting, ending)

    if ending == "SIGINT":
        assert err.strip().splitlines()[-1] == (
            f"interrupted: the database is at {head_revision()}; notes1 of this run did not "
            "commit either; notes2 was rolled back"
        )
        assert version(project) == [head_revision()]
        assert not {"notes1", "notes2"} & tables(project)
    else:
        assert version(project) == ["notes2"]
        assert {"notes1", "notes2"} <= tables(project)


def test_a_signal_during_a_revisions_python_step_rolls_it_back_before_it_commits(
    project: Project,
) -> None:
    """Nothing in a Python step can be cancelled: once it returned, the revision committed
    and the run said "migrated", exit 0, although it had been asked to stop."""
    project.migrated()
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))\n    __import__("time").sleep(2)'
    project.add_revision("n", revision("notes1", head_revision(), body))
    run = popen(project, "migrate")
    err = run.when(lambda: run.printed("applying notes1"), "the revision")

    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: the database is at {head_revision()}; notes1 was rolled back"
    )
    assert version(project) == [head_revision()]
    assert "notes" not in tables(project)


def test_a_second_signal_stops_a_revisions_long_python_step_at_once(project: Project) -> None:
    """A revision's own Python code runs on after the first signal, which only asks the
    run to stop at its next safe point: the task said nothing, as if it had not heard."""
    project.migrated()
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))\n    __import__("time").sleep(60)'
    project.add_revision("n", revision("notes1", head_revision(), body))
    run = popen(project, "migrate")
    notice = "  stopping at the next safe point (SIGINT again stops at once)"

    def twice() -> None:
        run.send_signal(signal.SIGINT)
        wait_until(lambda: run.printed(notice), "the notice", process=run)
        run.send_signal(signal.SIGINT)

    err = run.when(lambda: run.printed("applying notes1"), "the revision", twice)  # not 60 s

    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGINT)"
    assert version(project) == [head_revision()]
    assert "notes" not in tables(project)


def test_three_runs_on_one_sqlite_file_apply_everything_once(project: Project) -> None:
    slow_revisions(project, "__import__('time').sleep(0.5)")

    results = finish([popen(project, "migrate") for _ in range(3)])

    assert [code for code, _ in results] == [0] * 3, results
    with project.sqlite() as connection:
        rows = connection.execute("select rev from side_effects order by rev").fetchall()
    assert rows == [("slow01",), ("slow02",), ("slow03",)]
    assert sum("applied slow01" in err for _, err in results) == 1
    assert any("for another writer of this SQLite file" in err for _, err in results)


def test_a_locked_sqlite_file_times_out_with_its_own_exit_code(project: Project) -> None:
    project.migrated()
    project.add_revision(
        "n",
        revision(
            "notes1", head_revision(), 'op.create_table("notes", sa.Column("id", sa.Integer))'
        ),
    )
    blocker = sqlite3.connect(project.root / "var" / "dev.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        result = project.invoke("migrate", "--lock-wait=1")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert result.returncode == 3, result.stderr
    assert "kept this SQLite file locked for 1s; nothing was changed" in result.stderr
    assert "waiting up to 1s" in result.stderr
    assert project.ok("migrate").returncode == 0


def test_reset_waits_for_a_running_sqlite_migration_and_backs_up_what_it_applied(
    project: Project,
) -> None:
    """reset deleted the file under a running migration: that run went on writing into
    the deleted file and said "applied", and the backup missed what it applied."""
    project.migrated()
    slow_revisions(project, "__import__('time').sleep(1)")
    run = popen(project, "migrate")
    wait_until(lambda: run.printed("applying slow01"), "the migration", process=run)

    reset = project.invoke("reset")
    migrated = run.communicate(timeout=60)[1]

    assert run.returncode == 0 and "applied slow03" in migrated, migrated
    assert reset.returncode == 0, reset.stderr
    assert "for another writer of this SQLite file to finish" in reset.stderr
    backup = sorted((project.root / "var" / "backups").glob("dev-*"))[-1]  # reset's
    with closing(sqlite3.connect(backup)) as kept:  # it holds what the migration applied
        assert kept.execute("select version_num from alembic_version").fetchall() == [("slow03",)]
        assert kept.execute("select count(*) from side_effects").fetchone() == (3,)
    with project.sqlite() as connection:  # then reset dropped it all and migrated again
        assert connection.execute("select version_num from alembic_version").fetchall() == [
            ("slow03",)
        ]
        assert connection.execute("select count(*) from side_effects").fetchone() == (3,)


@pytest.mark.postgres
def test_reset_waits_for_a_running_postgres_migration(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """reset dropped the schema between the revisions of a running migration."""
    pg_project.migrated("ci")
    slow_revisions(pg_project, 'op.execute("select pg_sleep(1)")')
    run = popen(pg_project, "migrate", "--env=ci")
    wait_until(lambda: run.printed("applying slow01"), "the migration", process=run)

    reset = pg_project.invoke("reset", "--env=ci")
    migrated = run.communicate(timeout=60)[1]

    assert run.returncode == 0 and "applied slow03" in migrated, migrated
    assert reset.returncode == 0, reset.stderr
    assert "waiting up to 60s for the migration lock, held by pid" in reset.stderr
    rows = pg_fetch(pg_database.dsn, "select rev from side_effects order by rev")
    assert [row["rev"] for row in rows] == ["slow01", "slow02", "slow03"]
    directions = pg_fetch(pg_database.dsn, "select revision from migration_log order by id")
    assert [row["revision"] for row in directions] == [
        head_revision(),
        "slow01",
        "slow02",
        "slow03",
    ]  # the reset's own run, on an empty schema: each revision once


def test_a_signal_ends_resets_wait_for_a_running_migration_with_nothing_dropped(
    project: Project,
) -> None:
    project.migrated()
    with project.sqlite() as connection:
        connection.execute("insert into categories (name) values ('kept')")
    slow_revisions(project, "__import__('time').sleep(1)")
    run = popen(project, "migrate")
    wait_until(lambda: run.printed("applying slow01"), "the migration", process=run)
    reset = popen(project, "reset")
    wait_until(lambda: reset.printed("for another writer"), "the reset's wait", process=reset)

    os.kill(reset.pid, signal.SIGINT)
    said = reset.communicate(timeout=30)[1]

    assert reset.returncode == 130, said
    assert said.strip().splitlines()[-1] == (
        "interrupted: nothing was dropped: the database is as it was"
    )
    assert run.wait(timeout=60) == 0
    with project.sqlite() as connection:
        assert connection.execute("select name from categories").fetchall() == [("kept",)]
        assert connection.execute("select count(*) from side_effects").fetchone() == (3,)
