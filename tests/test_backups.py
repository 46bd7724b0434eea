"""Backups you can restore, a restore that cannot destroy, and SQLite runs that tell the truth.

Faults are real: bytes overwritten in a SQLite file, a tmpfs that fills up, a SIGINT.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from conftest import (
    PgDatabase,
    Project,
    head_revision,
    pg_execute,
    pg_fetch,
    popen,
    revision,
    tmpfs,
    version,
    wait_until,
)

HEAD = head_revision()
LONG_QUERY = (
    'op.execute("with recursive c(x) as (select 1 union all select x + 1 from c '
    'where x < 1000000000) select count(*) from c")'
)


def backups(project: Project) -> list[Path]:
    return sorted((project.root / "var" / "backups").glob("*"))


def pending_revision(project: Project, rev: str = "next01", down: str = HEAD) -> None:
    body = f'op.create_table("{rev}", sa.Column("id", sa.Integer))'
    project.add_revision(rev, revision(rev, down, body, message=f"add {rev}"))


def corrupt(path: Path) -> None:
    """Overwrite the second page (a table's b-tree) with garbage, as a bad disk would."""
    with path.open("r+b") as file:
        file.seek(4096)
        file.write(b"\xa5" * 4096)


def grow(project: Project, kilobytes: int, relative: str = "var/dev.sqlite3") -> None:
    """Add about ``kilobytes`` of data to the database (the dev one by default)."""
    with project.sqlite(relative) as db:
        db.execute("create table if not exists ballast (data blob)")
        db.executemany("insert into ballast values (randomblob(1024))", [()] * kilobytes)
        db.commit()


def test_a_corrupt_sqlite_file_is_refused_before_anything_and_not_backed_up(
    project: Project,
) -> None:
    project.migrated()
    pending_revision(project)
    corrupt(project.root / "var" / "dev.sqlite3")

    for task in ("migrate", "rollback"):
        error = project.fails(task)
        assert "var/dev.sqlite3 fails SQLite's quick_check" in error
        assert "nothing was run and no backup was made" in error
        assert "invoke restore --env=dev" in error
    assert backups(project) == []
    for task in ("status", "history"):  # tasks that only read say what to do too
        error = project.fails(task)
        assert "malformed" in error or "not a database" in error
        assert error.endswith(
            "\nthe SQLite file is corrupt: put a good backup back with `invoke restore --env=dev`"
            ", or, with none, start it over with `invoke reset --env=dev` (which keeps the "
            "corrupt file)\n"
        )


def test_reset_starts_a_corrupt_file_with_no_backup_over_and_keeps_it(project: Project) -> None:
    project.migrated()
    live = project.root / "var" / "dev.sqlite3"
    corrupt(live)
    damaged = live.read_bytes()
    assert "no backup to restore for dev" in project.fails("restore", "--yes")

    result = project.ok("reset")

    [kept] = (project.root / "var" / "backups").glob("dev-*.corrupt")
    assert f"the corrupt database file was moved to var/backups/{kept.name}\n" in result.stderr
    assert kept.read_bytes() == damaged
    assert version(project) == [HEAD]
    project.write_env("safe", "DATABASE_URL=sqlite:///var/dev.sqlite3\nPROTECTED=true\n")
    corrupt(live)
    assert "reset drops every table and never runs there" in project.fails("reset", "--env=safe")
    assert len(list((project.root / "var" / "backups").glob("dev-*.corrupt"))) == 1


def test_a_corrupt_file_set_aside_keeps_the_rows_its_write_ahead_log_holds(
    project: Project,
) -> None:
    """An app in WAL mode that was killed leaves its last commits in dev.sqlite3-wal. A
    corrupt file moved aside without that log lost them: the kept copy is what a user
    salvages rows from."""
    project.migrated()
    live = project.root / "var" / "dev.sqlite3"
    app = (
        "import sqlite3, time\n"
        f"db = sqlite3.connect({str(live)!r})\n"
        "db.execute('pragma journal_mode=wal'); db.execute('pragma wal_autocheckpoint=0')\n"
        "db.execute('create table orders (id integer primary key, note text)')\n"
        "db.executemany('insert into orders (note) values (?)', [('paid',)] * 50)\n"
        "db.commit(); print('committed', flush=True); time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", app], stdout=subprocess.PIPE) as running:
        assert running.stdout is not None and running.stdout.readline() == b"committed\n"
        running.kill()  # as a crash would: no checkpoint, the commits only in the log
    assert Path(f"{live}-wal").stat().st_size > 0
    corrupt(live)

    result = project.ok("reset")

    [kept] = (project.root / "var" / "backups").glob("dev-*.corrupt")
    assert f"moved to var/backups/{kept.name}" in result.stderr
    with closing(sqlite3.connect(kept)) as salvaged:
        assert salvaged.execute("select count(*) from orders").fetchone() == (50,)
    assert not Path(f"{live}-wal").exists() and not Path(f"{live}-shm").exists()
    assert version(project) == [HEAD]
    with project.sqlite() as db:
        assert db.execute("select name from sqlite_master where name = 'orders'").fetchall() == []


