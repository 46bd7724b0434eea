"""Acceptance: the invoke tasks against a SQLite file, as a user types them."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import (
    PIPES,
    REPO,
    SAVEPOINT_RECOVERY,
    SESSION_ROLLBACK,
    Project,
    add_coupon_model,
    add_good_then_bad,
    head_revision,
    migrated_shop,
    popen,
    revision,
    tables,
    tmpfs,
    version,
)

SHOP_TABLES = {"users", "categories", "products", "purchases"}


def test_migrate_creates_the_dev_database_at_head(project: Project) -> None:
    result = project.ok("migrate", "--env=dev")

    assert tables(project) == SHOP_TABLES
    assert version(project) == [head_revision()]
    banner = result.stderr.splitlines()[0]
    assert banner == f"[dev] sqlite:///{project.root}/var/dev.sqlite3"
    assert f"applied {head_revision()}  create shop tables" in result.stderr
    assert "dev: migrated 1 revision in" in result.stderr
    assert result.stdout == ""


def test_migrate_finds_the_project_root_from_a_subdirectory(project: Project) -> None:
    result = project.invoke("migrate", cwd=project.root / "db" / "migrations")

    assert result.returncode == 0, result.stderr
    assert (project.root / "var" / "dev.sqlite3").exists()
    assert not (project.root / "db" / "migrations" / "var").exists()


def test_migrate_twice_has_nothing_to_do(project: Project) -> None:
    project.migrated()
    result = project.ok("migrate")

    assert "nothing to do" in result.stderr
    assert "applied" not in result.stderr


def test_up_to_head_down_to_base_and_up_again(project: Project) -> None:
    project.migrated()
    down = project.ok("rollback", "--to=base")

    assert tables(project) == set()
    assert version(project) == []
    assert f"reverted {head_revision()}" in down.stderr

    project.ok("migrate")
    assert tables(project) == SHOP_TABLES


def test_rollback_one_step_and_migrate_by_relative_and_prefix(project: Project) -> None:
    project.migrated()
    add_coupon_model(project)
    project.ok("makemigration", "add coupons")
    project.migrated()
    assert "coupons" in tables(project)

    project.ok("rollback")
    assert "coupons" not in tables(project)
    assert version(project) == [head_revision()]

    project.ok("migrate", "--to=+1")
    assert "coupons" in tables(project)

    project.ok("rollback", "--steps=2")
    assert tables(project) == set()
    project.ok("migrate", f"--to={head_revision()[:6]}")
    assert version(project) == [head_revision()]


def test_a_task_named_twice_on_one_command_line_runs_twice(project: Project) -> None:
    """invoke would run each task once: the redo check would end rolled back, exit 0."""
    result = project.ok("migrate", "rollback", "migrate")

    assert result.stderr.count(f"applied {head_revision()}") == 2
    assert f"reverted {head_revision()}" in result.stderr
    assert version(project) == [head_revision()]
    assert tables(project) == SHOP_TABLES


# every task that changes a database or writes a file, as a user would type it
CHANGING = [
    ["migrate"],
    ["rollback"],
    ["reset"],
    ["restore"],
    ["resolve", "f3af01bc3f27", "--applied"],
    ["stamp", "base"],
    ["accept-changes", "f3af01bc3f27"],
    ["makemigration", "add coupons", "--empty"],
    ["merge"],
    ["seed"],
]


@pytest.mark.parametrize("task", CHANGING, ids=lambda task: task[0])
def test_invokes_dry_run_flag_is_refused_where_a_task_would_change_something(
    project: Project, task: list[str]
) -> None:
    """invoke's --dry only echoes shell commands, which these tasks never run: `invoke --dry
    rollback` rolled back, for real, and exited 0."""
    project.migrated()
    files = sorted(project.versions.glob("*.py"))

    result = project.invoke("--dry", *task)

    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(
        "error: --dry is invoke's, for shell commands, and this task runs none: it would have "
        "made its changes for real, so it did nothing; `invoke status` shows what is "
        "pending, and `invoke offline-sql` its SQL\n"
    )
    assert version(project) == [head_revision()]
    assert tables(project) == SHOP_TABLES
    assert sorted(project.versions.glob("*.py")) == files


def test_invokes_dry_run_setting_is_refused_too_and_reading_tasks_run(project: Project) -> None:
    project.migrated()
    project.add_revision("next", revision("next01", head_revision()))

    refused = project.invoke("migrate", INVOKE_RUN_DRY="1")  # run.dry from the environment
    assert refused.returncode == 2, refused.stderr
    assert "error: --dry is invoke's, for shell commands" in refused.stderr
    assert version(project) == [head_revision()]

    status = project.ok("--dry", "status")  # changes nothing: runs as without it
    assert "pending: 1\n  next01  hand written\n" in status.stdout


def test_rollback_more_steps_than_applied_is_refused(project: Project) -> None:
    project.migrated()
    error = project.fails("rollback", "--steps=3")

    assert "cannot roll back 3 revisions: only 1 is applied" in error
    assert "--to=base" in error
    assert tables(project) == SHOP_TABLES


def test_rollback_with_both_steps_and_to_is_refused(project: Project) -> None:
    """--steps=2 --to=base could mean either: neither is guessed."""
    project.migrated()

    result = project.invoke("rollback", "--steps=1", "--to=base")

    assert result.returncode == 2, result.stderr
    assert "error: --steps and --to do not go together: give one of them" in result.stderr
    assert tables(project) == SHOP_TABLES


def test_migrate_to_a_revision_the_database_is_past_is_refused(project: Project) -> None:
    """migrate only goes forward: a --to=REV behind the database is refused, not reported
    as "already there"."""
    head = head_revision()
    project.migrated()

    past = project.fails("migrate", "--to=base")

    assert f"the dev database is at {head}, past base: migrate only goes forward" in past
    assert "`invoke rollback --env=dev --to=base` goes back to it" in past
    assert version(project) == [head]
    assert "already there" in project.ok("migrate", f"--to={head[:6]}").stderr  # at it


def test_rollback_to_a_revision_the_database_has_not_reached_is_refused(
    project: Project,
) -> None:
    """rollback only goes back: a --to=REV ahead of the database says so, and which
    command goes there."""
    head = head_revision()

    ahead = project.fails("rollback", f"--to={head}")

    assert f"the dev database is at base (nothing applied), before {head}: rollback only" in ahead
    assert f"`invoke migrate --env=dev --to={head}` goes forward to it" in ahead
    project.ok("migrate", f"--to={head}")
    assert "nothing to do" in project.ok("rollback", f"--to={head}").stderr  # at it
    assert version(project) == [head]


def test_rollback_at_base_has_nothing_to_do(project: Project) -> None:
    result = project.ok("rollback")
    assert "nothing to do" in result.stderr


def test_makemigration_autogenerates_a_formatted_revision(project: Project) -> None:
    project.migrated()
    add_coupon_model(project)

    result = project.ok("makemigration", "add coupons")

    [written] = project.versions.glob("*_add_coupons.py")
    assert f"wrote db/migrations/versions/{written.name}" in result.stderr
    assert "warning" not in result.stderr  # it drops nothing
    source = written.read_text()
    assert 'op.create_table(\n        "coupons",' in source
    assert f'down_revision: str | Sequence[str] | None = "{head_revision()}"' in source
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(written)],
        cwd=project.root,
        capture_output=True,
    )
    assert formatted.returncode == 0, formatted.stdout
    assert result.stdout == ""

    project.ok("migrate")
    assert "coupons" in tables(project)


def test_makemigration_warns_of_what_the_draft_drops(project: Project) -> None:
    """A renamed column is a drop and an add to autogenerate: the draft lost the column's
    data, and the task said only "wrote ...". It now names each drop, and the rename that
    would keep the data."""
    project.migrated()
    add_coupon_model(project)
    project.ok("makemigration", "add coupons")
    project.ok("migrate")
    models = project.root / "db" / "models.py"
    source = models.read_text()
    renamed = source.replace("first_name: Mapped", "given_name: Mapped")
    models.write_text(renamed[: renamed.index("class Coupon(Base):")])  # coupons dropped too

    result = project.ok("makemigration", "rename first name")

    assert result.stderr.endswith(
        "warning: the revision drops table coupons, and its data with it\n"
        "warning: the revision drops column users.first_name, and its data with it; if it "
        'was renamed to given_name, batch_op.alter_column("first_name", new_column_name=...) '
        "keeps the data\n"
    )


def test_makemigration_warns_of_a_required_column_with_nothing_to_fill_it(
    project: Project,
) -> None:
    """A NOT NULL column added with no server_default fails on a table with rows (on
    SQLite always); the draft was written without a word, and migrate failed later."""
    project.migrated()
    models = project.root / "db" / "models.py"
    first_name = "first_name: Mapped[str | None] = mapped_column(String(128))"
    models.write_text(
        models.read_text().replace(
            first_name,
            f"{first_name}\n    email: Mapped[str] = mapped_column(String(128))"
            "\n    note: Mapped[str | None] = mapped_column(String(128))"
            '\n    lang: Mapped[str] = mapped_column(String(8), server_default="en")',
        )
    )

    result = project.ok("makemigration", "add email")

    assert result.stderr.endswith(  # one warning: note may be NULL, lang has a default
        "warning: the revision adds column users.email as NOT NULL with no server_default, "
        "which fails where the table has rows (on SQLite, always): give it a server_default, "
        "or add it nullable, fill it, and then make it NOT NULL\n"
    )
    assert result.stderr.count("warning") == 1


def test_makemigration_warns_of_a_column_made_not_null_or_narrower(project: Project) -> None:
    """Each fails where rows hold what no longer fits, a narrower type on PostgreSQL only:
    SQLite never checks a length, a precision or an integer's size, so dev passed, and
    the drafts were written without a word. A NUMERIC with fewer decimal places rounds
    every value there. A wider type is no risk."""
    project.migrated()
    models = project.root / "db" / "models.py"
    price = "price: Mapped[Decimal] = mapped_column(Numeric({}))"
    models.write_text(
        models.read_text()
        .replace("String(64))", "String(32))")
        .replace("first_name: Mapped[str | None]", "first_name: Mapped[str]")
        .replace("String(200))", "String(300))")
        .replace(
            "telegram_id: Mapped[int] = mapped_column(BigInteger, ",
            "telegram_id: Mapped[int] = mapped_column(",
        )
        .replace(price.format("10, 2"), price.format("8, 2"), 1)  # products'
        .replace(price.format("10, 2"), price.format("12, 0"), 1)  # purchases'
    )

    result = project.ok("makemigration", "tighten users")

    narrows = (
        "warning: the revision narrows column {} from {} to {}, which {} (SQLite never "
        "checks, so dev shows nothing): mend those values first, in the same revision, or "
        "keep the type\n"
    )
    fails = "fails on PostgreSQL where a value"
    assert result.stderr.endswith(
        narrows.format(
            "products.price",
            "NUMERIC(10, 2)",
            "NUMERIC(8, 2)",
            f"{fails} has more than 6 digits before the point",
        )
        + narrows.format(
            "purchases.price",
            "NUMERIC(10, 2)",
            "NUMERIC(12, 0)",
            "rounds every value to 0 decimal places on PostgreSQL",
        )
        + narrows.format(
            "users.telegram_id",
            "BIGINT",
            "INTEGER",
            f"{fails} is outside INTEGER's range (-2147483648 to 2147483647)",
        )
        + narrows.format(
            "users.username", "VARCHAR(64)", "VARCHAR(32)", f"{fails} is longer than 32 characters"
        )
        + "warning: the revision makes column users.first_name NOT NULL, which fails where a "
        "row holds NULL in it: fill those rows first, in the same revision "
        '(op.execute("UPDATE ..."))\n'
    )
    assert result.stderr.count("warning") == 5  # a longer products.name is no risk
    [draft] = project.versions.glob("*_tighten_users.py")
    assert "type_=sa.String(length=300)" in draft.read_text()


def test_makemigration_warns_of_a_unique_constraint_added(project: Project) -> None:
    """It fails where rows already share a value, as a CHECK constraint fails where a row
    breaks it (tests/test_review.py); so does a unique index, and a foreign key fails where
    a row points at nothing. An index that is not unique is no risk, nor is a foreign key or
    unique constraint on a column added with NULL in every row."""
    project.migrated()
    models = project.root / "db" / "models.py"
    source = models.read_text()
    first_name = "first_name: Mapped[str | None] = mapped_column(String(128))"
    referrer = "\n    referrer_id: Mapped[int | None] = mapped_column(Integer)"
    inviter = "\n    inviter_id: Mapped[int | None] = mapped_column(ForeignKey('users.id'))"
    referrals = "\n    referrals: Mapped[int] = mapped_column(server_default='0', index=True)"
    source = source.replace("    BigInteger,\n", "    BigInteger,\n    Integer,\n")
    models.write_text(source.replace(first_name, first_name + referrer + inviter + referrals))

    quiet = project.ok("makemigration", "referrals")

    assert "warning" not in quiet.stderr
    project.ok("migrate")
    models.write_text(
        source.replace(
            first_name,
            first_name.replace("))", "), unique=True)")
            + referrer.replace("(Integer)", "(ForeignKey('users.id'), unique=True)")
            + inviter
            + referrals,
        ).replace("String(64))", "String(64), unique=True, index=True)")
    )

    result = project.ok("makemigration", "unique first names")

    assert result.stderr.endswith(
        "warning: the revision adds unique index ix_users_username to users, which fails "
        "where rows share a value: mend those rows first, in the same revision\n"
        "warning: the revision adds unique constraint uq_users_first_name to users, which "
        "fails where rows share a value: mend those rows first, in the same revision\n"
        "warning: the revision adds unique constraint uq_users_referrer_id to users, which "
        "fails where rows share a value: mend those rows first, in the same revision\n"
        "warning: the revision adds foreign key fk_users_referrer_id_users to users, which "
        "fails where a row points at no row of users (on PostgreSQL: SQLite checks no "
        "foreign key while it migrates, so dev passes): mend those rows first, in the same "
        "revision\n"
    )
    assert result.stderr.count("warning") == 4


def test_a_constraint_made_again_on_the_same_columns_is_not_warned_of(project: Project) -> None:
    """A foreign key made again to change its ``ondelete``, and a unique constraint made a
    unique index on the same column, hold the rows to what they kept already: each was
    warned of as failing where a row points at nothing, or where rows share a value."""
    migrated_shop(project)
    models = project.root / "db" / "models.py"
    source = models.read_text()
    cascade, paid = 'ondelete="CASCADE"), index=True', "String(128), unique=True)"
    assert cascade in source and paid in source
    source = source.replace(cascade, cascade.replace("CASCADE", "RESTRICT"))
    models.write_text(source.replace(paid, "String(128), unique=True, index=True)"))

    result = project.ok("makemigration", "restrict")

    assert "warning" not in result.stderr
    [draft] = project.versions.glob("*_restrict.py")
    made = draft.read_text()
    assert 'ondelete="RESTRICT"' in made and '"ix_purchases_payment_id"' in made
    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr


def test_an_index_made_concurrently_is_warned_of(project: Project) -> None:
    """PostgreSQL refuses CREATE INDEX CONCURRENTLY in a transaction, and every revision is
    one unless it says otherwise; SQLite ignores the option, so the draft passed on dev."""
    project.migrated()
    models = project.root / "db" / "models.py"
    products = '    __tablename__ = "products"\n'
    index = (
        '    __table_args__ = (Index("ix_products_name", "name", postgresql_concurrently=True),)\n'
    )
    text = models.read_text().replace(products, products + index)
    models.write_text(text.replace("    ForeignKey,\n", "    ForeignKey,\n    Index,\n"))

    result = project.ok("makemigration", "names")

    assert result.stderr.endswith(
        "warning: the revision creates index ix_products_name on products CONCURRENTLY, which "
        "PostgreSQL refuses inside a transaction (SQLite ignores it, so dev passes): move it, "
        "and its undoing in downgrade(), out of the batch block into `with "
        'op.get_context().autocommit_block():`, as op.create_index(..., table_name="products")\n'
    )


