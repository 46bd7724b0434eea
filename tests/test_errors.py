"""Acceptance: every expected failure ends in one clear message, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import (
    Project,
    add_good_then_bad,
    add_notes,
    free_port,
    head_revision,
    migrated_shop,
    revision,
    tables,
    version,
)

from db import commands
from db.environments import load_environment
from db.errors import RevisionError


def test_unknown_environment_lists_the_known_ones(project: Project) -> None:
    error = project.fails("migrate", "--env=qa")
    assert "unknown environment 'qa'" in error
    assert "dev, prod, staging" in error
    assert "environments/qa.env" in error


@pytest.mark.parametrize(
    ("given", "meant"), [("DEV", "dev"), ("stagin", "staging"), ("prod ", "prod")]
)
def test_an_environment_name_a_letter_off_is_named(
    project: Project, given: str, meant: str
) -> None:
    error = project.fails("status", f"--env={given}")
    assert (
        f"unknown environment {given!r}: known environments are dev, prod, staging (did you "
        in (error)
    )
    assert error.endswith(f"did you mean {meant}?)\n")


def test_plain_alembic_without_a_url_says_to_use_the_tasks_in_one_line(project: Project) -> None:
    """`alembic upgrade head` typed in the project reaches env.py with no URL: it ended in
    a traceback through env.py, where Alembic's command line says a CommandError in a line."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=project.root,
        env=project.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )

    said = "no database URL: migrate through the invoke tasks (`invoke migrate --env=dev`), "
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith(f"FAILED: {said}which give Alembic the environment's")
    assert not (project.root / "var").exists()  # nothing was made


def test_an_empty_env_is_refused_not_read_as_the_default(project: Project) -> None:
    """``--env=$DEPLOY_ENV`` with DEPLOY_ENV unset must not migrate dev and exit 0, as if
    the deploy had migrated its database."""
    for task, flags in (("migrate", ["--yes"]), ("status", []), ("lint", [])):
        error = project.fails(task, "--env=", *flags)
        assert "error: --env is empty: name one of dev, prod, staging, or leave --env out" in error
    assert not (project.root / "var" / "dev.sqlite3").exists()
    assert project.ok("status").stderr.startswith("[dev]")  # no --env: the default, as before


def test_an_empty_default_environment_is_refused(project: Project) -> None:
    """``INVOKE_DB_ENV=$DEPLOY_ENV`` left empty said "unknown environment '' ... (did you
    mean dev?)", as if an environment had been named."""
    error = project.fails("migrate", INVOKE_DB_ENV="")

    assert error.endswith(
        "error: the default environment (INVOKE_DB_ENV, or db.env in invoke's configuration) "
        "is empty: give --env, set it to one of dev, prod, staging, or unset it\n"
    )
    assert not (project.root / "var" / "dev.sqlite3").exists()
    assert project.ok("status", "--env=dev", INVOKE_DB_ENV="").stderr.startswith("[dev]")


def test_environment_name_cannot_escape_the_directory(project: Project) -> None:
    error = project.fails("status", "--env=../tasks")
    assert "unknown environment '../tasks'" in error
    assert (
        "(a name holds ASCII letters, digits, _ and - only)" in error
        and ".env to create" not in error
    )


def test_an_environment_name_longer_than_the_audit_trail_keeps_is_refused(
    project: Project,
) -> None:
    """Each audit row names its environment in 64 characters: on PostgreSQL a longer name
    failed every revision's insert, as if the revision were broken."""
    for name in ("q" * 64, "q" * 65):
        project.write_env(name, "DATABASE_URL=sqlite:///var/long.sqlite3\n")
    error = project.fails("migrate", f"--env={'q' * 65}")
    assert f"the environment name {'q' * 20}... is 65 characters long, and the audit" in error
    assert not (project.root / "var" / "long.sqlite3").exists()
    project.ok("migrate", f"--env={'q' * 64}")


def test_only_on_one_database_is_refused(project: Project) -> None:
    """--only narrows a fleet; given with an --env that is one database (a mistaken env),
    the run must not go on over the whole database."""
    for task in ("migrate", "status", "reset"):
        error = project.fails(task, "--only=alpha")
        assert "dev is one database, not a fleet: --only does not apply" in error
    assert not (project.root / "var" / "dev.sqlite3").exists()


