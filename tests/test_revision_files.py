"""Revision files: any message makes a file that parses, and a broken history names its files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Project, head_revision, revision, version

from db.revision_files import declared, models_imported

HEAD = head_revision()
AWKWARD = ['say """hi"""', "C:\\Users\\shop", "weird \\N escape", 'ends with "quote"']


def test_any_message_makes_a_revision_that_parses_and_reads_back_the_same(
    project: Project,
) -> None:
    for message in AWKWARD:
        project.ok("makemigration", "--empty", f"--message={message}")

    history = project.ok("history").stdout
    for message in AWKWARD:
        assert f"pending  {message}" in history
    for path in project.versions.glob("*.py"):
        compile(path.read_text(), str(path), "exec")


def test_a_message_on_several_lines_is_one_line_in_every_listing(project: Project) -> None:
    """Pasted with its line break, a message made the listings' lines break in two."""
    project.ok("makemigration", "--empty", "--message=add coupons\n\tand their\r\nlimits ")

    history = project.ok("history").stdout
    assert "pending  add coupons and their limits  (head)\n" in history
    [written] = project.versions.glob("*_add_coupons_and_their_limits.py")
    assert written.read_text().startswith('"""add coupons and their limits\n')

    docstring = "Backfill prices\n   for old products\n\nRevision ID: by hand"  # written by hand
    project.add_revision(
        "backfill", revision("backfill", written.name.split("_")[1], "pass", docstring)
    )
    migrated = project.ok("migrate").stderr
    assert "applying backfill  Backfill prices for old products...\n" in migrated
    assert "backfill  applied  Backfill prices for old products  (head)  [" in (
        project.ok("history").stdout
    )


def test_an_empty_revision_keeps_its_imports(project: Project) -> None:
    project.ok("makemigration", "--empty", "--message=backfill")

    [written] = [p for p in project.versions.glob("*backfill.py")]
    text = written.read_text()
    assert "import sqlalchemy as sa" in text
    assert "from alembic import op" in text


@pytest.mark.parametrize("task", ["status", "history", "migrate", "merge", "offline-sql"])
def test_two_files_with_one_id_are_an_error_naming_both(project: Project, task: str) -> None:
    project.add_revision("copy", revision(HEAD, None))

    result = project.invoke(task)

    assert result.returncode == 2, result.stderr
    assert f"revision id {HEAD} is in two files" in result.stderr
    assert "db/migrations/versions/copy.py" in result.stderr
    assert f"_{HEAD}_create_shop_tables.py" in result.stderr
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr


def test_a_revision_in_a_folder_below_versions_is_named_not_left_out(project: Project) -> None:
    """Alembic does not look below versions/: a revision moved into versions/2026/ was left
    out, and status said nothing was pending. A helper module there may stay."""
    project.migrated()
    (project.versions / "2026").mkdir()
    (project.versions / "2026" / "next.py").write_text(revision("next01", HEAD))
    (project.versions / "helpers").mkdir()
    (project.versions / "helpers" / "common.py").write_text("BATCH = 500\n")

    for task in ("status", "migrate"):
        error = project.fails(task)
        assert error.endswith(
            "error: db/migrations/versions/2026/next.py is a revision in a folder below "
            "db/migrations/versions, where Alembic does not look for revisions: move it up "
            "into that folder\n"
        )
    (project.versions / "2026" / "next.py").rename(project.versions / "next.py")
    assert "next01" in project.ok("migrate").stderr


def test_a_parent_no_file_has_names_the_file_and_the_id(project: Project) -> None:
    project.add_revision("orphan", revision("orphan1", "nothere0001"))

    error = project.fails("status")

    assert (
        "db/migrations/versions/orphan.py: down_revision 'nothere0001' names no revision" in error
    )
    assert "KeyError" not in error