def test_makemigration_without_model_changes_writes_nothing(project: Project) -> None:
    project.migrated()
    before = sorted(project.versions.iterdir())

    result = project.ok("makemigration", "nothing changed")

    assert "no changes" in result.stderr
    assert sorted(project.versions.iterdir()) == before


def test_makemigration_empty_writes_a_revision_to_fill_by_hand(project: Project) -> None:
    result = project.ok("makemigration", "backfill prices", "--empty")

    [written] = project.versions.glob("*_backfill_prices.py")
    assert "def upgrade() -> None:\n    pass" in written.read_text()
    assert not (project.root / "var" / "dev.sqlite3").exists()  # no database needed
    assert "wrote" in result.stderr


def test_a_revision_that_does_not_fit_on_the_disk_is_not_left_behind(project: Project) -> None:
    kept = {p.name: p.read_bytes() for p in project.versions.glob("*.py")}
    with tmpfs(project.versions, "16k") as versions:  # a page per file: four fit
        for name, body in kept.items():
            (versions / name).write_bytes(body)
        project.add_revision("a", revision("branch_a", head_revision()))
        project.add_revision("b", revision("branch_b", head_revision()))
        (versions / "filler").write_bytes(b"x" * 4096)
        before = sorted(versions.iterdir())

        # the pages counted here hold no bytecode (a user's shell may write it, or not)
        quiet = {"PYTHONDONTWRITEBYTECODE": "1"}
        merge = project.invoke("merge", **quiet)
        (versions / "b.py").unlink()  # one head again, and the page it held filled
        (versions / "filler2").write_bytes(b"x" * 4096)
        empty = project.invoke("makemigration", "add coupons", "--empty", **quiet)

        for result in (merge, empty):  # no traceback, and no empty file that breaks the rest
            assert result.returncode == 2, result.stderr
            assert "cannot write the new revision to db/migrations/versions: No space left" in (
                result.stderr
            )
            assert "nothing was written" in result.stderr and "Traceback" not in result.stderr
        expected = {*before, versions / "filler2"} - {versions / "b.py"}
        assert sorted(versions.iterdir()) == sorted(expected)
        project.ok("status", **quiet)