@pytest.mark.parametrize("task", [["migrate"], ["rollback"], ["stamp", "head"], ["seed"]])
def test_json_on_one_database_is_refused_not_left_empty(project: Project, task: list[str]) -> None:
    """`migrate --json | jq` on one database printed no JSON, and ran."""
    result = project.invoke(*task, "--json")

    assert result.returncode == 2 and result.stdout == ""
    assert "--json prints a fleet run's report, and dev is one database: `invoke status " in (
        result.stderr
    )
    assert "--env=dev --json` says where it is" in result.stderr
    assert not (project.root / "var" / "dev.sqlite3").exists()  # nothing ran


def test_unreadable_env_file(project: Project) -> None:
    (project.root / "environments" / "dev.env").write_bytes(b"DATABASE_URL=\xff\xfe\n")
    error = project.fails("migrate")
    assert "cannot read environments/dev.env: not UTF-8 text" in error


def test_local_env_file_that_cannot_be_read(project: Project) -> None:
    (project.root / "environments" / "dev.local.env").mkdir()
    error = project.fails("migrate")
    assert "cannot read environments/dev.local.env" in error


def test_missing_variable_names_the_variable_and_the_file(project: Project) -> None:
    error = project.fails("migrate", "--env=staging")
    assert "environments/staging.env" in error
    assert "${STAGING_DB_PASSWORD}" in error
    assert "staging.local.env" in error


def test_missing_database_url(project: Project) -> None:
    project.write_env("empty", "# nothing here\n")
    error = project.fails("status", "--env=empty")
    assert "environments/empty.env does not set DATABASE_URL" in error


def test_malformed_url_is_reported_without_echoing_it(project: Project) -> None:
    project.write_env("broken", "DATABASE_URL=postgresql+asyncpg://shop:Hunter2pw@db:port/shop\n")
    error = project.fails("migrate", "--env=broken")
    assert "environments/broken.env: DATABASE_URL is not a valid database URL" in error
    assert "Hunter2pw" not in error


def test_unsupported_driver(project: Project) -> None:
    project.write_env("sync", "DATABASE_URL=postgresql://shop@db/shop\n")
    error = project.fails("migrate", "--env=sync")
    assert "unsupported driver 'postgresql'" in error
    assert "postgresql+asyncpg://" in error


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "-1"])
def test_bad_connect_timeout(project: Project, value: str) -> None:
    project.write_env("slow", f"DATABASE_URL=sqlite:///var/x.sqlite3\nCONNECT_TIMEOUT={value}\n")
    error = project.fails("status", "--env=slow")
    assert f"CONNECT_TIMEOUT must be a number, 0 or more, not '{value}'" in error


@pytest.mark.parametrize("value", ["0", "0.0"])
def test_a_connect_timeout_of_0_is_refused(project: Project, value: str) -> None:
    """asyncpg reads 0 as no time at all, so every connection "timed out"; libpq, as no
    limit. Neither is said: the env file is named, before anything connects."""
    project.write_env("slow", f"DATABASE_URL=sqlite:///var/x.sqlite3\nCONNECT_TIMEOUT={value}\n")
    error = project.fails("status", "--env=slow")
    assert error.endswith(
        f"\nerror: environments/slow.env: CONNECT_TIMEOUT={value} would give up before any "
        "server could answer (there is no 'no limit'): give the seconds to wait, e.g. "
        "CONNECT_TIMEOUT=10\n"
    )
    assert not (project.root / "var" / "x.sqlite3").exists()


def test_unknown_revision(project: Project) -> None:
    error = project.fails("migrate", "--to=zzzz")
    assert "No such revision or branch 'zzzz'" in error
    assert "invoke history --env=dev" in error
    assert not (project.root / "var" / "dev.sqlite3").exists() or tables(project) == set()


@pytest.mark.parametrize(("task", "spec"), [("migrate", "HEAD"), ("rollback", "Base")])
def test_head_or_base_in_capitals_is_named_as_such(project: Project, task: str, spec: str) -> None:
    error = project.fails(task, f"--to={spec}")
    assert f"No such revision or branch '{spec}': write {spec.lower()}, in lower case" in error


def test_a_branch_label_no_file_has_never_reads_as_base(project: Project) -> None:
    """Alembic read ``rollback --to=typo@base`` as base: every revision rolled back."""
    project.migrated()

    error = project.fails("rollback", "--to=shop@base")

    assert "No such revision or branch 'shop'" in error
    assert version(project) == [head_revision()]