def linked(project: Project) -> tuple[Path, Path]:
    """The dev database as a link, var/dev.sqlite3, to a file in another folder; migrated."""
    real = project.root / "data" / "shop.sqlite3"
    real.parent.mkdir()
    live = project.root / "var" / "dev.sqlite3"
    live.parent.mkdir(exist_ok=True)
    live.symlink_to(real)
    project.migrated()
    return live, real


def test_a_corrupt_file_behind_a_link_is_set_aside_and_the_link_kept(project: Project) -> None:
    """var/dev.sqlite3 may be a link to a file on a volume. reset and restore moved the
    link into the backups as "the corrupt database file", left the corrupt file and its
    journal where they were, and put a new file in the link's place."""
    live, real = linked(project)
    pending_revision(project)
    project.migrated()  # a backup at HEAD for the restore below, the database at next01
    corrupt(real)
    damaged = real.read_bytes()
    Path(f"{real}-journal").write_bytes(b"\xa5" * 512)

    result = project.ok("reset")

    [kept] = (project.root / "var" / "backups").glob("dev-*.corrupt")
    assert f"the corrupt database file was moved to var/backups/{kept.name}\n" in result.stderr
    assert not kept.is_symlink() and kept.read_bytes() == damaged
    assert Path(f"{kept}-journal").read_bytes() == b"\xa5" * 512
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # as every backup
    assert not Path(f"{real}-journal").exists()
    assert live.is_symlink() and live.resolve() == real.resolve()
    assert version(project, "data/shop.sqlite3") == ["next01"]

    corrupt(real)
    damaged = real.read_bytes()
    restored = project.ok("restore", "--file=" + str(backups(project)[0])).stderr

    again = project.root / restored.split("kept the database it replaced as ")[1].split()[0]
    assert again.suffix == ".corrupt" and not again.is_symlink()
    assert again.read_bytes() == damaged
    assert live.is_symlink() and version(project, "data/shop.sqlite3") == [HEAD]


def test_a_corrupt_file_on_another_disk_than_the_backups_is_copied_aside_whole(
    project: Project,
) -> None:
    """Behind a link the file may be on another disk than var/backups, where it cannot be
    renamed to: it is copied, and removed only once the copy is whole. A copy that does not
    fit is removed, and the file stays as it was."""
    live, real = linked(project)
    grow(project, 200)
    corrupt(real)
    damaged = real.read_bytes()
    with tmpfs(project.root / "var" / "backups", "64k") as folder:
        said = project.fails("reset")

        assert (
            "error: cannot keep the corrupt var/dev.sqlite3 in var/backups (No space left on "
            "device), so nothing was changed" in said
        )
        assert list(folder.iterdir()) == []
        assert live.is_symlink() and real.read_bytes() == damaged
    with tmpfs(project.root / "var" / "backups", "4m") as folder:
        project.ok("reset")

        [kept] = folder.glob("dev-*.corrupt")
        assert kept.read_bytes() == damaged
        assert live.is_symlink() and version(project, "data/shop.sqlite3") == [HEAD]