@pytest.mark.parametrize(
    ("mistake", "said"),
    [
        ("missing", "the template of new revisions, is missing: restore it from the repository"),
        ("${", "is no valid template (Expected: \\|,}"),  # the rest is Mako's, by release
        ("${nowhere.name}", "failed to render (see /"),
    ],
)
def test_a_missing_or_broken_revision_template_is_named_and_nothing_is_written(
    project: Project, mistake: str, said: str
) -> None:
    """A missing script.py.mako was reported as a folder that could not be written to, a
    broken one ended in a traceback, and one that failed to render was answered with
    "see `invoke history`"."""
    template = project.root / "db" / "migrations" / "script.py.mako"
    if mistake == "missing":
        template.unlink()
    else:
        template.write_text(template.read_text() + mistake + "\n")
    before = sorted(project.versions.iterdir())
    scratch = project.root.parent  # where Alembic leaves its account of a failed render

    result = project.invoke("makemigration", "add coupons", "--empty", TMPDIR=str(scratch))

    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: db/migrations/script.py.mako") and said in line, line
    assert line.endswith("nothing was written"), line
    assert sorted(project.versions.iterdir()) == before
    for named in re.findall(r"see (\S+\.txt)", line):  # the file the message points to
        assert Path(named).parent == scratch and Path(named).is_file()


