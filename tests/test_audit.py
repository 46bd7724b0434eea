"""The audit trail, checksums of applied files, revision ids, and the environment guard."""

from __future__ import annotations

import ast
import getpass
import hashlib
import os
import socket
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from conftest import (
    PgDatabase,
    Project,
    add_notes,
    cannot,
    head_revision,
    log_rows,
    pg_execute,
    pg_fetch,
    revision,
    version,
)

from db.audit import code_checksum


def initial_file(project: Project) -> str:
    [path] = project.versions.glob(f"*_{head_revision()}_*.py")
    return str(path)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def test_every_revision_applied_or_rolled_back_leaves_a_row(project: Project) -> None:
    project.migrated()
    add_notes(project)
    project.migrated()
    project.ok("rollback")

    rows = log_rows(project)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (head_revision(), "up", "dev"),
        ("notes1", "up", "dev"),
        ("notes1", "down", "dev"),
    ]
    rev, _, _, user, host, digest, duration, tool = rows[0]
    assert (user, host) == (getpass.getuser(), socket.gethostname())
    assert digest == sha256(initial_file(project))
    assert isinstance(duration, int) and duration >= 0
    assert tool == "0.1.0"


def test_a_failed_revision_leaves_no_audit_row(project: Project) -> None:
    project.add_revision("bad", revision("bad001", head_revision(), 'raise RuntimeError("no")'))
    project.fails("migrate")
    assert [r[0] for r in log_rows(project)] == [head_revision()]


def test_history_shows_when_and_by_whom(project: Project) -> None:
    project.migrated()
    add_notes(project)
    lines = project.ok("history").stdout.splitlines()

    assert lines[0].startswith("notes1  pending  add notes  (head)")
    assert "[" not in lines[0]
    assert f"by {getpass.getuser()}@{socket.gethostname()}]" in lines[1]


def test_an_edited_applied_file_is_a_warning_on_dev(project: Project) -> None:
    project.migrated()
    path = initial_file(project)
    with open(path, "a") as edited:
        edited.write("\nEDITED_AFTER_IT_WAS_APPLIED = True\n")
    add_notes(project)

    result = project.ok("migrate")

    assert (
        f"warning: db/migrations/versions/{path.rsplit('/', 1)[1]} changed after revision "
        f"{head_revision()} was applied" in result.stderr
    )
    assert f"invoke accept-changes --env=dev {head_revision()}" in result.stderr
    assert version(project) == ["notes1"]
    assert "warning:" in project.ok("status").stderr


def test_line_endings_do_not_count_as_an_edit(project: Project) -> None:
    project.migrated()
    path = initial_file(project)
    Path(path).write_bytes(Path(path).read_bytes().replace(b"\n", b"\r\n"))
    assert "warning" not in project.ok("status").stderr


def test_an_edited_applied_file_stops_a_protected_environment(project: Project) -> None:
    project.write_env("safe", "DATABASE_URL=sqlite:///var/safe.sqlite3\nPROTECTED=true\n")
    project.migrated("safe")
    with open(initial_file(project), "a") as edited:
        edited.write("\nEDITED = True\n")  # code, not a comment: it counts
    add_notes(project)

    result = project.invoke("migrate", "--env=safe", "--yes")

    assert result.returncode == 4, result.stderr
    assert "changed after revision" in result.stderr and "nothing was run" in result.stderr
    assert version(project, "var/safe.sqlite3") == [head_revision()]
    assert project.invoke("status", "--env=safe").returncode == 4

    refused = project.invoke("accept-changes", head_revision(), "--env=safe")
    assert refused.returncode == 4 and "pass --yes" in refused.stderr
    accepted = project.ok("accept-changes", head_revision()[:6], "--env=safe", "--yes")
    assert f"accepted {head_revision()} as it is now" in accepted.stderr
    assert log_rows(project, "var/safe.sqlite3")[-1][1] == "accept"
    project.ok("migrate", "--env=safe", "--yes")
    assert version(project, "var/safe.sqlite3") == ["notes1"]