@pytest.mark.parametrize("spec", ["@", "@head", f"{head_revision()}@"])
def test_a_revision_with_an_empty_side_of_at_is_refused(project: Project, spec: str) -> None:
    """``--to=@`` was an AssertionError traceback from inside Alembic, in every task that
    takes a revision."""
    project.migrated()

    for args in (("migrate", f"--to={spec}"), ("rollback", f"--to={spec}"), ("stamp", spec)):
        result = project.invoke(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith(
            f"{spec!r} is no revision: write BRANCH@REV, with a branch label (or a revision) "
            "before the @ and a revision after it\n"
        )
    assert "is no revision" in project.fails("offline-sql", f"--from={spec}")
    assert version(project) == [head_revision()]
    with pytest.raises(RevisionError, match="is no revision"):  # and through the library
        commands.migrate(load_environment(project.root, "dev", {}), spec)


@pytest.mark.parametrize(
    "args",
    [
        ("migrate", f"--to={head_revision()}+1"),
        ("migrate", "--to=heads+1"),
        ("offline-sql", f"--to={head_revision()}-1"),
        ("rollback", "--to=heads+1"),
    ],
)
def test_a_step_past_the_ends_of_the_history_is_refused(
    project: Project, args: tuple[str, str]
) -> None:
    """Alembic asserts (an AssertionError traceback), or says "Walked too far"."""
    project.migrated()

    error = project.fails(*args)

    assert error.endswith(
        "that leads past the ends of the revision history, where there is no revision; see "
        "`invoke history --env=dev`\n"
    )
    assert version(project) == [head_revision()]


def test_ambiguous_revision_prefix(project: Project) -> None:
    project.add_revision("a1", revision("abcd11", head_revision()))
    project.add_revision("a2", revision("abcd22", "abcd11"))
    error = project.fails("migrate", "--to=abcd")
    assert "Multiple revisions start with 'abcd'" in error
    assert tables(project) == set()


def test_a_revision_prefix_shorter_than_four_characters_is_refused(project: Project) -> None:
    """Alembic takes any prefix one revision has: ``rollback --to=1`` (meant as
    ``--steps=1``) went back to the one revision whose id starts with 1, and ``--to=f3a``
    comes to mean another revision as more are added. A whole short id still works."""
    project.add_revision("a1", revision("1bcd11", head_revision()))
    project.add_revision("a2", revision("2bcd22", "1bcd11"))
    project.add_revision("a3", revision("v3", "2bcd22"))  # a hand-written id, whole
    project.migrated()

    error = project.fails("rollback", "--to=1")

    assert "'1' is no revision id or branch label, and too short to be a prefix" in error
    assert "give at least 4 characters of a revision's id" in error
    assert version(project) == ["v3"]
    short = head_revision()[:3]
    for args in (
        ("migrate", f"--to={short}"),
        ("stamp", short),
        ("offline-sql", f"--to={short}"),
        ("offline-sql", f"--from={short}"),
        ("accept-changes", short),
    ):
        assert f"'{short}' is no revision id" in project.fails(*args), args
    assert version(project) == ["v3"]
    project.ok("rollback", "--to=1bcd")  # four characters
    assert version(project) == ["1bcd11"]
    project.ok("migrate", "--to=v3")
    assert version(project) == ["v3"]


def test_database_at_a_revision_the_scripts_do_not_have(project: Project) -> None:
    project.migrated()
    with project.sqlite() as connection:
        connection.execute("update alembic_version set version_num = 'deadbeef0000'")

    for task in ("migrate", "status", "rollback", "history"):
        error = project.fails(task)
        assert "at revision deadbeef0000, which is not in db/migrations/versions" in error
    assert version(project) == ["deadbeef0000"]


def test_a_version_table_holding_a_revision_and_its_ancestor_is_named(project: Project) -> None:
    """A row added by hand beside the real one: status and check ended in a traceback from
    Alembic's planning ("overlaps with other requested revisions"), migrate in its words."""
    add_notes(project)
    project.migrated()
    with project.sqlite() as connection:
        connection.execute(f"insert into alembic_version values ('{head_revision()}')")

    for task in ("status", "check", "migrate", "rollback", "history", "stamp notes1"):
        result = project.invoke(*task.split())
        assert result.returncode == 1 and "Traceback" not in result.stderr, task
        assert result.stderr.endswith(
            "error: the dev database's version table (alembic_version) holds both "
            f"{head_revision()} and notes1, which comes after it: one of the two rows is wrong "
            f"(added by hand?); if the database is at notes1, delete the row of {head_revision()}\n"
        ), task
    assert sorted(version(project)) == sorted([head_revision(), "notes1"])


def test_multiple_heads(project: Project) -> None:
    project.add_revision("h1", revision("head1", head_revision()))
    project.add_revision("h2", revision("head2", head_revision()))

    error = project.fails("migrate")
    assert "2 heads (head1, head2)" in error
    assert "merge" in error
    assert "2 heads" in project.fails("makemigration", "more")
    assert "2 heads" in project.fails("offline-sql", "--env=prod")
    assert "head:    head1 (hand written), head2 (hand written)" in project.ok("status").stdout

    project.ok("migrate", "--to=head1")
    assert version(project) == ["head1"]


def test_failing_migration_names_the_revision_and_leaves_nothing_behind(project: Project) -> None:
    project.migrated()
    add_good_then_bad(
        project,
        'op.add_column("users", sa.Column("coupon", sa.Integer))\n'
        '    raise RuntimeError("boom in the middle")',
    )

    result = project.invoke("migrate")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "applied good01  add notes" in result.stderr
    assert "upgrade of revision bad001 (add coupons) failed: RuntimeError: boom in the middle" in (
        result.stderr
    )
    kept = "the database is at good01; this run kept good01; bad001 was rolled back"
    assert kept in result.stderr
    assert version(project) == ["good01"]
    assert "notes" in tables(project)
    assert "coupons" not in tables(project)
    with project.sqlite() as connection:
        columns = {row[1] for row in connection.execute("pragma table_info(users)")}
    assert "coupon" not in columns

    again = project.invoke("migrate")  # the retry hits the same, real error
    assert "boom in the middle" in again.stderr and version(project) == ["good01"]


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        ('import sys\n    sys.exit("bad input in the backfill")', "SystemExit: bad input in "),
        # async code in a data step (asyncio.run of a task that was cancelled)
        ('import asyncio\n    raise asyncio.CancelledError("gave up")', "CancelledError: gave up"),
    ],
)
def test_a_revision_that_calls_sys_exit_fails_like_any_other(
    project: Project, raised: str, said: str
) -> None:
    """A helper that calls sys.exit (a script's main, argparse) ended the task with its
    text alone, without a word on where the database is; another BaseException than
    KeyboardInterrupt (asyncio's CancelledError), with a traceback and no such word."""
    project.migrated()
    add_good_then_bad(project, raised)

    error = project.fails("migrate")

    assert f"upgrade of revision bad001 (add coupons) failed: {said}" in error
    assert "Traceback" not in error
    assert error.endswith(
        "the database is at good01; this run kept good01; bad001 was rolled back; fix it and "
        "run the task again\n"
    )
    assert version(project) == ["good01"]
    assert "coupons" not in tables(project)