@pytest.mark.parametrize(
    ("new", "said"),
    [
        (
            "ruff_format.type = module\nruff_format.module = ruff_is_gone",
            "Could not find module ruff_is_gone",
        ),
        (
            "ruff_format.type = exec\nruff_format.executable = /nowhere/ruff",
            "[Errno 2] No such file or directory: '/nowhere/ruff'",
        ),
    ],
)
def test_a_post_write_hook_that_fails_is_named_and_nothing_is_written(
    project: Project, new: str, said: str
) -> None:
    """It was answered with "see `invoke history`", or, for a program that is not there,
    as a folder that could not be written to."""
    ini = project.root / "alembic.ini"
    old = "ruff_format.type = module\nruff_format.module = ruff\n"
    assert old in ini.read_text()
    ini.write_text(ini.read_text().replace(old, f"{new}\n"))
    before = sorted(project.versions.iterdir())

    result = project.invoke("makemigration", "add coupons", "--empty")

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: a post-write hook in alembic.ini failed ({said}): fix [post_write_hooks] "
        "there; nothing was written"
    ]
    assert sorted(project.versions.iterdir()) == before


def test_a_signal_during_the_post_write_hooks_leaves_no_revision_behind(project: Project) -> None:
    """The file was written, then left unformatted (its hooks cut short), for the next
    task to find as a revision nobody meant to keep."""
    ini = project.root / "alembic.ini"
    slow = (
        "[post_write_hooks]\nslow.type = exec\n"
        f"slow.executable = {sys.executable}\n"
        'slow.options = -c "import time; time.sleep(30)" REVISION_SCRIPT_FILENAME\n'
    )
    text = ini.read_text().replace("hooks = ruff_format", "hooks = slow, ruff_format")
    ini.write_text(text.replace("[post_write_hooks]\n", slow))
    before = sorted(project.versions.iterdir())
    run = popen(project, "makemigration", "add coupons", "--empty")
    err = run.when(lambda: list(project.versions.glob("*add_coupons.py")), "the file")

    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGINT)"
    assert sorted(project.versions.iterdir()) == before


@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        ("[handlers]\nkeys = console\n", "", "KeyError: 'handlers'"),
        ("level = WARNING\n", "level = LOUD\n", "ValueError: Unknown level: 'LOUD'"),
    ],
)
def test_broken_logging_sections_in_alembic_ini_are_named(
    project: Project, old: str, new: str, said: str
) -> None:
    """A missing section, or a level that is none, ended in a traceback."""
    ini = project.root / "alembic.ini"
    assert old in ini.read_text()
    ini.write_text(ini.read_text().replace(old, new))

    result = project.invoke("migrate")

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {ini} has broken logging sections ({said}): restore [loggers], [handlers] "
        "and [formatters] from the repository"
    )
    assert not (project.root / "var" / "dev.sqlite3").exists()


def test_makemigration_needs_a_message(project: Project) -> None:
    result = project.invoke("makemigration", "  ")
    assert result.returncode == 2  # a usage error, not a database's
    assert result.stderr.endswith(
        'error: a migration needs a message, e.g. invoke makemigration "add coupons"\n'
    )


@pytest.mark.parametrize(
    ("mistake", "said"),
    [
        ("coupon = Column(Integer", "SyntaxError: '(' was never closed"),
        ("import not_a_module", "ModuleNotFoundError: No module named 'not_a_module'"),
    ],
)
def test_models_that_cannot_be_imported_are_named_with_their_line(
    project: Project, mistake: str, said: str
) -> None:
    """A typo while editing the models was a traceback from makemigration, check and seed."""
    project.migrated()
    models = project.root / "db" / "models.py"
    line = len(models.read_text().splitlines()) + 1
    models.write_text(models.read_text() + mistake + "\n")

    for task in (("makemigration", "add coupons"), ("check",), ("seed",)):
        result = project.invoke(*task)
        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith(
            f"error: db/models.py, line {line} cannot be imported: {said}; fix it "
            "(makemigration, check and seed use the models)\n"
        )
    assert not list((project.root / "db" / "migrations" / "versions").glob("*coupons*"))


def test_makemigration_refuses_when_the_database_is_behind(project: Project) -> None:
    add_coupon_model(project)
    error = project.fails("makemigration", "add coupons")

    assert "not at head" in error
    assert "invoke migrate --env=dev" in error
    assert list(project.versions.glob("*_add_coupons.py")) == []


def test_status_lists_pending_revisions_in_order(project: Project) -> None:
    fresh = project.ok("status")
    assert "current: base" in fresh.stdout
    assert f"pending: 1\n  {head_revision()}  create shop tables" in fresh.stdout
    assert fresh.stderr.startswith("[dev] sqlite:///")

    project.migrated()
    project.ok("makemigration", "first extra", "--empty")
    project.ok("makemigration", "second extra", "--empty")
    result = project.ok("status")

    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"current: {head_revision()} (create shop tables")
    assert "second extra" in lines[1]
    assert lines[2] == "pending: 2"
    assert lines[3].endswith("first extra") and lines[4].endswith("second extra")


def test_only_migrate_makes_a_sqlite_file(project: Project) -> None:
    """A mistyped path (var/dve.sqlite3) read as "at base" and left a new empty file (and
    its folders) that the next migrate went on to fill, beside the real database."""
    project.write_env("typo", "DATABASE_URL=sqlite:///var/typo/dve.sqlite3\n")
    project.write_env("shops", "DATABASE_URL=sqlite:///var/shops/{target}.sqlite3\nTARGETS=a b\n")
    head = head_revision()

    status = project.ok("status", "--env=typo")
    others = (["history"], ["check"], ["status", "--json"], ["rollback"], ["seed"])
    for task in (*others, ["accept-changes", head], ["resolve", head, "--applied"]):
        project.invoke(*task, "--env=typo")
    project.ok("status", "--env=shops")

    assert "current: base (no revision applied)" in status.stdout
    assert status.stderr.endswith(
        "there is no database at var/typo/dve.sqlite3 yet: `invoke migrate --env=typo` makes it\n"
    )
    assert not (project.root / "var" / "typo").exists()
    assert not (project.root / "var" / "shops").exists()
    project.ok("migrate", "--env=typo")
    assert (project.root / "var" / "typo" / "dve.sqlite3").is_file()
    assert "there is no database" not in project.ok("status", "--env=typo").stderr