def test_accept_changes_records_a_revision_the_trail_has_no_checksum_of(project: Project) -> None:
    """Applied by plain Alembic (or the trail emptied): it said "is as recorded: nothing to
    accept", of a file nothing had recorded, and `check` went on failing."""
    project.ok("migrate")
    with project.sqlite() as db:
        db.execute("delete from migration_log")
    assert project.invoke("check").returncode == 5

    first = project.ok("accept-changes", head_revision())

    said = f"dev: recorded the checksum of {head_revision()} as it is now (the trail had none)"
    assert said in first.stderr
    assert [(row[0], row[1]) for row in log_rows(project)] == [(head_revision(), "accept")]
    assert "check passed" in project.ok("check").stderr
    again = project.ok("accept-changes", head_revision()).stderr
    assert "is as recorded: nothing to accept" in again


def test_accept_changes_needs_an_applied_revision(project: Project) -> None:
    add_notes(project)
    project.ok("migrate", f"--to={head_revision()}")
    error = project.fails("accept-changes", "notes1")
    assert "revision notes1 is not applied to the dev database" in error
    steps = project.fails("accept-changes", "head-1")  # was "No such revision or branch"
    assert steps.endswith(
        "error: accept-changes takes a revision named by its id, not by steps (head-1): name "
        "the revision itself; see `invoke history --env=dev`\n"
    )


def test_revision_ids_are_checked_before_they_reach_sql(project: Project) -> None:
    project.add_revision("odd", revision("odd.id'", head_revision(), "pass"))
    error = project.fails("migrate")
    assert 'revision id "odd.id\'" may only hold ASCII letters, digits and underscores' in error
    with project.sqlite() as connection:
        assert connection.execute("select name from sqlite_master").fetchall() == []


def test_a_database_revision_id_is_checked_too(project: Project) -> None:
    project.migrated()
    with project.sqlite() as connection:
        connection.execute("update alembic_version set version_num = 'x'' or 1=1'")
    error = project.fails("status")
    assert "may only hold ASCII letters, digits and underscores" in error


def test_a_broken_revision_file_is_a_clear_error(project: Project) -> None:
    project.add_revision("dash", revision("dash-id", head_revision(), "pass"))
    error = project.fails("status")
    assert "the revision files cannot be loaded" in error
    assert "'-' not allowed in revision identifier 'dash-id'" in error


def test_a_database_migrated_as_another_environment_is_refused(project: Project) -> None:
    project.write_env("a", "DATABASE_URL=sqlite:///var/shared.sqlite3\n")
    project.write_env("b", "DATABASE_URL=sqlite:///var/shared.sqlite3\n")
    project.migrated("a")
    add_notes(project)

    refused = project.invoke("migrate", "--env=b")
    assert refused.returncode == 4
    assert "last migrated as 'a', not 'b'" in refused.stderr
    assert "--allow-env-mismatch" in refused.stderr
    assert version(project, "var/shared.sqlite3") == [head_revision()]

    project.ok("migrate", "--env=b", "--allow-env-mismatch")
    assert version(project, "var/shared.sqlite3") == ["notes1"]
    project.ok("rollback", "--env=b")  # b is now the recorded name
    assert project.invoke("migrate", "--env=a").returncode == 4


def test_an_applied_revision_whose_file_is_gone(project: Project) -> None:
    project.write_env("safe", "DATABASE_URL=sqlite:///var/dev.sqlite3\nPROTECTED=true\n")
    project.migrated()
    add_notes(project)
    project.migrated()
    Path(initial_file(project)).unlink()  # squashed away: notes1 becomes the first revision
    project.add_revision("notes", revision("notes1", None, "pass", message="add notes"))

    warned = project.ok("status").stderr
    assert f"warning: revision {head_revision()} is applied, but its file is missing" in warned
    refused = project.invoke("status", "--env=safe")
    assert refused.returncode == 4, refused.stderr
    assert "its file is missing" in refused.stderr and "nothing was run" in refused.stderr


def test_the_audit_row_records_the_git_commit_when_there_is_one(project: Project) -> None:
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "shop"]):
        subprocess.run([*git, *args], cwd=project.root, check=True, capture_output=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project.root, capture_output=True, text=True, check=True
    ).stdout.strip()

    project.ok("migrate")

    with project.sqlite() as connection:
        assert connection.execute("select git_commit from migration_log").fetchall() == [(head,)]