@pytest.mark.parametrize("written", ["None", "''", "12"])
def test_a_file_whose_revision_is_no_id_is_named(project: Project, written: str) -> None:
    """``revision = None`` failed as "'NoneType' object is not iterable"; ``''`` was taken,
    a revision with no id to migrate to."""
    text = revision("placeholder", HEAD).replace(
        'revision = "placeholder"', f"revision = {written}"
    )
    project.add_revision("noid", text)

    result = project.invoke("status")

    assert result.returncode == 2, result.stderr
    said = f"db/migrations/versions/noid.py: `revision = {written}` is no revision id: give it one"
    assert said in result.stderr and "Traceback" not in result.stderr


def test_a_revision_id_longer_than_the_version_table_holds_is_named(project: Project) -> None:
    """SQLite takes a 33-character id into alembic_version; PostgreSQL refuses it after the
    revision ran. Refused on every database, before anything runs."""
    long_id = "add_coupons_for_the_spring_sale_1"  # 33
    project.add_revision("long", revision(long_id, HEAD, "pass"))

    result = project.invoke("migrate")

    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(
        f"error: db/migrations/versions/long.py: revision id '{long_id}' is 33 characters, and "
        "the version table holds 32 (PostgreSQL would refuse it after the revision ran; "
        "SQLite would not, so dev would pass): shorten it, in `revision =`, in its file name "
        "and in the down_revision that names it\n"
    )
    assert not (project.root / "var" / "dev.sqlite3").exists()  # refused before connecting
    project.add_revision("long", revision(long_id[:32], HEAD, "pass"))
    project.ok("migrate")
    assert version(project) == [long_id[:32]]


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("import not_a_module", "ModuleNotFoundError: No module named 'not_a_module'"),
        ("raise SystemExit(2)", "SystemExit: 2"),  # a script's main, as the file loads
    ],
)
def test_a_revision_that_cannot_be_imported_is_named(
    project: Project, line: str, said: str
) -> None:
    project.add_revision(
        "broken",
        revision("broken1", HEAD, "pass").replace(
            "import sqlalchemy as sa", f"import sqlalchemy as sa\n{line}"
        ),
    )

    error = project.fails("status")

    assert error.endswith(
        f"error: db/migrations/versions/broken.py, line 5 cannot be loaded: {said}\n"
    )


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (
            b"",
            " declares no `revision =`: each .py file in its folder is read as a revision; "
            "restore it, or move it out of that folder",
        ),
        (
            b"x = 1\x00\n",
            " is not valid Python (source code string cannot contain null bytes): fix it, or "
            "restore it from the repository",
        ),
        (
            b'revision = "cut1"\ndef upgrade(\n',
            ", line 2, is not valid Python ('(' was never closed): fix it, or restore it from "
            "the repository",
        ),
    ],
)
def test_a_revision_file_cut_short_or_emptied_is_named(
    project: Project, content: bytes, said: str
) -> None:
    """An emptied file got Alembic's "Could not determine revision id ... Upgrading from
    Alembic 0.1 to 0.2", and a NUL byte or a file cut short a SyntaxError without its path."""
    (project.root / "db" / "migrations" / "versions" / "cut.py").write_bytes(content)

    result = project.invoke("status")

    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(f"error: db/migrations/versions/cut.py{said}\n")


def test_a_revision_file_that_is_not_utf8_is_named(project: Project) -> None:
    """Python loads it when the odd byte is in a comment; reading it for its plan was a
    UnicodeDecodeError traceback."""
    text = revision("latin1", HEAD, "pass").replace("import sqlalchemy as sa", "# café")
    (project.root / "db" / "migrations" / "versions" / "latin.py").write_bytes(
        text.encode("latin-1")
    )

    result = project.invoke("status")

    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(
        "error: db/migrations/versions/latin.py is not UTF-8 text (byte "
        f"{text.index('é')}): save it as UTF-8\n"
    )


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("down_revision = 42", "`down_revision = 42` is no revision id: write the id of"),
        ('depends_on = "nothere"', "depends_on 'nothere' names no revision file and no branch"),
    ],
)
def test_a_reference_alembic_cannot_follow_is_named(project: Project, line: str, said: str) -> None:
    """Alembic said only ``TypeError: sequence item 0: expected str instance, int found``
    or ``KeyError: 'nothere'``, naming no file."""
    text = revision("refs01", HEAD, "pass")
    if line.startswith("down_revision"):
        text = text.replace(f"down_revision = {HEAD!r}", line)
    else:
        text = text.replace("depends_on = None", line)
    project.add_revision("refs", text)

    result = project.invoke("status")

    assert result.returncode == 2, result.stderr
    assert f"error: db/migrations/versions/refs.py: {said}" in result.stderr