def test_history_is_newest_first_and_marks_applied(project: Project) -> None:
    project.migrated()
    project.ok("makemigration", "later", "--empty")

    lines = project.ok("history").stdout.splitlines()

    assert len(lines) == 2
    assert "  pending  later  (head)" in lines[0]
    assert lines[1].startswith(f"{head_revision()}  applied  create shop tables")


def test_envs_lists_dialects_and_masked_urls_without_secrets(project: Project) -> None:
    project.write_env("shops", "DATABASE_URL=sqlite:///var/{target}.sqlite3\nTARGETS=a b\n")
    result = project.ok("envs")

    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"dev", "staging", "prod", "shops"}
    assert "sqlite" in lines["dev"] and "(" not in lines["dev"]
    assert "postgresql+asyncpg://shop:***@prod-db.internal:5432/shop" in lines["prod"]
    assert lines["prod"].endswith("  (protected; PROD_DB_PASSWORD not set)")
    assert lines["shops"].endswith("/var/{target}.sqlite3  (a fleet)")


def test_envs_says_which_secrets_are_not_set_and_lists_a_url_that_is_one(
    project: Project,
) -> None:
    """A URL given whole by a variable (12-factor style) was an error row, "does not set
    DATABASE_URL", that failed the check; a variable unset inside one was listed as empty,
    a URL that is no one's. Secrets may be unset where the files are checked."""
    project.write_env("cloud", "DATABASE_URL=${CLOUD_DATABASE_URL}\nPROTECTED=true\n")
    project.write_env("qa", "DATABASE_URL=sqlite:///var/${QA_FILE}.sqlite3\n")

    result = project.ok("envs")

    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert (
        lines["cloud"]
        == "cloud      ?           ${CLOUD_DATABASE_URL}  (protected; CLOUD_DATABASE_URL not set)"
    )
    assert lines["qa"].endswith("/var/.sqlite3  (QA_FILE not set)")
    error = project.fails("offline-sql", "--env=cloud")
    assert "DATABASE_URL uses ${CLOUD_DATABASE_URL}, which is not set; export" in error
    url = "postgresql+asyncpg://shop@db.internal/shop"
    listed = project.ok("envs", CLOUD_DATABASE_URL=url).stdout
    assert f"cloud      postgresql  {url}  (protected)\n" in listed


def test_envs_lists_every_environment_and_fails_on_a_broken_one(project: Project) -> None:
    """``invoke envs`` as a CI check of the env files: a broken one fails it."""
    project.write_env("qa", "DATABASE_URL=sqlite:///var/qa.sqlite3\nPROTECTD=true\n")
    (project.root / "environments" / "ci.env").symlink_to("/run/secrets/ci.env")  # not there

    result = project.invoke("envs")

    assert result.returncode == 2, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"dev", "staging", "prod", "qa", "ci"}
    assert (
        "error: environments/qa.env: PROTECTD is no setting; did you mean PROTECTED?"
        in (lines["qa"])
    )
    assert (
        "error: cannot read environments/ci.env: it is a link to /run/secrets/ci.env"
        in (lines["ci"])
    )
    assert result.stderr == "error: 2 environment(s) cannot be loaded: see above\n"


def test_envs_with_no_environments_says_where_they_go(project: Project) -> None:
    for env_file in (project.root / "environments").iterdir():
        env_file.unlink()

    result = project.ok("envs")

    assert result.stdout == ""
    assert result.stderr == "no environments: add environments/NAME.env with DATABASE_URL=...\n"


def test_envs_never_shows_a_password(project: Project) -> None:
    result = project.ok("envs", PROD_DB_PASSWORD="s3cret-Pa55")
    assert "s3cret-Pa55" not in result.stdout + result.stderr
    assert "shop:***@prod-db.internal:5432/shop  (protected)\n" in result.stdout


def test_default_env_comes_from_invoke_config(project: Project) -> None:
    project.write_env("other", "DATABASE_URL=sqlite:///var/other.sqlite3\n")

    from_variable = project.ok("migrate", INVOKE_DB_ENV="other")
    assert from_variable.stderr.startswith("[other] ")
    assert (project.root / "var" / "other.sqlite3").exists()

    with (project.root / "invoke.yaml").open("a") as config:
        config.write("db:\n  env: other\n")
    assert project.ok("status").stderr.startswith("[other] ")
    assert project.ok("status", "--env=dev").stderr.startswith("[dev] ")


@pytest.mark.parametrize(
    ("written", "said"),
    [
        (
            "db:\n  env: [staging\n",  # YAML that does not parse: the line where it starts
            "error: invoke.yaml, line {last}: expected ',' or ']', but got '<stream end>': "
            "invoke cannot read its settings there; fix that YAML\n",
        ),
        (
            "db: staging\n",  # a value where invoke keeps settings
            "error: invoke's settings do not fit together (Can't cleanly merge <class 'dict'> "
            "({'env': 'dev', 'debug': False}) with <class 'str'> ('staging')): in invoke.yaml "
            "(or ~/.invoke.yaml), each of db: and tasks: holds settings, such as db: {env: "
            "dev}\n",
        ),
    ],
)
def test_invoke_settings_it_cannot_read_are_one_line(
    project: Project, written: str, said: str
) -> None:
    """invoke reads invoke.yaml before any task runs: a typo there ended every task with
    invoke's own traceback."""
    with (project.root / "invoke.yaml").open("a") as config:
        config.write(written)
    last = len((project.root / "invoke.yaml").read_text().splitlines())

    result = project.invoke("migrate")

    assert result.returncode == 2
    assert result.stderr == said.replace("{last}", str(last))
    assert "Traceback" in project.invoke("migrate", "--debug").stderr
    assert not (project.root / "var" / "dev.sqlite3").exists()


def test_local_env_file_overrides_a_key(project: Project) -> None:
    (project.root / "environments" / "dev.local.env").write_text(
        "DATABASE_URL=sqlite:///var/mine.sqlite3\n"
    )
    project.ok("migrate")
    assert (project.root / "var" / "mine.sqlite3").exists()
    assert not (project.root / "var" / "dev.sqlite3").exists()