def test_failing_sql_in_a_migration(project: Project) -> None:
    project.add_revision(
        "bad",
        revision(
            "bad002",
            head_revision(),
            'op.execute("insert into no_such_table values (1)")',
            message="bad sql",
        ),
    )
    error = project.fails("migrate")
    assert "upgrade of revision bad002 (bad sql) failed: OperationalError: no such table" in error
    assert version(project) == [head_revision()]


def test_batch_alter_of_a_referenced_table_keeps_the_referencing_rows(project: Project) -> None:
    """SQLite rebuilds a table to alter it; with foreign keys on, dropping the old ``users``
    would cascade-delete every purchase. Migrations run with them off."""
    migrated_shop(project)
    project.add_revision(
        "widen",
        revision(
            "widen1",
            head_revision(),
            'with op.batch_alter_table("users", recreate="always") as batch:\n'
            '        batch.alter_column("username", type_=sa.String(100))',
            message="widen usernames",
        ),
    )

    project.ok("migrate")

    with project.sqlite() as connection:
        assert connection.execute("select count(*) from purchases").fetchone() == (1,)


def test_a_revision_that_breaks_foreign_keys_does_not_commit(project: Project) -> None:
    project.migrated()
    project.add_revision(
        "orphan",
        revision(
            "orphan",
            head_revision(),
            "op.execute(\"insert into categories (id, name) values (7, 'x')\")\n"
            "    op.execute(\"insert into products (category_id,name,price) values (9,'y',1)\")",
            message="orphan product",
        ),
    )

    error = project.fails("migrate")

    assert "revision orphan (orphan product) failed" in error
    assert "broken foreign keys in products" in error
    assert version(project) == [head_revision()]
    with project.sqlite() as connection:
        assert connection.execute("select count(*) from categories").fetchone() == (0,)