def test_down_revisions_that_go_round_in_a_circle_are_named(project: Project) -> None:
    """Alembic said only "CycleDetected: Cycle is detected in revisions (...)", naming no
    file and nothing to do; a revision after the circle is not part of it."""
    project.migrated()
    project.add_revision("one", revision("one001", "three3", "pass"))
    project.add_revision("two", revision("two002", "one001", "pass"))
    project.add_revision("three", revision("three3", ("two002", HEAD), "pass"))
    project.add_revision("four", revision("four04", "three3", "pass"))

    for task in ("migrate", "status"):
        result = project.invoke(task)

        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith(
            "error: down_revision goes round in a circle (one001 -> three3 -> two002 -> "
            "one001), in db/migrations/versions/one.py, db/migrations/versions/three.py, "
            "db/migrations/versions/two.py: point one of them at the revision before it\n"
        )
    assert version(project) == [HEAD]

    project.add_revision("two", revision("two002", "two002", "pass"))  # its own parent

    assert project.fails("status").endswith(
        "error: down_revision goes round in a circle (two002 -> two002), in "
        "db/migrations/versions/two.py: point it at the revision before it\n"
    )

    project.add_revision("two", revision("two002", "one001", "pass"))
    project.add_revision(  # Alembic: only "DependencyCycleDetected: ..."
        "one", revision("one001", HEAD).replace("depends_on = None", 'depends_on = "four04"')
    )
    assert project.fails("status").endswith(
        "error: down_revision and depends_on go round in a circle (four04 -> three3 -> "
        "two002 -> one001 -> four04), in db/migrations/versions/four.py, "
        "db/migrations/versions/three.py, db/migrations/versions/two.py, "
        "db/migrations/versions/one.py: take the revision out of depends_on, or point a "
        "down_revision at the revision before it\n"
    )


def test_depends_on_a_branch_label_is_followed(project: Project) -> None:
    labelled = revision("feat01", HEAD, "pass").replace(
        "branch_labels = None", 'branch_labels = ("feature",)'
    )
    needing = revision("need01", HEAD, "pass").replace(
        "depends_on = None", 'depends_on = "feature"'
    )
    project.add_revision("feat", labelled)
    project.add_revision("need", needing)

    assert "pending:" in project.ok("status").stdout


@pytest.mark.parametrize("function", ["upgrade", "downgrade"])
def test_a_revision_file_without_its_two_functions_is_named(
    project: Project, function: str
) -> None:
    """A file without downgrade() migrated, and its rollback ended in an AttributeError
    traceback; without upgrade() the migrate did."""
    project.migrated()
    text = revision("nofn01", HEAD, "pass").replace(f"def {function}()", f"def _{function}()")
    project.add_revision("nofn", text)

    for task in ("migrate", "rollback", "status"):
        result = project.invoke(task)
        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith(
            f"error: db/migrations/versions/nofn.py has no {function}() function: add one (a "
            "downgrade that cannot undo the revision raises NotImplementedError, saying why)\n"
        )
    assert version(project) == [HEAD]