def test_exported_database_url_does_not_redirect_an_environment(project: Project) -> None:
    elsewhere = project.root / "elsewhere.sqlite3"
    project.ok("migrate", DATABASE_URL=f"sqlite:///{elsewhere}")

    assert not elsewhere.exists()
    assert (project.root / "var" / "dev.sqlite3").exists()


def test_offline_sql_for_prod_needs_no_secret_and_no_server(project: Project) -> None:
    result = project.ok("offline-sql", "--env=prod")

    sql = result.stdout
    assert "CREATE TABLE alembic_version" in sql
    assert "CREATE TABLE users" in sql
    assert "TIMESTAMP WITH TIME ZONE DEFAULT now()" in sql  # PostgreSQL's dialect
    assert f"INSERT INTO alembic_version (version_num) VALUES ('{head_revision()}')" in sql
    assert sql.count("BEGIN;") == sql.count("COMMIT;") == 1
    assert "PROD_DB_PASSWORD" not in result.stderr


def test_offline_sql_range_and_output_file(project: Project) -> None:
    project.ok("makemigration", "add note", "--empty")
    out = project.root / "out.sql"

    project.ok("offline-sql", "-e", "prod", "--from", head_revision(), "-o", str(out))

    sql = out.read_text()
    assert "CREATE TABLE users" not in sql
    assert "UPDATE alembic_version SET version_num=" in sql


def test_offline_sql_of_an_empty_range_says_it_applies_nothing(project: Project) -> None:
    """--from=head wrote a file of session settings and said only "wrote the SQL": applied,
    it would read as the deploy done."""
    head = head_revision()
    note = (
        f"note: no revision lies between --from={head} and --to=head: the SQL only sets up "
        "the session and the audit table, and applies nothing\n"
    )

    printed = project.ok("offline-sql", "--env=prod", f"--from={head}")
    written = project.ok("offline-sql", "--env=prod", f"--from={head}", "--output=out.sql")
    some = project.ok("offline-sql", "--env=prod")

    assert "alembic_version" not in printed.stdout and printed.stderr == note
    assert written.stderr == f"wrote the SQL for prod to out.sql\n{note}"
    assert "note:" not in some.stderr
    project.write_env("shops", "DATABASE_URL=postgresql+asyncpg://s@db.invalid/shop_{target}\n")
    project.extend_env("shops", "TARGETS=alpha beta\n")
    fleet = project.ok("offline-sql", "--env=shops", f"--from={head}", "--output=each")
    assert fleet.stderr.endswith(f"beta.sql\n{note}") and fleet.stderr.count("note:") == 1


def test_a_colon_in_executed_sql_is_never_written_as_null(project: Project) -> None:
    """op.execute("... 'note :sale'") reads :sale as a parameter. offline-sql wrote the
    statement with 'note NULL' in it, and exited 0; online the revision failed with no
    word of why."""
    project.migrated()
    update = "op.execute(\"UPDATE categories SET name = 'note :sale' WHERE id = -1\")"
    project.add_revision("colon", revision("colon1", head_revision(), update))
    hint = (
        "in op.execute's SQL a colon before a word starts a parameter: write \\\\:word for a "
        "colon, or give its value with sa.text(...).bindparams(word=...)"
    )

    offline = project.invoke("offline-sql", "--env=prod", f"--from={head_revision()}")
    online = project.invoke("migrate")

    assert offline.returncode == 1 and "NULL" not in offline.stdout
    assert offline.stderr.endswith(
        "error: revision colon1 cannot be rendered as SQL offline: InvalidRequestError: A "
        "value is required for bind parameter 'sale', which offline SQL would write as NULL "
        f"({hint})\n"
    )
    assert online.returncode == 1 and f"bind parameter 'sale' ({hint})\n" in online.stderr
    assert version(project) == [head_revision()]
    escaped = update.replace(" :sale", " \\\\:sale")  # as the hint says
    project.add_revision("colon", revision("colon1", head_revision(), escaped))
    sql = project.ok("offline-sql", "--env=prod", f"--from={head_revision()}").stdout
    assert "SET name = 'note :sale' WHERE" in sql
    project.ok("migrate")


def test_debug_shows_the_traceback(project: Project) -> None:
    plain = project.invoke("migrate", "--env=nope")
    debug = project.invoke("migrate", "--env=nope", "--debug")
    variable = project.invoke("migrate", "--env=nope", INVOKE_DB_DEBUG="1")

    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and debug.returncode != 0
    assert "Traceback" in variable.stderr
    # and then the same last line and exit code, so a script run with --debug acts the same
    assert plain.returncode == debug.returncode == variable.returncode == 2
    assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]


def test_listing_the_tasks_imports_no_database_library() -> None:
    """Start-up stays light: only the tasks that touch a database import SQLAlchemy, Alembic
    and asyncpg. A fresh interpreter, as a user's shell starts one (not the tests' warm one)."""
    listed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "invoke", "--list"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in listed.stderr.splitlines()}

    assert "invoke" in imported and "migrate" in listed.stdout  # the listing really was made
    heavy = {"sqlalchemy", "alembic", "asyncpg", "db.commands", "db.engines"}
    assert not heavy & imported, sorted(heavy & imported)


def test_a_task_that_loads_alembic_leaves_pygments_unloaded(project: Project) -> None:
    """Mako (Alembic's templates) would import Pygments, only to colour HTML error pages that
    no task renders: 40 ms of each start-up. Mako's plain-text fallback renders revisions."""
    pygments = importlib.util.find_spec("pygments")
    assert pygments is not None  # installed here (pytest uses it), so Mako would load it
    code = (
        "import runpy, sys; sys.argv = ['invoke', 'makemigration', 'add notes', '--empty']\n"
        "try:\n    runpy.run_module('invoke', run_name='__main__')\n"
        "finally:\n    print(sorted(m for m in sys.modules if m.startswith('pygments')))"
    )
    made = subprocess.run(
        [sys.executable, "-c", code],
        cwd=project.root,
        env=project.environ,
        capture_output=True,
        text=True,
    )

    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().splitlines()[-1] == "[]"
    assert [p.name for p in (project.root / "db/migrations/versions").glob("*add_notes*.py")]