@pytest.mark.postgres
def test_a_long_user_name_and_a_sha256_commit_fit_the_audit_row(
    project: Project, pg_database: PgDatabase
) -> None:
    """PostgreSQL refuses a value longer than its column: a $LOGNAME over 128 characters,
    or a SHA-256 repository's 64-digit commit, failed every revision's row as if the
    revision were broken."""
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    init = ["init", "-q", "--object-format=sha256"]
    for args in (init, ["add", "-A"], ["commit", "-q", "-m", "shop"]):
        subprocess.run([*git, *args], cwd=project.root, check=True, capture_output=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project.root, capture_output=True, text=True, check=True
    ).stdout.strip()
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\n")

    project.ok("migrate", "--env=ci", LOGNAME="u" * 200)

    [row] = pg_fetch(pg_database.dsn, "select os_user, git_commit from migration_log")
    assert (row["os_user"], row["git_commit"]) == ("u" * 128, head[:40])
    assert len(head) == 64


@pytest.mark.parametrize(
    "start", ["# reformatted by a newer ruff\n", "\ufeff"], ids=["comment", "byte-order-mark"]
)
def test_a_formatting_only_edit_is_not_a_change(project: Project, start: str) -> None:
    project.write_env("safe", "DATABASE_URL=sqlite:///var/safe.sqlite3\nPROTECTED=true\n")
    project.migrated("safe")
    path = Path(initial_file(project))
    text = path.read_text()
    reformatted = text.replace('"""create shop tables', '"""Create the shop tables', 1)
    path.write_text(start + reformatted.replace("\n\n\n", "\n\n"), encoding="utf-8")

    result = project.ok("status", "--env=safe")

    assert "changed after revision" not in result.stderr
    rows = len(log_rows(project, "var/safe.sqlite3"))
    unchanged = project.ok("accept-changes", head_revision(), "--env=safe", "--yes")
    assert "is as recorded: nothing to accept" in unchanged.stderr
    assert len(log_rows(project, "var/safe.sqlite3")) == rows


COUPONS = '''"""add coupons

Revision ID: c0ffee000001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c0ffee000001"
down_revision: str | Sequence[str] | None = None


def upgrade() -> None:
    """Coupons, and a code's rule."""
    op.create_table("coupons", sa.Column("id", sa.Integer, primary_key=True))
    op.execute(f"UPDATE coupons SET id = {1!r}")


def downgrade() -> None:
    op.drop_table("coupons")
'''


def test_the_code_checksum_is_the_same_on_every_python_version(tmp_path: Path) -> None:
    """A reformatted file matches its trail by its code's checksum, taken from its parsed
    code, which each Python version wrote otherwise (3.12 adds ``type_params=[]``, 3.13
    leaves out what is empty): a trail written from one version called every reformatted
    file changed on another (refused, on a protected environment). This value was taken on
    Python 3.10, 3.11, 3.12 and 3.13 alike; CI runs this test on 3.11 and on 3.13."""
    path = tmp_path / "coupons.py"
    path.write_text(COUPONS)

    found = code_checksum(path)

    assert found == "87b5fde10910b72a9340585ae076550310441326dfccfb9d8b869b84e0ef5c9e"


def test_a_trail_written_before_still_matches_a_reformatted_file(project: Project) -> None:
    """Trails written before the code's checksum was the same on every Python version
    hold ``ast.dump``'s: a file reformatted since still matches them, on the version that
    wrote them; a change in its code does not."""
    project.write_env("safe", "DATABASE_URL=sqlite:///var/safe.sqlite3\nPROTECTED=true\n")
    project.migrated("safe")
    path = Path(initial_file(project))
    tree = ast.parse(path.read_bytes())
    for node in ast.walk(tree):  # as the tool did: docstrings left out
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    written_before = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    with project.sqlite("var/safe.sqlite3") as connection:
        connection.execute("update migration_log set code_checksum = ?", (written_before,))
        connection.commit()
    path.write_text("# reformatted by a newer ruff\n" + path.read_text(), encoding="utf-8")

    assert "changed after revision" not in project.ok("status", "--env=safe").stderr
    path.write_text(path.read_text() + "\nEDITED = True\n", encoding="utf-8")
    assert "changed after revision" in project.invoke("status", "--env=safe").stderr