def test_a_backup_of_a_database_in_wal_mode_is_one_file(project: Project) -> None:
    """The app may put its database in WAL mode; a copy of it was in WAL mode too, and
    checking it left a -wal and a -shm beside it in var/backups that pruning never removed."""
    project.migrated()
    with project.sqlite() as db:
        assert db.execute("pragma journal_mode=wal").fetchone() == ("wal",)
    pending_revision(project)
    project.ok("migrate", "--env=dev")
    project.ok("rollback", "--env=dev")  # a second backup, at next01

    made = backups(project)
    assert [p.suffix for p in made] == [".sqlite3", ".sqlite3"], made
    for backup in made:
        with closing(sqlite3.connect(backup)) as copy:
            assert copy.execute("pragma journal_mode").fetchone() == ("delete",)
    project.ok("restore", f"--file={made[-1].relative_to(project.root)}", "--yes")
    assert version(project) == ["next01"]
    with project.sqlite() as db:  # the live database keeps the app's mode
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
        assert db.execute("pragma quick_check").fetchone() == ("ok",)


def test_a_backup_that_fills_the_disk_stops_the_run_and_keeps_the_good_ones(
    project: Project,
) -> None:
    with tmpfs(project.root / "var" / "backups", "160k"):
        project.migrated()
        pending_revision(project, "next01")
        project.migrated()  # backs up a ~60 kB database: fits
        [good] = backups(project)
        grow(project, 200)  # the next copy cannot fit
        pending_revision(project, "next02", "next01")

        error = project.fails("migrate")

        assert "the backup to var/backups/dev-" in error
        assert "database or disk is full" in error
        assert "so nothing was changed" in error
        assert backups(project) == [good]  # no partial file; the good one kept
        assert version(project) == ["next01"]


def test_restore_refuses_what_is_not_a_backup_and_the_live_file(project: Project) -> None:
    project.migrated()
    (project.root / "notes.txt").write_text("not a database\n")
    empty = project.root / "var" / "backups" / "dev-empty.sqlite3"
    empty.parent.mkdir(parents=True)
    empty.touch()

    error = project.fails("restore", "--file=notes.txt")
    assert "notes.txt is not a usable backup (file is not a database)" in error
    error = project.fails("restore", f"--file={empty}")
    assert "is not a usable backup (it has no alembic_version table)" in error
    error = project.fails("restore", "--file=var/dev.sqlite3")
    assert "var/dev.sqlite3 is the live database itself" in error
    assert version(project) == [HEAD]


def test_a_newest_backup_that_is_unusable_names_the_one_before_it(project: Project) -> None:
    """restore takes the newest backup by itself; one that a bad disk spoiled ended it with
    "not a usable backup", and no word of the backups before it."""
    project.migrated()
    pending_revision(project)
    project.migrated()  # a backup at HEAD
    pending_revision(project, "next02", "next01")
    project.migrated()  # a backup at next01, the newest
    older, newest = backups(project)
    newest.write_bytes(b"\xa5" * 4096)

    error = project.fails("restore")

    assert error.endswith(
        f"is not a usable backup (file is not a database); nothing was restored; the one "
        f"before it: `invoke restore --env=dev --file=var/backups/{older.name}`\n"
    )
    assert version(project) == ["next02"]
    project.ok("restore", f"--file=var/backups/{older.name}")
    assert version(project) == [HEAD]


def test_restore_on_postgresql_points_at_pg_restore_and_touches_nothing(
    project: Project, pg_database: PgDatabase
) -> None:
    project.write_env("pg", f"DATABASE_URL={pg_database.url}\n")
    project.ok("migrate", "--env=pg")

    error = project.fails("restore", "--env=pg")

    assert error.endswith("error: pg is PostgreSQL: restore a pg_dump backup with pg_restore\n")
    assert pg_fetch(pg_database.dsn, "select version_num from alembic_version") == [(HEAD,)]


def test_restore_of_a_file_that_is_not_there_names_it(project: Project) -> None:
    """A mistyped --file was answered "no backup to restore for dev", as if there were
    none at all."""
    project.migrated()
    pending_revision(project)
    project.ok("migrate")  # a backup exists now

    for given, what in (("var/backups/dev-typo.sqlite3", "does not exist"), ("var", "is a folder")):
        result = project.invoke("restore", f"--file={given}")
        assert result.returncode == 2, result.stderr
        assert f"error: {given} {what}" in result.stderr
        assert "nothing was restored; the backups are in var/backups" in result.stderr
    assert version(project) == ["next01"]