@pytest.mark.parametrize("dont_write", ["", "1"], ids=["default", "PYTHONDONTWRITEBYTECODE"])
def test_a_task_keeps_the_bytecode_of_what_it_loads_as_python_would(
    project: Project, dont_write: str
) -> None:
    """invoke turns bytecode caching off; the tasks give the choice back to Python's own
    setting, so a run does not compile the db package, env.py (once per fleet target) and
    every revision again. PYTHONDONTWRITEBYTECODE still wins. A fresh interpreter, as a
    user's shell starts one (the tests' warm one was started with its own setting)."""
    for cache in list(project.root.rglob("__pycache__")):
        shutil.rmtree(cache)
    migrated = project.start("migrate", env={"PYTHONDONTWRITEBYTECODE": dont_write}, **PIPES)
    _, err = migrated.communicate(timeout=120)

    assert migrated.returncode == 0, err
    written = {path.parent.relative_to(project.root) for path in project.root.rglob("*.pyc")}
    wanted = {Path("db/__pycache__"), Path("db/migrations/__pycache__")}
    wanted.add(Path("db/migrations/versions/__pycache__"))
    assert written == (set() if dont_write else wanted)


def test_every_task_and_flag_explains_itself() -> None:
    def invoke(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "invoke", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout

    listing = invoke("--list")
    tasks = re.findall(r"^  (\S+)", listing, re.MULTILINE)
    assert {
        "migrate",
        "rollback",
        "makemigration",
        "offline-sql",
        "status",
        "history",
        "envs",
        "check",
        "lint",
        "merge",
        "seed",
        "accept-changes",
        "reset",
        "restore",
    } <= set(tasks)
    meanings: dict[str, dict[str, list[str]]] = {}  # short flag -> long flag -> tasks
    for task in tasks:
        help_text = invoke("--help", task)
        docstring = help_text.split("Docstring:\n", 1)[1].split("\n\n", 1)[0].strip()
        assert docstring and docstring != "none", f"{task} has no docstring"
        summary = docstring.splitlines()[0]  # all that invoke --list shows
        assert summary.endswith("."), f"invoke --list cuts {task}'s summary short: {summary}"
        options = help_text.split("Options:\n", 1)[1] if "Options:" in help_text else ""
        for line in options.splitlines():
            if line.strip().startswith("-"):
                flag, _, text = line.strip().partition("   ")
                assert text.strip(), f"invoke {task}: {flag} has no help text"
        for letter, long in re.findall(r"^ +-(\w)\b.*?, --([\w-]+)", options, re.MULTILINE):
            meanings.setdefault(letter, {}).setdefault(long, []).append(task)
    # invoke gave each flag a letter its task had left: -o was --only or --output by task
    mixed = {letter: found for letter, found in meanings.items() if len(found) > 1}
    assert not mixed, f"a short flag means different flags in different tasks: {mixed}"
    assert meanings["o"] == {"output": ["offline-sql"]}


def test_offline_sql_for_sqlite(project: Project) -> None:
    sql = project.ok("offline-sql", "--env=dev").stdout
    assert "CREATE TABLE users" in sql
    # SQLite's dialect (SQLAlchemy before 2.1 puts the default in parentheses)
    assert re.search(r"created_at DATETIME DEFAULT \(?CURRENT_TIMESTAMP\)? NOT NULL", sql)
    assert "SET lock_timeout" not in sql


def test_offline_sql_of_a_batch_copy_on_sqlite_says_why_not_and_what_instead(
    project: Project,
) -> None:
    """SQLite's batch copy reads the table from the live database, so offline SQL cannot
    write it; Alembic said so in five lines about ``copy_from``, for a draft of a plain
    column change, in the task's default environment."""
    change = (
        'with op.batch_alter_table("products") as batch_op:\n'
        '        batch_op.alter_column("name", type_=sa.String(300))'
    )
    project.add_revision("longer", revision("longer1", head_revision(), change))

    error = project.fails("offline-sql", f"--from={head_revision()}")

    assert error.endswith(
        "error: revision longer1 cannot be rendered as SQL offline for SQLite: its batch block "
        "changes table products by copying it, which takes the live database to read the "
        "table from; apply it (`invoke migrate --env=dev`), or print its SQL for a PostgreSQL "
        "environment (`invoke offline-sql --env=prod`)\n"
    )
    sql = project.ok("offline-sql", "--env=prod", f"--from={head_revision()}").stdout
    assert "ALTER TABLE products ALTER COLUMN name TYPE VARCHAR(300);" in sql


def test_offline_sql_for_sqlite_records_when_it_is_applied(project: Project) -> None:
    """The audit row's time is the applying's, not the rendering's, as history shows it."""
    sql = project.ok("offline-sql", "--env=dev").stdout
    time.sleep(1.1)  # the SQL is applied later than it was rendered
    applied_after = datetime.now(timezone.utc).replace(microsecond=0)
    project.write_env("applied", "DATABASE_URL=sqlite:///var/applied.sqlite3\n")
    (project.root / "var").mkdir()
    with project.sqlite("var/applied.sqlite3") as connection:
        connection.executescript(sql)

    [line] = project.ok("history", "--env=applied").stdout.splitlines()
    when = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 by ", line)
    assert when is not None, line
    stamped = datetime.strptime(when[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    assert stamped >= applied_after


# A revision that ends its own transaction, then fails: the old recipe for statements that
# cannot run in a transaction, with a table made on each side of its COMMIT
OWN_COMMIT = (
    'op.execute("{word}")\n'
    '    op.create_table("leftover", sa.Column("id", sa.Integer))\n'
    '    raise RuntimeError("later in the revision")'
)
# ... or through its connection, with a table made before: committed, while the run said
# it rolled the revision back (``op.get_bind()`` never reaches SQLite as a statement)
OWN_CALL = (
    'op.create_table("leftover", sa.Column("id", sa.Integer))\n'
    "    op.get_bind().{call}()\n"
    '    raise RuntimeError("later in the revision")'
)
WORDS = ["COMMIT", "end", "  Rollback", "BEGIN"]
OWN_TRANSACTION = [
    *[(OWN_COMMIT.format(word=w), f"runs {w.split()[0].upper()}") for w in WORDS],
    *[(OWN_CALL.format(call=c), f"calls op.get_bind().{c}()") for c in ["commit", "rollback"]],
]


@pytest.mark.parametrize(("failure", "does"), OWN_TRANSACTION)
def test_a_revision_that_ends_its_own_transaction_is_refused_whole(
    project: Project, failure: str, does: str
) -> None:
    """Its COMMIT ended the run's transaction part way: what came before stayed, what came
    after ran outside any transaction, and the run said the revision was rolled back."""
    project.migrated()
    add_good_then_bad(project, failure)

    error = project.fails("migrate")

    assert f"revision bad001 {does} itself" in error
    if "ROLLBACK" in does.upper():  # a failed statement to go on from: a savepoint's work
        assert "use a savepoint: `with op.get_bind().begin_nested():`" in error
    else:
        assert "goes in `with op.get_context().autocommit_block():`" in error
    assert "the database is at good01; this run kept" in error
    assert "; bad001 was rolled back; fix it" in error
    assert version(project) == ["good01"]
    assert tables(project) == SHOP_TABLES | {"notes"}  # no coupons, no leftover


def test_a_revision_whose_session_rolls_its_transaction_back_is_refused(
    project: Project,
) -> None:
    """The revision's Session rolled back the run's one transaction, the revision went on,
    and the run said "BEGIN" (a statement it never ran) after a warning of SQLAlchemy's."""
    project.migrated()
    add_good_then_bad(project, SESSION_ROLLBACK)

    result = project.invoke("migrate")

    assert result.returncode == 1, result.stderr
    assert "revision bad001 rolled its transaction back part way (an ORM Session's " in (
        result.stderr
    )
    assert "use a savepoint: `with op.get_bind().begin_nested():`" in result.stderr
    # on SQLite that was the run's one transaction: good01's too, as the task says
    assert "the database is at f3af01bc3f27; good01 of this run did not commit" in (result.stderr)
    assert "warning" not in result.stderr
    assert version(project) == [head_revision()]
    assert tables(project) == SHOP_TABLES


ORM_DATA_MIGRATION = (
    'op.create_table("notes", sa.Column("id", sa.Integer))\n'
    "    session = Session(bind=op.get_bind())\n"
    '    session.execute(sa.text("insert into notes values (1)"))\n'
    "    session.commit()  # joins the revision's transaction, which it does not end"
)


@pytest.mark.parametrize("upgrade", [ORM_DATA_MIGRATION, SAVEPOINT_RECOVERY])
def test_a_revision_may_commit_an_orm_session_or_undo_to_a_savepoint(
    project: Project, upgrade: str
) -> None:
    """Neither ends the revision's transaction, so neither is refused."""
    project.migrated()
    body = revision("orm001", head_revision(), upgrade, message="fill notes")
    project.add_revision("orm", body.replace("import sqlalchemy as sa\n", ORM_IMPORTS))

    project.ok("migrate")

    assert version(project) == ["orm001"]
    with project.sqlite() as connection:
        assert connection.execute("select id from notes").fetchall() == [(1,)]


ORM_IMPORTS = "import sqlalchemy as sa\nfrom sqlalchemy.orm import Session\n"


def test_several_statements_in_one_execute_get_a_way_to_split_them(project: Project) -> None:
    project.migrated()
    add_good_then_bad(project, 'op.execute("create table a (x int); create table b (x int)")')

    error = project.fails("migrate")

    assert "You can only execute one statement at a time. (give each statement its own" in error
    assert version(project) == ["good01"]


def test_a_plain_string_given_to_the_connection_gets_the_way_to_run_it(project: Project) -> None:
    """SQLAlchemy 1.x ran ``connection.execute("UPDATE ...")``; 2 refuses it, in words that
    do not say what to write instead (data migrations copied from older code do this)."""
    project.migrated()
    add_good_then_bad(project, "op.get_bind().execute(\"UPDATE users SET username = 'x'\")")

    error = project.fails("migrate")

    assert (
        'ObjectNotExecutableError: Not an executable object: "UPDATE users SET username = '
        "'x'\" (SQLAlchemy 2 executes no plain string: wrap it in `sa.text(...)`)\n" in error
    )
    assert version(project) == ["good01"]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            'op.create_table("hosts", sa.Column("ip", postgresql.INET()))',
            "column hosts.ip is of type INET, which SQLite does not have: give the column a "
            "type SQLite has too, with INET as PostgreSQL's variant: sa.Text().with_variant("
            'postgresql.INET(...), "postgresql")',
        ),
        (
            'op.add_column("users", sa.Column("tags", postgresql.ARRAY(sa.Text())))',
            "a column is of type ARRAY, which SQLite does not have: give the column a type "
            "SQLite has too, with ARRAY as PostgreSQL's variant: sa.JSON().with_variant("
            'postgresql.ARRAY(...), "postgresql")',
        ),
        (
            'op.add_column("users", sa.Column("idle", postgresql.INTERVAL()))',
            "a column is of type INTERVAL, which SQLite does not have: give the column "
            "sa.Interval(), which is INTERVAL on PostgreSQL",
        ),
    ],
)
def test_a_column_type_sqlite_does_not_have_gets_the_variant_that_works(
    project: Project, change: str, said: str
) -> None:
    """SQLAlchemy said only that its compiler (named by its address in memory) could not
    render the type."""
    project.migrated()
    add_good_then_bad(project, f"from sqlalchemy.dialects import postgresql\n    {change}")

    error = project.fails("migrate")

    assert f"failed: {said} (in the models too)\n" in error
    assert version(project) == ["good01"]