def test_a_failing_first_revision_leaves_the_database_at_base(project: Project) -> None:
    [initial] = project.versions.glob("*.py")
    initial.write_text(
        initial.read_text().replace(
            "def upgrade() -> None:\n", "def upgrade() -> None:\n    raise RuntimeError('first')\n"
        )
    )
    error = project.fails("migrate")
    assert "failed: RuntimeError: first" in error and "the database is at base;" in error
    assert version(project) == []


def test_a_failing_downgrade_names_the_revision_and_changes_nothing(project: Project) -> None:
    body = revision(
        "stuck1", head_revision(), 'op.create_table("notes", sa.Column("id", sa.Integer))'
    )
    body = body.replace(
        "def downgrade() -> None:\n    pass",
        ('def downgrade() -> None:\n    op.drop_table("notes")\n    raise RuntimeError("keep it")'),
    )
    project.add_revision("stuck", body)
    project.migrated()

    error = project.fails("rollback")

    assert "downgrade of revision stuck1 (hand written) failed: RuntimeError: keep it" in error
    assert "the database is at stuck1; the downgrade of stuck1 was rolled back" in error
    assert version(project) == ["stuck1"] and "notes" in tables(project)


def test_a_downgrade_that_cannot_undo_its_revision_says_what_can(project: Project) -> None:
    """A revision that cannot be undone raises NotImplementedError in its downgrade, as the
    files' check asks; rollback said "fix it and run the task again" of it."""
    upgrade = 'op.execute("UPDATE products SET price = 0")'
    body = revision("lossy1", head_revision(), upgrade, message="prices to zero")
    body = body.replace(
        "def downgrade() -> None:\n    pass",
        'def downgrade() -> None:\n    raise NotImplementedError("the old prices are gone")',
    )
    project.add_revision("lossy", body)
    project.migrated()

    error = project.fails("rollback")

    assert error.endswith(
        "error: downgrade of revision lossy1 (prices to zero) failed: NotImplementedError: the "
        "old prices are gone\nthe database is at lossy1; the downgrade of lossy1 was rolled "
        "back; lossy1 cannot be undone (its downgrade says so): to go back before it, restore "
        "a backup taken before it ran\n"
    )
    assert version(project) == ["lossy1"]


def test_a_rollback_that_fails_on_its_second_step_names_the_first_as_undone(
    project: Project,
) -> None:
    """It said "this run kept top001", which reads as top001 still applied: it was undone."""
    body = revision(
        "stuck1", head_revision(), 'op.create_table("notes", sa.Column("id", sa.Integer))'
    )
    body = body.replace(
        "def downgrade() -> None:\n    pass",
        'def downgrade() -> None:\n    raise RuntimeError("keep it")',
    )
    project.add_revision("stuck", body)
    project.add_revision("top", revision("top001", "stuck1", "pass"))
    project.migrated()

    error = project.fails("rollback", "--steps=2")

    assert error.endswith(
        "the database is at stuck1; this run kept the downgrade of top001; the downgrade of "
        "stuck1 was rolled back; fix it and run the task again\n"
    )
    assert version(project) == ["stuck1"] and "notes" in tables(project)


def test_a_server_still_down_after_wait_says_how_long_it_was_tried(project: Project) -> None:
    """--wait retried a refused connection and then failed as if it had never waited."""
    url = f"postgresql+asyncpg://shop@127.0.0.1:{free_port()}/shop"
    project.write_env("down", f"DATABASE_URL={url}\n")

    error = project.fails("migrate", "--env=down", "--wait=1")

    assert error.endswith(
        f"error: cannot connect to {url}, tried for 1s: Connection refused (is the server "
        "running on that host and port?)\n"
    ), error
    unwaited = project.fails("migrate", "--env=down")
    assert f"cannot connect to {url}: Connection refused" in unwaited