@pytest.mark.parametrize("ini", [None, "[alembic]\n"])
def test_a_missing_or_broken_alembic_ini_is_named(project: Project, ini: str | None) -> None:
    path = project.root / "alembic.ini"
    if ini is None:
        path.unlink()
    else:
        path.write_text(ini)

    for task in ("status", "makemigration", "offline-sql"):
        args = ("makemigration", "--empty", "x") if task == "makemigration" else (task,)
        result = project.invoke(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.endswith(
            f"error: {path} is {'missing' if ini is None else 'broken'} (No 'script_location' "
            "key found in configuration): restore it from the repository\n"
        )


def test_declared_reads_ids_without_importing(tmp_path: object) -> None:

    versions = Path(str(tmp_path))
    (versions / "a.py").write_text(revision("aaa1", None))
    (versions / "b.py").write_text(
        revision("bbb1", "aaa1").replace("import sqlalchemy", "import x")
    )
    (versions / "m.py").write_text(
        'revision: str = "mmm1"\ndown_revision: tuple[str, ...] | None = ("aaa1", "bbb1")\n'
    )

    assert declared(versions) == {
        versions / "a.py": ("aaa1", ()),
        versions / "b.py": ("bbb1", ("aaa1",)),
        versions / "m.py": ("mmm1", ("aaa1", "bbb1")),
    }


# A data migration written against the app's models, as it is tempting to
BACKFILL_THROUGH_THE_MODELS = """from sqlalchemy.orm import Session
    from db.models import User

    session = Session(bind=op.get_bind())
    for user in session.query(User).filter(User.username.is_(None)):
        user.username = f"user{user.telegram_id}"
    session.flush()"""


def test_a_revision_that_imports_the_models_is_found_by_check_and_named_when_it_fails(
    project: Project,
) -> None:
    """A data migration that reads ``db.models`` passes on every database it has already
    run on, and fails on each new one (a new shop, a reset) once a later revision adds a
    column to a table it reads: the models describe the tables at head, not at its turn."""
    backfill = revision("backfill1", HEAD, BACKFILL_THROUGH_THE_MODELS, "backfill usernames")
    project.add_revision("backfill", backfill)
    project.ok("migrate")
    project.ok("seed")
    models = project.root / "db" / "models.py"
    text = models.read_text()
    first_name = "    first_name: Mapped[str | None] = mapped_column(String(128))\n"
    language = "    language: Mapped[str | None] = mapped_column(String(8))\n"
    models.write_text(text.replace(first_name, first_name + language, 1))
    add = 'op.add_column("users", sa.Column("language", sa.String(8)))'
    project.add_revision("language", revision("language1", "backfill1", add, "user language"))
    project.ok("migrate")

    found = project.invoke("check")

    assert found.returncode == 5, found.stderr
    assert (
        "db/migrations/versions/backfill.py, line 14, imports db.models: the models describe "
        "the tables as the newest revision leaves them" in found.stderr
    )
    assert 'give it its own `sa.table("users", sa.column("id"), ...)`' in found.stderr

    error = project.fails("reset")  # a new database: the backfill reads users.language

    assert (
        "upgrade of revision backfill1 (backfill usernames) failed: OperationalError: no such "
        "column: users.language (the revision imports db.models, which describe the tables "
        "as the newest revision leaves them, not as this one finds them" in error
    )
    assert f"the database is at {HEAD}; this run kept {HEAD}; backfill1 was rolled back" in error
    assert version(project) == [HEAD]


@pytest.mark.parametrize(
    ("line", "found"),
    [
        ("from db.models import User", 5),
        ("from db import models", 5),
        ("import db.models as m", 5),
        ("from db.models.shop import User", 5),
        ("from db import seed, models as m", 5),
        ("from db import modelsx", None),
        ("import dbx.models", None),
        ("from .models import User", None),
        ("x = 1  # not db.models: a column's type is copied instead", None),
        ("from db.model import User", None),
    ],
)
def test_each_way_of_importing_the_models_is_found_and_nothing_else(
    tmp_path: Path, line: str, found: int | None
) -> None:
    path = tmp_path / "r.py"
    path.write_text(f'"""a revision"""\n\n\ndef upgrade() -> None:\n    {line}\n')

    assert models_imported(path) == found