BATCHED = "write it in a batch block, as drafts are (on SQLite it copies the table): with "


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            'op.alter_column("users", "username", nullable=False)',
            'OperationalError: near "ALTER": syntax error (SQLite cannot alter a column in '
            f'place: {BATCHED}op.batch_alter_table("users") as batch_op: '
            "batch_op.alter_column(...))",
        ),
        (
            'op.alter_column("users", "username", type_=sa.String(100))',
            'OperationalError: near "ALTER": syntax error (SQLite cannot alter a column in '
            f'place: {BATCHED}op.batch_alter_table("users") as batch_op: '
            "batch_op.alter_column(...))",
        ),
        (
            'op.create_table_comment("users", "who buys")',
            'OperationalError: near "COMMENT": syntax error (SQLite cannot keep a comment: '
            f'{BATCHED}op.batch_alter_table("users") as batch_op: '
            "batch_op.create_table_comment(...))",
        ),
        (
            'op.alter_column("users", "username", comment="their @name")',
            f"SQLite cannot keep a comment: {BATCHED}op.batch_alter_table(...) as batch_op: "
            "batch_op.alter_column(..., comment=...)",
        ),
    ],
)
def test_an_alteration_written_outside_a_batch_block_gets_the_batch_form(
    project: Project, change: str, said: str
) -> None:
    """A revision written by hand, as on PostgreSQL, failed on dev with SQLite's "near
    ALTER: syntax error", or with SQLAlchemy's words about its compiler's address."""
    project.migrated()
    add_good_then_bad(project, change)

    error = project.fails("migrate")

    assert f"failed: {said}\n" in error
    assert version(project) == ["good01"]