def test_a_protected_rollback_shows_what_it_would_undo(project: Project) -> None:
    project.write_env("safe", "DATABASE_URL=sqlite:///var/safe.sqlite3\nPROTECTED=true\n")
    project.migrated("safe")

    refused = project.invoke("rollback", "--env=safe")

    assert refused.returncode == 4
    assert "plan: 1 to undo" in refused.stderr
    assert f"  {head_revision()}  create shop tables" in refused.stderr


def test_a_user_with_no_name_is_recorded_by_uid() -> None:
    """A container may run as a UID that /etc/passwd does not name (``docker run --user
    4242``): ``getpass`` raises there, which ended every changing task in a traceback."""
    from db import audit

    if os.geteuid() != 0:
        cannot("taking a UID that has no name needs root")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child becomes that user, and says who it is recorded as
        try:
            os.setuid(4242)
            for name in ("USER", "LOGNAME", "LNAME", "USERNAME"):
                os.environ.pop(name, None)
            os.write(write, audit._user().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as said:
        assert said.read() == "uid 4242"


# the audit trail as an older version of the tool made it
OLD_TRAIL = (
    "alter table migration_log drop column last_statement, drop column code_checksum, "
    "drop column target"
)


def test_an_older_tools_audit_trail_is_read_and_brought_up_to_date(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A database migrated by an earlier version of the tool has a migration_log without
    the newer columns: it is read as it is, and the next change adds them, under the lock."""
    pg_project.ok("migrate", "--env=ci")
    pg_execute(pg_database.dsn, OLD_TRAIL)

    assert pg_project.ok("check", "--env=ci").stderr.endswith(
        "check passed: one head, files unchanged, models match the database\n"
    )
    add_notes(pg_project)
    pg_project.ok("migrate", "--env=ci")

    rows = pg_fetch(
        pg_database.dsn,
        "select revision, direction, checksum is not null, code_checksum is not null, target "
        "from migration_log order by id",
    )
    assert [tuple(row) for row in rows] == [
        (head_revision(), "up", True, False, None),  # written before the columns were there
        ("notes1", "up", True, True, None),
    ]
    history = pg_project.ok("history", "--env=ci").stdout
    assert "not recorded" not in history and history.count(" by ") == 2


@pytest.mark.parametrize(
    ("value", "said"), [("'garbage'", "Invalid isoformat string"), ("1733320000", "must be str")]
)
def test_an_audit_row_whose_time_is_no_time_is_named(
    project: Project, value: str, said: str
) -> None:
    """SQLite keeps any value in a DATETIME column: a row edited by hand ended every task
    that reads the trail in a traceback from SQLAlchemy's result processing."""
    project.migrated()
    with project.sqlite() as db:
        db.execute(f"update migration_log set started_at = {value}")

    for task in ("status", "history", "check", "migrate"):
        result = project.invoke(task)
        assert result.returncode == 1 and "Traceback" not in result.stderr, task
        last = result.stderr.splitlines()[-1]
        assert last.startswith(
            "error: migration_log, the audit trail, has a row whose started_at is no time ("
        ), task
        assert said in last and last.endswith(
            "fix that row, or delete it (an edit by hand?); nothing was run"
        )


def test_an_apps_own_table_named_like_the_audit_trail_is_refused(project: Project) -> None:
    """Read as the audit trail, it failed as "no such column: migration_log.revision"."""
    (project.root / "var").mkdir()
    with closing(sqlite3.connect(project.root / "var" / "dev.sqlite3")) as db:
        db.execute("create table migration_log (id integer primary key, note text)")
        db.commit()

    for task in ("migrate", "status"):
        assert project.fails(task).endswith(
            "error: the database has a table migration_log that is not this tool's audit trail "
            "(it has no revision column): nothing was run; rename that table, since the tasks "
            "keep their audit trail under that name\n"
        )
    with closing(sqlite3.connect(project.root / "var" / "dev.sqlite3")) as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master")}
    assert "users" not in tables  # no revision ran
