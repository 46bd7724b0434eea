"""Protected environments, confirmations, reset, backups and restore, env file permissions."""

from __future__ import annotations

import os
import pty
import re
import signal
import sqlite3
import stat
import subprocess
from contextlib import closing

import pytest
from conftest import (
    Project,
    add_good_then_bad,
    add_notes,
    at_the_prompt,
    head_revision,
    log_rows,
    migrated_shop,
    revision,
    tables,
    version,
)

SAFE = "DATABASE_URL=sqlite:///var/safe.sqlite3\nPROTECTED=true\n"


def on_terminal(project: Project, typed: str | None, *args: str) -> tuple[int, str]:
    """Run a task with a terminal as stdin, typing ``typed`` (None: Ctrl-D, the end of
    input); returns exit code and stderr."""
    controller, terminal = pty.openpty()
    process = project.start(
        *args, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.close(terminal)
    os.write(controller, b"\x04" if typed is None else typed.encode() + b"\n")
    _, err = process.communicate(timeout=60)
    os.close(controller)
    return process.returncode, err


def test_protected_migrate_without_a_terminal_needs_yes(project: Project) -> None:
    project.write_env("safe", SAFE)

    refused = project.invoke("migrate", "--env=safe")

    assert refused.returncode == 4, refused.stderr
    assert "plan: 1 to apply" in refused.stderr
    assert f"  {head_revision()}  create shop tables" in refused.stderr
    assert "no terminal to confirm on: pass --yes" in refused.stderr
    assert not (project.root / "var" / "safe.sqlite3").exists()  # asked before it is made

    project.ok("migrate", "--env=safe", "--yes")
    assert version(project, "var/safe.sqlite3") == [head_revision()]


def test_protected_migrate_asks_for_the_typed_name(project: Project) -> None:
    project.write_env("safe", SAFE)

    code, err = on_terminal(project, "prod", "migrate", "--env=safe")
    assert code == 4 and "the name did not match; nothing was changed" in err
    code, err = on_terminal(project, None, "migrate", "--env=safe")
    assert code == 4 and "no name was typed (end of input); nothing was changed" in err

    code, err = on_terminal(project, "safe", "migrate", "--env=safe")
    assert code == 0, err
    assert "Type its name to migrate" in err
    assert version(project, "var/safe.sqlite3") == [head_revision()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_the_prompt_ends_the_task_with_nothing_changed(
    project: Project, signum: signal.Signals
) -> None:
    """The prompt waited under the migration lock (on PostgreSQL it still does). SIGTERM
    there was only noted, so the task went on waiting (holding the lock) until a name was
    typed; Ctrl-C read as a name that "did not match"."""
    project.write_env("safe", SAFE)
    with at_the_prompt(project, "migrate", "--env=safe") as (process, _, said):
        process.send_signal(signum)
        said += process.communicate(timeout=30)[1]  # it ends: it does not wait on
        code = process.returncode

    assert code == 128 + signum, said
    assert said.decode().endswith("migrate: \ninterrupted at the prompt: nothing was changed\n")
    assert not (project.root / "var" / "safe.sqlite3").exists()


def test_the_app_writes_while_a_protected_sqlite_migrate_asks(project: Project) -> None:
    """The prompt waited inside the run's write transaction, so the app's writes failed
    ("database is locked") for as long as a person took to read the plan. It is asked
    before the lock now; a plan that another run carried out meanwhile is not run twice."""
    project.write_env("safe", SAFE)
    project.migrated("safe")
    add_notes(project)
    with at_the_prompt(project, "migrate", "--env=safe") as (process, controller, said):
        with closing(sqlite3.connect(project.root / "var" / "safe.sqlite3", timeout=1)) as app:
            app.execute("insert into users (telegram_id, username) values (42, 'ann')")
            app.commit()  # "database is locked" while the prompt held the write lock
        project.ok("migrate", "--env=safe", "--yes")  # another run applies notes1 meanwhile
        os.write(controller, b"safe\n")
        said += process.communicate(timeout=60)[1]

    assert process.returncode == 0, said
    assert said.decode().endswith("safe: nothing to do, the database is already there\n")
    assert version(project, "var/safe.sqlite3") == ["notes1"]
    rows = log_rows(project, "var/safe.sqlite3")
    assert [row[:2] for row in rows].count(("notes1", "up")) == 1
    with project.sqlite("var/safe.sqlite3") as db:
        assert db.execute("select username from users").fetchall() == [("ann",)]


def test_a_plan_that_changed_while_it_was_confirmed_is_refused(project: Project) -> None:
    """Confirmed: apply notes1. Meanwhile another run rolled the database back, so the run
    would apply the shop's tables again too, which no one confirmed."""
    project.write_env("safe", SAFE)
    project.migrated("safe")
    add_notes(project)
    with at_the_prompt(project, "migrate", "--env=safe") as (process, controller, said):
        project.ok("rollback", "--env=safe", "--yes")  # another run, meanwhile
        os.write(controller, b"safe\n")
        said += process.communicate(timeout=60)[1]

    assert process.returncode == 4, said
    assert said.decode().endswith(
        "error: the plan changed while it was being confirmed (another run changed the "
        f"database meanwhile: the plan was notes1, and is now {head_revision()}, notes1): "
        "nothing was changed; run the task again to see the new plan\n"
    )
    assert version(project, "var/safe.sqlite3") == []


def test_protected_migrate_with_nothing_to_do_asks_nothing(project: Project) -> None:
    project.write_env("safe", SAFE)
    project.migrated("safe")
    result = project.ok("migrate", "--env=safe")
    assert "plan: nothing to apply" in result.stderr


def test_the_plan_marks_revisions_outside_a_transaction(project: Project) -> None:
    project.write_env("safe", SAFE)
    project.migrated("safe")
    project.add_revision(
        "cic",
        revision(
            "cic001",
            head_revision(),
            "with op.get_context().autocommit_block():\n        pass",
            message="index concurrently",
        ),
    )

    refused = project.invoke("migrate", "--env=safe")
    status = project.ok("status", "--env=safe").stdout

    assert "cic001  index concurrently  [non-transactional: autocommit_block]" in refused.stderr
    assert "cic001  index concurrently  [non-transactional: autocommit_block]" in status


def test_protected_rollback_needs_yes_and_the_typed_name(project: Project) -> None:
    project.write_env("safe", SAFE)
    project.migrated("safe")

    refused = project.invoke("rollback", "--env=safe")
    assert refused.returncode == 4 and "to roll back it, pass --yes" in refused.stderr

    code, err = on_terminal(project, "nope", "rollback", "--env=safe", "--yes")
    assert code == 4 and "did not match" in err
    assert version(project, "var/safe.sqlite3") == [head_revision()]

    code, err = on_terminal(project, "safe", "rollback", "--env=safe", "--yes")
    assert code == 0, err
    assert version(project, "var/safe.sqlite3") == []


def test_a_protected_rollback_with_nothing_to_undo_asks_nothing(project: Project) -> None:
    """It showed "plan: nothing to undo", then refused (exit 4) for want of --yes."""
    project.write_env("safe", SAFE)
    project.migrated("safe")
    project.ok("rollback", "--env=safe", "--to=base", "--yes")

    done = project.invoke("rollback", "--env=safe")

    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith(
        "plan: nothing to undo\nsafe: nothing to do, the database is already there\n"
    )
    assert version(project, "var/safe.sqlite3") == []


def test_a_protected_restore_shows_the_backup_it_puts_back_and_puts_back_that_one(
    project: Project,
) -> None:
    """It asked to "restore a backup over" the database without saying which, then took
    the newest one there was once the name was typed: by then another run's backup."""
    project.write_env("safe", SAFE)
    project.migrated("safe")
    add_notes(project)
    project.ok("migrate", "--env=safe", "--yes")
    [backup] = (project.root / "var" / "backups").glob("safe-*.sqlite3")
    plan = f"plan: restore var/backups/{backup.name} (at {head_revision()}) over the database"

    refused = project.invoke("restore", "--env=safe")

    assert refused.returncode == 4, refused.stderr
    assert refused.stderr == "error: safe is protected: to restore a backup over it, pass --yes\n"
    with at_the_prompt(project, "restore", "--env=safe", "--yes") as (process, controller, said):
        assert f"{plan} at notes1\n" in said.decode()
        project.ok("rollback", "--env=safe", "--yes")  # meanwhile: a newer backup, at notes1
        os.write(controller, b"safe\n")
        said += process.communicate(timeout=60)[1]

    assert process.returncode == 0, said
    assert f"safe: restored var/backups/{backup.name}\n" in said.decode()
    assert version(project, "var/safe.sqlite3") == [head_revision()]
    assert len(list((project.root / "var" / "backups").glob("safe-*.sqlite3"))) == 3


def test_reset_refuses_a_protected_environment_outright(project: Project) -> None:
    project.write_env("safe", SAFE)
    project.migrated("safe")

    refused = project.invoke("reset", "--env=safe")

    assert refused.returncode == 4
    assert "safe is protected: reset drops every table and never runs there" in refused.stderr
    assert version(project, "var/safe.sqlite3") == [head_revision()]


def test_reset_drops_everything_and_migrates_from_scratch(project: Project) -> None:
    project.migrated()
    with project.sqlite() as connection:
        connection.execute("insert into categories (name) values ('e-books')")
        connection.execute("create table stray (id integer)")

    result = project.ok("reset")

    assert "backed up to var/backups/dev-" in result.stderr
    assert f"applied {head_revision()}" in result.stderr
    assert "stray" not in tables(project)
    with project.sqlite() as connection:
        assert connection.execute("select count(*) from categories").fetchone() == (0,)


def test_reset_starts_again_a_database_at_a_revision_the_files_lack(project: Project) -> None:
    """A revision applied on another git branch: dev is at a revision the files here lack.
    reset, which drops every table, refused (it asked where the database was), said so
    with a warning to restore the file from version control, and was not named as a way
    out; a protected database is not offered it."""
    add_notes(project)
    project.migrated()
    project.write_env("safe", SAFE)
    project.migrated("safe")
    (project.versions / "notes.py").unlink()
    lacked = "the dev database is at revision notes1, which is not in db/migrations/versions"

    said = project.fails("status")
    assert lacked in said and said.endswith("; or start it again: `invoke reset --env=dev`\n")
    assert "invoke reset" not in project.fails("status", "--env=safe")

    result = project.ok("reset")

    assert "warning" not in result.stderr
    assert f"applied {head_revision()}" in result.stderr
    assert version(project) == [head_revision()]
    assert "notes" not in tables(project)


def test_a_reset_whose_migration_fails_says_that_it_dropped_the_tables(
    project: Project,
) -> None:
    """The migration after the drop failed, and the run said only where the database was
    and what it kept: nothing said that the tables and their rows were gone."""
    migrated_shop(project)
    add_good_then_bad(project, 'raise RuntimeError("boom")')
    project.ok("migrate", "--to=good01")

    result = project.invoke("reset")

    assert result.returncode == 1, result.stderr
    said = result.stderr
    assert "  dropped every table: migrating from scratch\n" in said
    assert said.index("dropped every table") < said.index(f"applying {head_revision()}")
    kept = "the database is at good01; this run kept f3af01bc3f27, good01; bad001 was rolled back"
    assert kept in said
    assert version(project) == ["good01"]
    with project.sqlite() as connection:  # what the line said: no row survived the reset
        assert connection.execute("select count(*) from purchases").fetchone() == (0,)


def test_sqlite_is_backed_up_before_a_change_and_can_be_restored(project: Project) -> None:
    migrated_shop(project)
    add_notes(project)

    result = project.ok("migrate")

    [backup] = (project.root / "var" / "backups").glob("dev-*.sqlite3")
    assert f"backed up to var/backups/{backup.name}" in result.stderr
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert "notes" in tables(project)
    assert "backed up" not in project.ok("migrate").stderr  # nothing to do, no backup

    restored = project.ok("restore")
    assert f"restored var/backups/{backup.name}" in restored.stderr
    assert "notes" not in tables(project)
    assert version(project) == [head_revision()]
    with project.sqlite() as connection:
        assert connection.execute("select count(*) from purchases").fetchone() == (1,)


def test_a_backup_another_environment_made_is_not_restored_without_saying_so(
    project: Project,
) -> None:
    """staging's backup put over dev's database (or one shop's over another's): refused,
    as migrate refuses a database migrated under another name."""
    project.write_env("staging", "DATABASE_URL=sqlite:///var/staging.sqlite3\n")
    project.migrated("staging")
    project.migrated()
    add_notes(project)
    project.ok("migrate", "--env=staging")  # backs staging up
    [backup] = (project.root / "var" / "backups").glob("staging-*.sqlite3")
    chosen = f"--file=var/backups/{backup.name}"

    refused = project.invoke("restore", chosen)

    assert refused.returncode == 4, refused.stderr
    assert refused.stderr.endswith(
        f"error: var/backups/{backup.name} is a backup of staging, not dev: nothing was "
        "restored; pass --allow-env-mismatch to put it here anyway (migrate will ask for it "
        "too)\n"
    )
    assert not list((project.root / "var" / "backups").glob("dev-*"))  # nothing kept aside
    with project.sqlite() as connection:
        assert connection.execute("select count(*) from migration_log").fetchone() == (1,)

    project.ok("restore", chosen, "--allow-env-mismatch")
    with project.sqlite() as connection:
        rows = connection.execute("select environment from migration_log").fetchall()
    assert rows == [("staging",)]
    assert "last migrated as 'staging'" in project.fails("migrate")


def test_a_fleet_targets_backup_is_not_restored_over_another_target(project: Project) -> None:
    project.write_env("shops", "DATABASE_URL=sqlite:///var/shops/{target}.sqlite3\nTARGETS=a,b\n")
    project.ok("migrate", "--env=shops")
    add_notes(project)
    project.ok("migrate", "--env=shops")
    [backup] = (project.root / "var" / "backups").glob("shops.a-*.sqlite3")

    refused = project.invoke("restore", "--env=shops", "--only=b", f"--file={backup}")

    assert refused.returncode == 4, refused.stderr
    assert f"{backup.name} is a backup of shops.a, not shops.b: nothing was restored" in (
        refused.stderr
    )
    project.ok("restore", "--env=shops", "--only=a", f"--file={backup}")


def test_only_the_newest_backups_are_kept(project: Project) -> None:
    (project.root / "environments" / "dev.env").write_text(
        "DATABASE_URL=sqlite:///var/dev.sqlite3\nBACKUP_KEEP=2\n"
    )
    project.migrated()
    for _ in range(3):
        project.ok("rollback")
        project.ok("migrate")
    assert len(list((project.root / "var" / "backups").glob("dev-*.sqlite3"))) == 2


def test_the_newest_backup_is_kept_and_restored_when_local_time_goes_back(
    project: Project,
) -> None:
    """Backups were stamped in local time: when it went back (each autumn, or with another
    TZ), the backup just taken sorted as older than the last one, so BACKUP_KEEP=1 deleted
    it as the task said it had backed up to it, and restore took the older one."""
    project.write_env("dev", "DATABASE_URL=sqlite:///var/dev.sqlite3\nBACKUP_KEEP=1\n")
    project.migrated()
    project.ok("rollback", TZ="Etc/GMT-14")  # UTC+14 (POSIX names turn the sign round)

    result = project.ok("migrate", TZ="Etc/GMT+11")  # UTC-11: local time 25 hours earlier

    [kept] = (project.root / "var" / "backups").glob("dev-*.sqlite3")
    assert f"backed up to var/backups/{kept.name}" in result.stderr
    project.ok("restore", TZ="Etc/GMT+11")  # the newest: taken at base, after the rollback
    assert version(project) == []


def test_an_environment_whose_name_starts_like_another_keeps_and_restores_its_own_backups(
    project: Project,
) -> None:
    """dev-old's backups, dev-old-STAMP.sqlite3, start with "dev-": dev counted them as its
    own, so its migrate pruned the backup it had just taken, and its restore took one of
    them (and refused it as another environment's)."""
    project.write_env("dev-old", "DATABASE_URL=sqlite:///var/old.sqlite3\nBACKUP_KEEP=2\n")
    project.extend_env("dev", "BACKUP_KEEP=2\n")
    project.migrated()
    project.migrated("dev-old")
    folder = project.root / "var" / "backups"
    for _ in range(2):
        project.ok("rollback", "--env=dev-old")
        project.ok("migrate", "--env=dev-old")
    project.ok("rollback")

    migrated = project.ok("migrate")  # dev's backup names sort after dev-old's

    taken = re.search(r"backed up to (\S+)", migrated.stderr)
    assert taken and (project.root / taken.group(1)).is_file()
    assert len(list(folder.glob("dev-old-*.sqlite3"))) == 2  # dev-old's, all kept
    restored = project.ok("restore")
    assert f"dev: restored {taken.group(1)}" in restored.stderr
    assert version(project) == []


def test_backup_keep_0_takes_no_backup_but_a_restore_still_keeps_what_it_replaces(
    project: Project,
) -> None:
    """Each message names a file that is there: no "backed up to X" for an X pruned at once."""
    project.migrated()
    project.ok("rollback")  # a backup, while BACKUP_KEEP is 5
    project.extend_env("dev", "BACKUP_KEEP=0\n")
    folder = project.root / "var" / "backups"

    migrated = project.ok("migrate")

    assert "backed up" not in migrated.stderr
    assert len(list(folder.glob("dev-*.sqlite3"))) == 1  # the one taken before, left alone
    project.ok("rollback")
    (project.root / "var" / "spare.sqlite3").write_bytes(
        (project.root / "var" / "dev.sqlite3").read_bytes()
    )
    project.ok("migrate")
    restored = project.ok("restore", "--file=var/spare.sqlite3")
    kept = re.search(r"kept the database it replaced as (\S+)", restored.stderr)
    assert kept and (project.root / kept.group(1)).is_file()
    assert version(project) == []


def test_a_readable_local_env_file_gets_a_warning(project: Project) -> None:
    local = project.root / "environments" / "dev.local.env"
    local.write_text("CONNECT_TIMEOUT=3\n")
    local.chmod(0o644)
    warned = project.ok("status").stderr
    assert "environments/dev.local.env may hold secrets but others can read it" in warned
    assert "chmod 600 environments/dev.local.env" in warned

    local.chmod(0o600)
    assert "warning" not in project.ok("status").stderr


def test_offline_sql_starts_with_the_session_settings(project: Project) -> None:
    sql = project.ok("offline-sql", "--env=prod").stdout
    assert sql.startswith(
        "SET application_name = 'migrations';\n\n"
        "SET lock_timeout = '5s';\n\n"
        "SET statement_timeout = '15min';\n\n"
        "SET TimeZone = 'UTC';\n\n"
        "SET standard_conforming_strings = 'on';\n"
    )


def test_a_failed_batch_alter_leaves_no_temporary_table(project: Project) -> None:
    migrated_shop(project)
    project.add_revision(
        "strict",
        revision(
            "strict",
            head_revision(),
            'with op.batch_alter_table("users", recreate="always") as batch:\n'
            '        batch.add_column(sa.Column("email", sa.String(100), nullable=False))',
            message="require email",
        ),
    )

    first = project.fails("migrate")
    assert "revision strict (require email) failed: IntegrityError: NOT NULL constraint" in first
    with project.sqlite() as connection:
        names = [n for (n,) in connection.execute("select name from sqlite_master")]
    assert not [n for n in names if n.startswith("_alembic_tmp")]

    again = project.fails("migrate")  # the retry reports the real error, not a leftover table
    assert "NOT NULL constraint" in again
    assert version(project) == [head_revision()]


def test_an_autocommit_block_on_sqlite_stays_inside_the_revision(project: Project) -> None:
    """The block is for PostgreSQL; SQLite runs it in the revision's transaction."""
    project.migrated()
    body = (
        'op.create_table("a", sa.Column("id", sa.Integer))\n'
        "    with op.get_context().autocommit_block():\n"
        '        op.create_table("b", sa.Column("id", sa.Integer))\n'
        "    {tail}"
    )
    project.add_revision(
        "acb", revision("acb001", head_revision(), body.format(tail="raise RuntimeError('late')"))
    )
    assert "RuntimeError: late" in project.fails("migrate")
    assert {"a", "b"}.isdisjoint(tables(project))

    project.add_revision("acb", revision("acb001", head_revision(), body.format(tail="pass")))
    project.ok("migrate")
    assert {"a", "b"} <= tables(project)