def test_a_restore_keeps_what_it_replaces_so_it_can_be_undone(project: Project) -> None:
    project.migrated()
    pending_revision(project)
    project.migrated()  # the backup holds the database at HEAD

    restored = project.ok("restore").stderr

    assert version(project) == [HEAD]
    kept = restored.split("kept the database it replaced as ")[1].split()[0]
    project.ok("restore", f"--file={kept}")
    assert version(project) == ["next01"]


def test_a_restore_puts_a_backup_over_a_file_corrupt_from_its_first_byte(
    project: Project,
) -> None:
    project.migrated()
    pending_revision(project)
    project.migrated()  # the backup holds the database at HEAD
    live = project.root / "var" / "dev.sqlite3"
    damaged = b"\xa5" * 4096 + live.read_bytes()[4096:]  # the header too: not a database now
    live.write_bytes(damaged)
    (project.root / "var" / "dev.sqlite3-journal").write_bytes(b"\xa5" * 512)  # and its journal

    restored = project.ok("restore").stderr

    assert version(project) == [HEAD]
    kept = project.root / restored.split("kept the database it replaced as ")[1].split()[0]
    assert kept.suffix == ".corrupt" and kept.read_bytes() == damaged
    assert Path(f"{kept}-journal").read_bytes() == b"\xa5" * 512  # moved with it, not replayed
    assert not (project.root / "var" / "dev.sqlite3-journal").exists()
    project.ok("migrate")
    assert version(project) == ["next01"]


@pytest.mark.parametrize("linked", [False, True], ids=["file", "link"])
def test_a_restore_that_fills_the_disk_leaves_the_database_as_it_was(
    project: Project, linked: bool
) -> None:
    """Also where the environment names a link to the file: what a failed copy leaves is
    removed where SQLite wrote it, beside the file the link names, and the link stays."""
    live = project.root / "data" / "shop.sqlite3"
    named = project.root / "var" / "small.sqlite3" if linked else live
    project.write_env("small", f"DATABASE_URL=sqlite:///{named}\n")
    if linked:
        named.parent.mkdir(exist_ok=True)
        named.symlink_to(live)
    with tmpfs(project.root / "data", "320k"):
        project.ok("migrate", "--env=small")
        grow(project, 160, "data/shop.sqlite3")  # room for it, not for it and its journal
        pending_revision(project)
        project.ok("migrate", "--env=small")  # the backup holds it at HEAD, in var/backups
        before = live.read_bytes()

        error = project.fails("restore", "--env=small")

        assert "database or disk is full" in error and "Traceback" not in error
        assert "nothing was restored: the database is as it was" in error
        assert live.read_bytes() == before
        assert version(project, "data/shop.sqlite3") == ["next01"]

        live.write_bytes(b"\xa5" * 4096)  # corrupt: to be moved aside to var/backups
        disk = os.statvfs(live.parent)
        room = disk.f_bavail * disk.f_frsize - 64 * 1024  # not enough for the backup
        (live.parent / "ballast").write_bytes(b"\0" * room)
        error = project.fails("restore", "--env=small")

        assert "database or disk is full" in error and "Traceback" not in error
        assert "nothing was restored and there is no database file (the corrupt one is in " in error
        assert not live.exists() and not Path(f"{live}-journal").exists()
        assert named.is_symlink() == linked
        [corrupt] = (project.root / "var" / "backups").glob("small-*.corrupt")
        assert corrupt.read_bytes() == b"\xa5" * 4096


def test_reset_runs_the_environment_guard(project: Project) -> None:
    project.migrated()
    project.write_env("qa", "DATABASE_URL=sqlite:///var/dev.sqlite3\n")

    result = project.invoke("reset", "--env=qa")

    assert result.returncode == 4, result.stderr
    assert "last migrated as 'dev', not 'qa'" in result.stderr
    assert backups(project) == []
    assert version(project) == [HEAD]


@pytest.mark.postgres
def test_reset_dumps_before_it_drops(project: Project, pg_database: PgDatabase) -> None:
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.fail("pg_dump and pg_restore come with the PostgreSQL server")
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\nBACKUP=pg_dump\n")
    project.migrated("ci")
    pg_execute(pg_database.dsn, "insert into categories (name) values ('kept in the dump')")

    result = project.ok("reset", "--env=ci")

    assert "with pg_dump" in result.stderr
    assert len(backups(project)) == 2  # migrate's, and reset's (none after the drop)
    dump = backups(project)[-1]
    listed = subprocess.run(
        ["pg_restore", "--data-only", "--table=categories", "--file=-", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "kept in the dump" in listed.stdout


SLOW_INSERT = (
    'op.execute("create table slow (x integer)")\n    op.execute("insert into slow with '
    "recursive c(x) as (select 1 union all select x + 1 from c where x < 1000000000) "
    'select x from c")'
)


@pytest.mark.parametrize(
    ("body", "kept", "said"),
    [
        (LONG_QUERY, "fast01", "this run kept fast01"),
        # an interrupted write makes SQLite roll back the whole transaction, savepoints and
        # all: the run's earlier revision goes too, and the task must not say it was kept
        (SLOW_INSERT, HEAD, "fast01 of this run did not commit either"),
    ],
    ids=["reading", "writing"],
)
def test_sigint_on_sqlite_says_what_the_run_kept(
    project: Project, body: str, kept: str, said: str
) -> None:
    project.migrated()
    pending_revision(project, "fast01")
    project.add_revision("slow", revision("slow01", "fast01", body, message="slow one"))
    run = popen(project, "migrate")
    wait_until(lambda: run.printed("applying slow01"), "the slow revision", process=run)
    if body == SLOW_INSERT:  # the INSERT itself under way: it has spilled pages to the file
        live = project.root / "var" / "dev.sqlite3"
        wait_until(lambda: live.stat().st_size > 2**21, "the insert", process=run)

    os.kill(run.pid, signal.SIGINT)
    rest = run.communicate(timeout=30)[1]

    assert run.returncode == 130, rest
    assert rest.strip().splitlines()[-1] == (
        f"interrupted: the database is at {kept}; {said}; slow01 was rolled back"
    )
    assert ("applied fast01" in rest) == (kept == "fast01") and "applied slow01" not in rest
    assert version(project) == [kept]


def test_a_signal_during_the_backup_before_a_migrate_ends_it_at_once(project: Project) -> None:
    """SIGTERM while a large database was backed up was only noted: the copy went on to its
    end, and then the run stopped. Now the copy stops, and leaves no part of a backup."""
    project.migrated()
    with project.sqlite() as db:  # about 300 MB: its copy takes a while
        db.execute(
            "create table big as with recursive c(x) as (select 1 union all select x + 1 "
            "from c where x < 800000) select randomblob(350) b from c"
        )
    pending_revision(project)
    run = popen(project, "migrate")
    wait_until(lambda: backups(project), "the backup to start", process=run)

    os.kill(run.pid, signal.SIGTERM)
    rest = run.communicate(timeout=30)[1]

    assert run.returncode == 143, rest
    last = rest.strip().splitlines()[-1]
    assert last == f"interrupted: the database is at {HEAD}; no revision was run", rest
    assert backups(project) == []
    assert version(project) == [HEAD]


def test_a_signal_during_a_restore_leaves_the_database_as_it_was_and_says_so(
    project: Project,
) -> None:
    """SIGTERM while a large backup was copied in: the copy finished, the task said only
    "interrupted (SIGTERM)", and never where it had kept the database it replaced."""
    project.migrated()
    big = project.root / "var" / "backups" / "dev-20990101-000000-000000.sqlite3"
    big.parent.mkdir(mode=0o700)
    shutil.copy(project.root / "var" / "dev.sqlite3", big)
    with closing(sqlite3.connect(big)) as db:  # about 140 MB: its copy takes a while
        db.execute(
            "create table big as with recursive c(x) as (select 1 union all select x + 1 "
            "from c where x < 400000) select randomblob(350) b from c"
        )
        db.commit()
    run = popen(project, "restore", f"--file={big}")
    wait_until(lambda: len(backups(project)) == 2, "the replaced database kept", process=run)

    os.kill(run.pid, signal.SIGTERM)
    rest = run.communicate(timeout=30)[1]

    assert run.returncode == 143, rest
    assert rest.strip().splitlines()[-1] == (
        "interrupted: nothing was restored: the database is as it was"
    )
    with project.sqlite() as connection:
        names = {row[0] for row in connection.execute("select name from sqlite_master")}
    assert "big" not in names and "purchases" in names
    project.ok("restore", f"--file={big}")  # a restore let finish puts it in place
    with project.sqlite() as connection:
        assert connection.execute("select count(*) from big").fetchone() == (400000,)


@pytest.mark.parametrize("holder", ["app", "app committing", "migration"])
def test_a_restore_over_a_file_another_keeps_locked_gives_up_and_says_so(
    project: Project, holder: str
) -> None:
    """It waited without end, and without a word, while the app held a write lock; and it
    must never put a backup in place under a running migration. A writer that keeps
    readers out too (committing) made the file look corrupt: it was moved aside, and the
    backup put in place under the app."""
    project.migrated()
    pending_revision(project)
    project.migrated()  # backs the database at HEAD up
    [backup] = backups(project)
    app = sqlite3.connect(project.root / "var" / "dev.sqlite3", isolation_level=None)
    migration = None
    try:
        if holder.startswith("app"):  # the app, in a long write transaction
            app.execute("begin exclusive" if holder == "app committing" else "begin immediate")
        else:
            sleepy = (
                'op.create_table("sleepy", sa.Column("id", sa.Integer))\n'
                '    __import__("time").sleep(4)'
            )
            project.add_revision("sleepy", revision("sleepy1", "next01", sleepy))
            migration = popen(project, "migrate")
            wait_until(lambda: migration.printed("applying sleepy1"), "the run", process=migration)

        result = project.invoke("restore", f"--file={backup}", "--lock-wait=1")
    finally:
        app.close()

    assert result.returncode == 3, result.stderr
    assert result.stderr.endswith(
        "error: var/dev.sqlite3: another connection kept it locked for 1 s (a migration, or "
        "the app in a long transaction?), so nothing was restored: the database is as it was; "
        "stop it, or wait longer with --lock-wait\n"
    )
    assert list((project.root / "var" / "backups").glob("*.corrupt")) == []
    if migration is not None:
        assert migration.wait(timeout=30) == 0
        assert version(project) == ["sleepy1"]
    else:
        assert version(project) == ["next01"]
    project.ok("restore", f"--file={backup}")
    assert version(project) == [HEAD]


def test_a_full_disk_at_commit_leaves_no_false_applied_line(project: Project) -> None:
    with tmpfs(project.root / "small", "192k") as small:
        project.write_env("tight", f"DATABASE_URL=sqlite:///{small}/shop.sqlite3\n")
        project.migrated("tight")
        pending_revision(project, "fill01")
        fill = (
            'op.execute("create table big as select randomblob(1024) b from '
            "(with recursive c(x) as (select 1 union all select x + 1 from c where x < 400) "
            'select x from c)")'
        )
        project.add_revision("fill02", revision("fill02", "fill01", fill, message="too big"))

        error = project.fails("migrate", "--env=tight")

        with closing(sqlite3.connect(small / "shop.sqlite3")) as db:
            [(at,)] = db.execute("select version_num from alembic_version").fetchall()
        assert "failed: the disk is full (OperationalError: database or disk is full)" in error
        assert f"the database is at {at};" in error
        assert error.endswith("; free some space and run the task again\n")  # not "fix it"
        lineage = {HEAD: [HEAD], "fill01": [HEAD, "fill01"]}[at]
        printed = [rev for rev in ("fill01", "fill02") if f"applied {rev} " in error]
        assert set(printed) <= set(lineage)  # nothing printed as applied that is not there
        if at == HEAD:
            assert "fill01 of this run did not commit either" in error


def test_a_full_disk_inside_a_revision_is_named_whichever_statement_it_stops(
    project: Project,
) -> None:
    """SQLite may roll a whole transaction back on a full disk. The run then said "no such
    savepoint: revision" (its own clean-up failing) and told the user to fix the revision.
    Each free space below stops the revision at another statement (seen: 8 to 16 KB)."""
    pending_revision(project, "fill01")
    with tmpfs(project.root / "small", "256k") as small:
        project.write_env("tight", f"DATABASE_URL=sqlite:///{small}/shop.sqlite3\nBACKUP_KEEP=0\n")
        failed = 0
        for free_kb in (4, 8, 12, 16, 20):
            (small / "shop.sqlite3").unlink(missing_ok=True)
            (small / "filler").unlink(missing_ok=True)
            project.migrated("tight", to=HEAD)
            available = shutil.disk_usage(small).free // 1024
            (small / "filler").write_bytes(b"\0" * (available - free_kb) * 1024)

            result = project.invoke("migrate", "--env=tight")

            with closing(sqlite3.connect(small / "shop.sqlite3")) as db:
                [(at,)] = db.execute("select version_num from alembic_version").fetchall()
            if result.returncode == 0:
                assert at == "fill01"
                continue
            failed += 1
            assert at == HEAD, result.stderr
            assert "failed: the disk is full (OperationalError: database or disk is full)" in (
                result.stderr
            )
            assert f"the database is at {HEAD}; fill01 was rolled back; free some space" in (
                result.stderr
            )
        assert failed  # the disk did fill up


def test_a_read_only_sqlite_file_is_refused_before_anything(project: Project) -> None:
    """A database on a file system mounted read-only: refused before a backup or a
    revision, instead of failing inside the revision with "fix it"; and by seed, which said
    only SQLite's "attempt to write a readonly database"."""
    with tmpfs(project.root / "ro", "1m") as disk:
        project.write_env("ro", f"DATABASE_URL=sqlite:///{disk}/shop.sqlite3\n")
        project.migrated("ro")
        pending_revision(project, "next01")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

        error = project.fails("migrate", "--env=ro")

        assert error.endswith(
            "error: ro/shop.sqlite3 is read-only (a read-only file system, or its "
            "permissions), and SQLite must write the database: nothing was run; make it "
            "writable and run the task again\n"
        )
        assert not backups(project)
        project.write_env("new", f"DATABASE_URL=sqlite:///{disk}/new.sqlite3\n")
        assert project.fails("migrate", "--env=new").endswith(
            "error: ro is read-only (a read-only file system, or its permissions), and SQLite "
            "must write its journal (and a new database) in that folder: nothing was run; "
            "make it writable and run the task again\n"
        )
        assert project.fails("seed", "--env=ro").endswith(
            "error: ro/shop.sqlite3 is read-only (a read-only file system, or its "
            "permissions), and SQLite must write the database: nothing was run; make it "
            "writable and run the task again\n"
        )
        assert "pending: 1" in project.ok("status", "--env=ro").stdout  # read-only tasks work
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        project.ok("migrate", "--env=ro")
        with closing(sqlite3.connect(disk / "shop.sqlite3")) as db:
            assert db.execute("select version_num from alembic_version").fetchall() == [("next01",)]


@pytest.mark.parametrize("name", ["shop 50%", "shop #2?"])
def test_a_project_in_a_folder_named_with_url_syntax_checks_and_restores_its_own_file(
    project: Project, tmp_path: Path, name: str
) -> None:
    """In a folder named ``shop 50%``, Alembic's ``%(here)s`` broke every task (a
    configparser traceback); in one named ``shop #2?``, the read-only checks opened, and
    made, another file (a ``file:`` URI's path ends at ``#`` or ``?``): a corrupt database
    passed its check, and restore found no version table in a sound backup."""
    place = tmp_path / name
    place.mkdir()
    shutil.copytree(project.root, place / "bot")
    shop = Project(place / "bot", project.environ, project.launcher)

    migrated = shop.ok("migrate")
    pending_revision(shop)
    shop.ok("migrate")  # backs the database at HEAD up
    shop.ok("restore")

    assert f"[dev] sqlite:///{place}/bot/var/dev.sqlite3\n" in migrated.stderr
    assert version(shop) == [HEAD]
    corrupt(shop.root / "var" / "dev.sqlite3")
    assert "fails SQLite's quick_check" in shop.fails("migrate")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (tmp_path / "project", place)
    )
