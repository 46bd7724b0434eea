"""Review before production: check, merge, lint, JSON output and gating, seed data."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from conftest import (
    COUPON_MODEL,
    PgDatabase,
    Project,
    add_coupon_model,
    head_revision,
    pg_execute,
    pg_fetch,
    popen,
    revision,
    wait_until,
)

from db.generated_columns import expression

INDEX = 'op.execute("CREATE INDEX ix_users_username ON users (username)")'
REQUIRED = 'op.add_column("users", sa.Column("email", sa.String(100), nullable=False))'


def test_check_passes_on_a_migrated_database(project: Project) -> None:
    project.migrated()
    assert "check passed" in project.ok("check").stderr


def test_check_finds_drift_between_models_and_database(project: Project) -> None:
    project.ok("migrate")
    add_coupon_model(project)

    problems = failed_check(project)

    assert "the models and the database differ" in problems
    assert "add_table coupons" in problems
    assert "`invoke makemigration --env=dev` would write" in problems  # not another env's


DEFAULTS = """    description: Mapped[str] = mapped_column(Text, server_default="")
    on_sale: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    label: Mapped[str] = mapped_column(String(20), server_default="'new' it's")
    listed: Mapped[datetime] = mapped_column(server_default="2026-12-01")
"""


def give_defaults(project: Project) -> None:
    """Products get a boolean and a quoted server default (the empty one is there)."""
    models = project.root / "db" / "models.py"
    text = models.read_text().replace(
        "from sqlalchemy import (", "import sqlalchemy as sa\nfrom sqlalchemy import ("
    )
    models.write_text(text.replace(DEFAULTS.splitlines()[0] + "\n", DEFAULTS))


def relabel(project: Project, label: str) -> None:
    """The label's server default changed in the models."""
    models = project.root / "db" / "models.py"
    given = """server_default="'new' it's\""""
    models.write_text(models.read_text().replace(given, f"server_default={label!r}"))


def test_a_changed_server_default_is_found_and_written_as_the_models_give_it(
    project: Project,
) -> None:
    """Alembic compares no server defaults unless told to, so a changed one went unseen;
    told to, its SQLite comparison took the empty default ('') and one with a quote for
    changes. Its drafts wrote ``"'new' it's"`` as ``"new' it's"`` (a quote that starts or
    ends a string stripped), and ``sa.false()`` as SQLite's ``sa.text("0")``."""
    project.migrated()
    give_defaults(project)

    assert "add_column products on_sale; add_column products label" in failed_check(project)
    project.ok("makemigration", "defaults")
    [draft] = project.versions.glob("*_defaults.py")
    assert "server_default=sa.false()" in draft.read_text()
    assert """server_default="'new' it's\"""" in draft.read_text()
    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr

    relabel(project, "'new'")

    assert "would write: modify_default products label" in failed_check(project)
    project.ok("makemigration", "label")
    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr
    with project.sqlite() as db:
        db.execute("insert into categories (name) values ('c')")
        db.execute("insert into products (category_id, name, price) values (1, 'p', 1)")
        assert db.execute("select on_sale, label from products").fetchall() == [(0, "'new'")]


@pytest.mark.postgres
def test_server_defaults_drafted_against_sqlite_migrate_and_compare_on_postgres(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """Drafted against dev, ``sa.false()`` was ``sa.text("0")``, which PostgreSQL refuses
    for a boolean; and comparing a default with a quote in it broke Alembic's SQL there.
    A date the server reads back as a timestamp (``'2026-12-01 00:00:00+00'``) is the same
    default: the server compares it."""
    project = pg_project
    drafted_on_dev_run_on_ci(project, give_defaults, "defaults")

    pg_fetch(pg_database.dsn, "insert into categories (name) values ('c')")
    pg_fetch(pg_database.dsn, "insert into products (category_id, name, price) values (1, 'p', 1)")
    rows = pg_fetch(pg_database.dsn, "select on_sale, label from products")
    assert [tuple(row) for row in rows] == [(False, "'new' it's")]
    relabel(project, "it's")
    result = project.invoke("check", "--env=ci")
    assert result.returncode == 5, result.stderr
    assert "would write: modify_default products label" in result.stderr


LISTINGS = """

class Listing(Base):
    __tablename__ = "listings"

    id: Mapped[int] = mapped_column(primary_key=True)
    details: Mapped[dict[str, str]] = mapped_column(
        sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    )
    tags: Mapped[list[str]] = mapped_column(
        sa.JSON().with_variant(postgresql.ARRAY(sa.Text), "postgresql")
    )
    lasts: Mapped[timedelta]
"""


def add_listings(project: Project) -> None:
    """Listings in the models: PostgreSQL's JSONB and ARRAY where dev has JSON, and an
    interval (a timedelta)."""
    models_with(project, LISTINGS, "from datetime import timedelta")


def models_with(project: Project, classes: str, *imports: str) -> None:
    """The models with ``classes`` added, and ``sa``, ``postgresql`` and ``imports``
    imported."""
    models = project.root / "db" / "models.py"
    added = ["import sqlalchemy as sa", "from sqlalchemy.dialects import postgresql", *imports]
    text = models.read_text().replace(
        "from decimal import", "\n".join(added) + "\nfrom decimal import"
    )
    models.write_text(text + classes)


@pytest.mark.postgres
def test_postgresql_types_and_an_interval_drafted_against_sqlite_run_on_both(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """Drafted against dev, JSONB and ARRAY in a variant were written with a bare ``Text()``
    the revision never imports (NameError on both dialects), and ``sa.Interval`` as
    ``sa.DateTime()``: a timestamp column on PostgreSQL, where the models hold a timedelta."""
    project = pg_project
    drafted_on_dev_run_on_ci(project, add_listings, "listings")

    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr
    for env in ("dev", "ci"):
        assert "no changes" in project.ok("makemigration", f"--env={env}", "again").stderr
    typed = (
        "select column_name, udt_name from information_schema.columns "
        "where table_name = 'listings' and column_name <> 'id' order by column_name"
    )
    found = [tuple(row) for row in pg_fetch(pg_database.dsn, typed)]
    assert found == [("details", "jsonb"), ("lasts", "interval"), ("tags", "_text")]


DECORATED = """

class Money(TypeDecorator[Decimal]):
    impl = Numeric(12, 2)
    cache_ok = True


class Guid(TypeDecorator[uuid.UUID]):
    \"\"\"SQLAlchemy's backend-agnostic GUID recipe: a UUID on PostgreSQL, else CHAR(32).\"\"\"

    impl = sa.CHAR(32)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[uuid.UUID]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID())
        return dialect.type_descriptor(sa.CHAR(32))


class Tip(Base):
    __tablename__ = "tips"

    id: Mapped[int] = mapped_column(primary_key=True)
    amount: Mapped[Decimal] = mapped_column(Money())
    token: Mapped[uuid.UUID] = mapped_column(Guid())
"""


@pytest.mark.postgres
def test_type_decorators_of_the_models_are_drafted_as_the_types_they_store(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A column of a type decorator the models define was drafted as the decorator itself,
    ``db.models.Money(...)``, a name the revision never imports (NameError on both
    dialects), and which it must not, as the models change after it. The GUID recipe
    stores a UUID on PostgreSQL: that is its variant there."""
    project = pg_project
    drafted_on_dev_run_on_ci(project, lambda p: models_with(p, DECORATED, "import uuid"), "tips")

    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr
    for env in ("dev", "ci"):
        assert "no changes" in project.ok("makemigration", f"--env={env}", "again").stderr
    [draft] = project.versions.glob("*_tips.py")
    assert "models" not in draft.read_text()
    typed = (
        "select column_name, udt_name, numeric_precision, numeric_scale "
        "from information_schema.columns where table_name = 'tips' order by column_name"
    )
    found = [tuple(row) for row in pg_fetch(pg_database.dsn, typed)]
    assert found == [
        ("amount", "numeric", 12, 2),
        ("id", "int4", 32, 0),
        ("token", "uuid", None, None),
    ]


REFUNDS = """

class Status(TypeDecorator[str]):
    impl = sa.Enum("pending", "refunded", name="refund_status")
    cache_ok = True


class Refund(Base):
    __tablename__ = "refunds"

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(Status())
"""


@pytest.mark.postgres
def test_an_enum_behind_a_type_decorator_gets_its_type_dropped_with_its_table(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A decorator of the models over ``sa.Enum``: making the table made the enum's type
    on PostgreSQL, but the draft did not drop it with the table, so a rollback left it
    behind and the next migrate failed (type "refund_status" already exists)."""
    drafted_on_dev_run_on_ci(pg_project, lambda p: models_with(p, REFUNDS), "refunds")

    typed = "select typname from pg_type where typname = 'refund_status'"
    assert len(pg_fetch(pg_database.dsn, typed)) == 1


def identity_coupons(project: Project) -> Path:
    """Coupons in the models, with a key the database numbers as an identity column;
    returns the models' path."""
    models = project.root / "db" / "models.py"
    with_sa = "import sqlalchemy as sa\nfrom sqlalchemy import ("
    text = models.read_text().replace("from sqlalchemy import (", with_sa)
    key = "mapped_column(sa.Identity(), primary_key=True)"
    models.write_text(text + COUPON_MODEL.replace("mapped_column(primary_key=True)", key))
    return models


@pytest.mark.postgres
def test_an_identity_key_is_compared_on_both_dialects(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A key the models give ``Identity()``: on dev, check failed for good and each draft
    added it again (SQLite has no identity columns; its INTEGER PRIMARY KEY numbers rows),
    and on PostgreSQL check and makemigration ended in a traceback ('Identity' object has
    no attribute 'arg'). A changed identity is a change on PostgreSQL alone."""
    project = pg_project
    project.migrated()
    project.migrated("ci")
    models = identity_coupons(project)
    project.ok("makemigration", "coupons")

    for env in ("dev", "ci"):
        project.ok("migrate", f"--env={env}")
        assert "check passed" in project.ok("check", f"--env={env}").stderr
        again = project.ok("makemigration", f"--env={env}", "again")
        assert "no changes" in again.stderr
    models.write_text(models.read_text().replace("sa.Identity()", "sa.Identity(start=100)"))
    assert "check passed" in project.ok("check").stderr
    result = project.invoke("check", "--env=ci")
    assert result.returncode == 5, result.stderr
    assert "would write: modify_default coupons id" in result.stderr


PRICE_CHECK = """    __tablename__ = "products"
    __table_args__ = (sa.CheckConstraint("price >= 0", name="price_not_negative"),)
"""


def check_prices(project: Project, on: bool = True) -> None:
    """Products get a named CHECK constraint on their price (or lose it)."""
    models = project.root / "db" / "models.py"
    text = models.read_text()
    if "import sqlalchemy as sa" not in text:
        text = text.replace(
            "from sqlalchemy import (", "import sqlalchemy as sa\nfrom sqlalchemy import ("
        )
    first = PRICE_CHECK.splitlines()[0] + "\n"
    models.write_text(text.replace(first, PRICE_CHECK) if on else text.replace(PRICE_CHECK, first))


def test_a_named_check_constraint_is_compared_and_drafted(project: Project) -> None:
    """Alembic compares no CHECK constraints unless told to: one added to the models
    passed check, and makemigration wrote nothing. A draft that adds one is warned of, as
    it fails where a row already breaks it."""
    project.migrated()
    check_prices(project)

    assert "would write: add_constraint ck_products_price_not_negative" in failed_check(project)
    drafted = project.ok("makemigration", "price check")
    assert drafted.stderr.endswith(
        "warning: the revision adds CHECK constraint ck_products_price_not_negative to "
        "products, which fails where a row breaks it: mend those rows first, in the same "
        "revision\n"
    )
    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr
    with project.sqlite() as db:
        db.execute("insert into categories (name) values ('c')")
        with pytest.raises(sqlite3.IntegrityError, match="ck_products_price_not_negative"):
            db.execute("insert into products (category_id, name, price) values (1, 'p', -1)")

    check_prices(project, on=False)

    assert "would write: remove_constraint ck_products_price_not_negative" in failed_check(project)


@pytest.mark.postgres
def test_a_check_constraint_drafted_against_sqlite_holds_on_postgres(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    project = pg_project
    drafted_on_dev_run_on_ci(project, check_prices, "price check")

    pg_fetch(pg_database.dsn, "insert into categories (name) values ('c')")
    with pytest.raises(asyncpg.CheckViolationError, match="ck_products_price_not_negative"):
        pg_fetch(
            pg_database.dsn, "insert into products (category_id, name, price) values (1, 'p', -1)"
        )


def stock_as(project: Project, kind: str, python: str) -> None:
    """Products get a stock column of ``kind``, or have it changed to ``kind``."""
    models = project.root / "db" / "models.py"
    lines = [line for line in models.read_text().splitlines() if " stock: " not in line]
    at = next(n for n, line in enumerate(lines) if line.startswith("    file_id: "))
    lines.insert(at, f"    stock: Mapped[{python} | None] = mapped_column(sa.{kind})")
    text = "\n".join(lines) + "\n"
    if "import sqlalchemy as sa\n" not in text:
        text = text.replace(
            "from sqlalchemy import (", "import sqlalchemy as sa\nfrom sqlalchemy import ("
        )
    models.write_text(text)


OWN_CHECK = (
    "error: db/models.py: the type of products.stock makes its own CHECK constraint "
    "(create_constraint=True), which check cannot compare: leave it out, and give the table a "
    "named sa.CheckConstraint if it needs one"
)


def refused(project: Project, message: str, said: str) -> None:
    """check and makemigration refuse the models (exit 2), ending with ``said``, and no
    revision is written."""
    for task in (["check"], ["makemigration", message]):
        result = project.invoke(*task)
        assert "Traceback" not in result.stderr
        assert (result.returncode, result.stderr.splitlines()[-1]) == (2, said)
    assert not list(project.versions.glob(f"*_{message.replace(' ', '_')}.py"))


@pytest.mark.parametrize("named", ["", ', name="in_stock"'])
def test_a_check_constraint_a_columns_type_makes_is_refused_with_what_to_do(
    project: Project, named: str
) -> None:
    """``sa.Boolean(create_constraint=True)`` makes a CHECK constraint that the comparison
    by name cannot follow. Unnamed, check and makemigration ended in a traceback; named,
    check found a change on every run (a revision names it apart from the naming
    convention, and PostgreSQL makes none for a boolean). Without it, all is well."""
    project.migrated()
    stock_as(project, f"Boolean(create_constraint=True{named})", "bool")

    refused(project, "in stock", OWN_CHECK)

    stock_as(project, "Boolean", "bool")
    project.ok("makemigration", "in stock")
    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr


def test_a_column_type_sqlite_does_not_have_is_refused_with_the_variant_that_works(
    project: Project,
) -> None:
    """A list column as PostgreSQL's ARRAY was drafted without a word, and the draft failed
    on dev in SQLAlchemy's words (``Compiler <...SQLiteTypeCompiler object at 0x7f...>
    can't render element of type ARRAY``). check and makemigration refuse it, naming the
    variant that works on both; that one is drafted, migrated and matches."""
    project.migrated()
    stock_as(project, "ARRAY(sa.String(40))", "list[str]")

    refused(
        project,
        "in stock",
        "error: db/models.py: products.stock is of type ARRAY, which SQLite does not have, "
        "so a revision that makes it fails there: give the column a type SQLite has too, "
        "with ARRAY as PostgreSQL's variant: sa.JSON().with_variant(postgresql.ARRAY(...), "
        '"postgresql")',
    )

    stock_as(project, 'JSON().with_variant(sa.ARRAY(sa.String(40)), "postgresql")', "list[str]")
    project.ok("makemigration", "in stock")
    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr


VISITS = """

class Visit(Base):
    __tablename__ = "visits"
    __table_args__ = {"schema": "analytics"}

    id: Mapped[int] = mapped_column(primary_key=True)
"""


def test_a_table_that_names_its_schema_is_refused(project: Project) -> None:
    """Its draft failed on dev (``unknown database analytics``), and on PostgreSQL, where
    check reads the environment's schema alone, check drafted it again on every run."""
    project.migrated()
    models_with(project, VISITS)

    refused(
        project,
        "visits",
        "error: db/models.py: table visits names its schema (analytics), which SQLite has "
        "not, and which check would never find on PostgreSQL (it compares the environment's "
        "schema): leave it out, and SCHEMA in the env file places every table",
    )


def stocked(project: Project, kind: str, python: str) -> None:
    """Products get a stock column of ``kind``, drafted and migrated on dev."""
    stock_as(project, kind, python)
    project.ok("makemigration", "add stock")
    project.ok("migrate")


def restocked(project: Project, kind: str, python: str, message: str) -> str:
    """The stock column changed to ``kind`` in the models: what makemigration said."""
    stock_as(project, kind, python)
    return project.ok("makemigration", message).stderr


@pytest.mark.postgres
def test_a_text_column_drafted_as_a_number_on_sqlite_converts_on_postgres(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A draft made against dev changed a text column to a number with a bare
    alter_column: dev passed, and PostgreSQL refused it ("column "stock" cannot be cast
    automatically to type bigint"). The draft now says how, and a value that does not
    convert fails the revision there, leaving the column as it was."""
    project = pg_project
    project.migrated()
    project.migrated("ci")
    stocked(project, "String(10)", "str")
    project.ok("migrate", "--env=ci")
    pg_fetch(pg_database.dsn, "insert into categories (name) values ('c')")
    add = "insert into products (category_id, name, price, stock) values (1, 'p', 1, '{}')"
    pg_fetch(pg_database.dsn, add.format("12"))
    drafted = restocked(project, "BigInteger", "int", "stock as number")

    assert drafted.endswith(
        "warning: the revision converts column products.stock from VARCHAR(10) to BIGINT, "
        "which PostgreSQL does only when told how: the draft gives it "
        "postgresql_using='stock::BIGINT', which fails where a value does not convert "
        "(SQLite's copy converts it anyway, so dev passes): mend those values first, in the "
        "same revision\n"
    )
    project.ok("migrate")
    stock = "select stock, pg_typeof(stock)::text from products"
    for task, kept in (("migrate", (12, "bigint")), ("rollback", ("12", "character varying"))):
        project.ok(task, "--env=ci")
        assert [tuple(row) for row in pg_fetch(pg_database.dsn, stock)] == [kept]
    pg_fetch(pg_database.dsn, add.format("many"))

    failed = project.fails("migrate", "--env=ci")

    assert 'invalid input syntax for type bigint: "many"' in failed
    at = pg_fetch(pg_database.dsn, "select version_num from alembic_version")[0][0]
    assert f"the database is at {at}; " in failed
    assert pg_fetch(pg_database.dsn, f"{stock} order by id")[1][0] == "many"
    pg_fetch(pg_database.dsn, "update products set stock = '3' where stock = 'many'")
    project.ok("migrate", "--env=ci")
    assert "check passed" in project.ok("check", "--env=ci").stderr


def test_makemigration_warns_of_a_type_change_postgresql_refuses_and_not_of_one_it_makes(
    project: Project,
) -> None:
    """A boolean to a number takes an expression only its author knows; a number to a
    decimal PostgreSQL converts by itself."""
    project.migrated()
    stocked(project, "Boolean", "bool")
    counted = restocked(project, "Integer", "int", "stock as count")

    assert counted.endswith(
        "warning: the revision changes column products.stock from BOOLEAN to INTEGER, which "
        "PostgreSQL refuses without a USING expression (SQLite's copy converts anything, so "
        "dev passes): give the alter_column postgresql_using=..., an expression that turns "
        "stock into INTEGER\n"
    )
    [draft] = project.versions.glob("*_stock_as_count.py")
    assert "postgresql_using" not in draft.read_text()
    project.ok("migrate")
    priced = restocked(project, "Numeric(10, 2)", "Decimal", "stock as decimal")

    assert "warning" not in priced
    [draft] = project.versions.glob("*_stock_as_decimal.py")
    assert "type_=sa.Numeric(precision=10, scale=2)" in draft.read_text()
    assert "postgresql_using" not in draft.read_text()


UNNUMBERED = (
    "warning: the revision makes key {0} BIGINT on SQLite, which numbers new rows only in "
    "an INTEGER PRIMARY KEY, so on dev an insert with no id fails: give it the type "
    'sa.BigInteger().with_variant(sa.Integer(), "sqlite") in the models, and make the draft '
    "again{1}\n"
)
SEQUENCE = (
    "warning: the revision makes key users.id BIGINT, and on PostgreSQL a SERIAL key's "
    "sequence stays INTEGER, so new rows fail once its numbers run out: add "
    'op.execute("ALTER SEQUENCE users_id_seq AS BIGINT") under if '
    'op.get_context().dialect.name == "postgresql"\n'
)


def big_ids(project: Project, kind: str) -> None:
    """Users' ids become ``kind``."""
    models = project.root / "db" / "models.py"
    key = "    id: Mapped[int] = mapped_column({}primary_key=True)"
    users = '    __tablename__ = "users"\n\n'
    models.write_text(
        models.read_text()
        .replace(users + key.format(""), users + key.format(f"{kind}, "))
        .replace("from sqlalchemy import (", "import sqlalchemy as sa\nfrom sqlalchemy import (")
    )


def test_a_new_table_with_a_bigint_key_is_warned_of_as_sqlite_numbers_no_rows_in_it(
    project: Project,
) -> None:
    """SQLite numbers rows only in an INTEGER PRIMARY KEY: the revision ran on dev, and
    every insert that left the id to the database failed after it."""
    project.migrated()
    add_coupon_model(project)
    models = project.root / "db" / "models.py"
    key = "    id: Mapped[int] = mapped_column({}primary_key=True)\n    code:"
    models.write_text(models.read_text().replace(key.format(""), key.format("BigInteger, ")))

    drafted = project.ok("makemigration", "coupons")

    assert drafted.stderr.endswith(UNNUMBERED.format("coupons.id", ""))
    project.ok("migrate")
    with project.sqlite() as db, pytest.raises(sqlite3.IntegrityError, match="coupons.id"):
        db.execute("insert into coupons (code, percent_off) values ('TEN', 10)")


WORDED = (
    "warning: the revision gives column coupons.{} the server_default '{}', which SQLite "
    "keeps as text, read back as True whatever it says and matched by no filter on true or "
    "false: give it server_default=sa.{}() in the models, and make the draft again\n"
)


PERCENT = "    percent_off: Mapped[int]\n"


def coupons_with_flag(project: Project, default: str) -> Path:
    """Dev at head, and coupons in the models with an ``active`` flag whose server default
    is ``default`` (as written in the models); returns the models' path."""
    project.migrated()
    add_coupon_model(project)
    models = project.root / "db" / "models.py"
    flag = f"    active: Mapped[bool] = mapped_column(server_default={default})\n"
    models.write_text(models.read_text().replace(PERCENT, PERCENT + flag))
    return models


def active_coupon(project: Project) -> tuple[object, object]:
    """A coupon added with its ``active`` flag left to the server default, read back
    through SQLAlchemy on dev, and whether a filter on false finds it."""
    project.ok("migrate")
    with project.sqlite() as db:
        db.execute("insert into coupons (code, percent_off) values ('TEN', 10)")
    coupons = sa.Table("coupons", sa.MetaData(), sa.Column("active", sa.Boolean))
    engine = sa.create_engine(f"sqlite:///{project.root / 'var' / 'dev.sqlite3'}")
    with engine.connect() as db:
        read = db.scalar(sa.select(coupons.c.active))
        off = db.scalar(sa.select(sa.func.count()).where(coupons.c.active.is_(False)))
    engine.dispose()
    return read, off


def test_a_boolean_default_given_as_a_word_is_warned_of_as_sqlite_reads_it_true(
    project: Project,
) -> None:
    """``server_default="false"`` runs on both dialects, and is false on PostgreSQL; SQLite
    keeps the text 'false', so on dev every coupon was active, and none was found inactive."""
    models = coupons_with_flag(project, '"false"')

    drafted = project.ok("makemigration", "coupons")

    assert drafted.stderr.endswith(WORDED.format("active", "false", "false"))
    assert active_coupon(project) == (True, 0)
    project.ok("rollback")
    [draft] = project.versions.glob("*_coupons.py")
    draft.unlink()
    models.write_text(models.read_text().replace('default="false"', "default=false()"))
    models.write_text(models.read_text().replace("    func,\n", "    false,\n    func,\n"))

    again = project.ok("makemigration", "coupons")

    assert "warning" not in again.stderr
    assert active_coupon(project) == (False, 1)


def test_a_boolean_default_added_or_changed_to_a_word_is_warned_of(project: Project) -> None:
    """A column added with "Yes", and a default changed from "1" to "off", are each named
    with what means them on both; "1", a number to SQLite and true to PostgreSQL, is not."""
    models = coupons_with_flag(project, '"1"')
    assert "warning" not in project.ok("makemigration", "coupons").stderr
    project.ok("migrate")
    listed = '    listed: Mapped[bool] = mapped_column(server_default="Yes")\n'
    text = models.read_text().replace('default="1"', 'default="off"')
    models.write_text(text.replace(PERCENT, PERCENT + listed))

    drafted = project.ok("makemigration", "flags")

    changed, added = WORDED.format("active", "off", "false"), WORDED.format("listed", "Yes", "true")
    assert drafted.stderr.endswith(changed + added)


@pytest.mark.parametrize(
    ("default", "there"),
    [
        ('"now()"', "PostgreSQL reads once, when the table is made, giving every row that moment,"),
        ('"CURRENT_TIMESTAMP"', "PostgreSQL refuses (it is no moment),"),
    ],
)
def test_a_moments_default_given_as_the_word_for_now_is_warned_of(
    project: Project, default: str, there: str
) -> None:
    """``server_default="now()"`` is a string: PostgreSQL reads it once, as it makes the
    table, so every row gets the migration's moment (and refuses "CURRENT_TIMESTAMP"), and
    SQLite keeps the text. Written as SQL, ``sa.func.now()``, it is no warning."""
    project.migrated()
    seen = "    seen_at: Mapped[datetime] = mapped_column(server_default={})\n"
    first_name = "    first_name: Mapped[str | None] = mapped_column(String(128))\n"
    models = project.root / "db" / "models.py"
    text = models.read_text()
    models.write_text(text.replace(first_name, first_name + seen.format(default)))

    drafted = project.ok("makemigration", "seen at")

    said = default.replace('"', "'")  # as Python writes the string
    assert drafted.stderr.endswith(
        f"warning: the revision gives column users.seen_at the server_default {said}, which "
        f"{there} and SQLite keeps as text: give it server_default=sa.func.now() in the "
        "models, and make the draft again\n"
    )
    [draft] = project.versions.glob("*_seen_at.py")
    draft.unlink()
    models.write_text(text.replace(first_name, first_name + seen.format("func.now()")))
    assert "warning" not in project.ok("makemigration", "seen at").stderr


ACTIVE_CODES = """

class Coupon(Base):
    __tablename__ = "coupons"
    __table_args__ = (
        sa.Index("ix_coupons_code_active", "code", unique=True, postgresql_where=sa.text("active")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(32))
    slug: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    active: Mapped[bool] = mapped_column(server_default=sa.true())
"""
PARTIAL = (
    "warning: the revision makes unique index ix_coupons_code_active on coupons partial on "
    "PostgreSQL only (postgresql_where), so on SQLite it covers every row and refuses rows "
    "that PostgreSQL takes: give the index the same sqlite_where in the models, and make the "
    "draft again\n"
)


def test_a_unique_index_partial_on_postgresql_only_is_warned_of(project: Project) -> None:
    """One code may be active once, and inactive in any number of rows: on SQLite the
    index covered every row, so dev refused a second coupon that PostgreSQL took. A unique
    index on a table the same revision makes (``slug``) has no rows to break: it was
    warned of as one that fails where rows share a value."""
    project.migrated()
    models = project.root / "db" / "models.py"
    with_sa = "import sqlalchemy as sa\nfrom sqlalchemy import ("
    models.write_text(
        models.read_text().replace("from sqlalchemy import (", with_sa) + ACTIVE_CODES
    )

    drafted = project.ok("makemigration", "coupons")

    assert drafted.stderr.endswith(PARTIAL) and drafted.stderr.count("warning") == 1
    project.ok("migrate")
    add = "insert into coupons (code, slug, active) values ('TEN', ?, ?)"
    with project.sqlite() as db, pytest.raises(sqlite3.IntegrityError, match="coupons.code"):
        db.executemany(add, [("old", False), ("new", True)])
    project.ok("rollback")
    [draft] = project.versions.glob("*_coupons.py")
    draft.unlink()
    where = 'postgresql_where=sa.text("active")'
    models.write_text(models.read_text().replace(where, f'{where}, sqlite_where=sa.text("active")'))

    again = project.ok("makemigration", "coupons")

    assert "warning" not in again.stderr
    project.ok("migrate")
    with project.sqlite() as db:
        db.executemany(add, [("old", False), ("new", True)])
        with pytest.raises(sqlite3.IntegrityError, match="coupons.code"):
            db.execute(add, ("newer", True))


@pytest.mark.postgres
def test_a_key_made_bigint_is_warned_of_on_both_dialects_and_the_advice_works(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A SERIAL key made BIGINT keeps an INTEGER sequence on PostgreSQL, and is numbered
    no more on SQLite. What the warnings say to do makes both right."""
    project = pg_project
    project.migrated()
    project.migrated("ci")
    big_ids(project, "BigInteger")

    drafted = project.ok("makemigration", "big ids")

    on_postgres = " against a PostgreSQL --env (on SQLite it changes nothing)"
    assert drafted.stderr.endswith(UNNUMBERED.format("users.id", on_postgres) + SEQUENCE)
    assert drafted.stderr.count("warning") == 2  # purchases.user_id is no key
    [draft] = project.versions.glob("*_big_ids.py")
    draft.unlink()
    variant = 'sa.BigInteger().with_variant(sa.Integer(), "sqlite")'
    models = project.root / "db" / "models.py"
    models.write_text(models.read_text().replace("(BigInteger, primary", f"({variant}, primary"))

    again = project.ok("makemigration", "--env=ci", "big ids")

    assert again.stderr.endswith(SEQUENCE)
    [draft] = project.versions.glob("*_big_ids.py")
    sequence = (
        '    if op.get_context().dialect.name == "postgresql":\n'
        '        op.execute("ALTER SEQUENCE users_id_seq AS BIGINT")\n\n'
    )
    draft.write_text(draft.read_text().replace("    # ### end Alembic commands ###", sequence, 1))
    for env in ("dev", "ci"):
        project.ok("migrate", f"--env={env}")
        assert "check passed" in project.ok("check", f"--env={env}").stderr
    with project.sqlite() as db:
        db.execute("insert into users (telegram_id) values (1)")
    pg_fetch(pg_database.dsn, "insert into users (telegram_id) values (1)")
    typed = (
        "select seqtypid::regtype::text from pg_sequence where seqrelid = 'users_id_seq'::regclass"
    )
    assert pg_fetch(pg_database.dsn, typed)[0][0] == "bigint"


@pytest.mark.postgres
def test_a_telegram_id_narrowed_on_sqlite_fails_on_postgres_as_warned(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """``telegram_id: Mapped[int]`` without its BigInteger drafts BIGINT to INTEGER: dev
    holds any integer, and PostgreSQL refuses a Telegram id past 2147483647, as the
    warning says; the revision is rolled back whole."""
    project = pg_project
    project.migrated()
    project.migrated("ci")
    pg_fetch(pg_database.dsn, "insert into users (telegram_id) values (5000000000)")
    models = project.root / "db" / "models.py"
    models.write_text(
        models.read_text().replace("mapped_column(BigInteger, unique", "mapped_column(unique")
    )

    drafted = project.ok("makemigration", "int ids")

    assert "which fails on PostgreSQL where a value is outside INTEGER's range" in drafted.stderr
    project.ok("migrate")
    failed = project.fails("migrate", "--env=ci")
    assert "integer out of range" in failed
    assert f"the database is at {head_revision()}; " in failed
    typed = "select pg_typeof(telegram_id)::text, telegram_id from users"
    assert [tuple(row) for row in pg_fetch(pg_database.dsn, typed)] == [("bigint", 5000000000)]


def drafted_on_dev_run_on_ci(project: Project, edit: Callable[[Project], None], what: str) -> None:
    """The models edited, a draft made against dev (SQLite) and run on ci (PostgreSQL), up,
    down and up again: check passes there."""
    project.migrated()
    project.migrated("ci")
    edit(project)
    project.ok("makemigration", what)
    for task in ("migrate", "rollback", "migrate"):
        project.ok(task, "--env=ci")
    assert "check passed" in project.ok("check", "--env=ci").stderr


SALES = (
    'op.execute("CREATE VIEW sales AS SELECT p.name, count(*) AS sold FROM purchases u '
    'JOIN products p ON p.id = u.product_id GROUP BY p.name")'
)
FILE_ID = ("mapped_column(String(255))", "mapped_column(String(300))")
TITLE = (
    "name: Mapped[str] = mapped_column(String(200))",
    "title: Mapped[str] = mapped_column(String(200), server_default='')",
)


def viewed_products(project: Project, change: tuple[str, str], what: str) -> str:
    """A view of sales by product name on dev, then ``change`` (a line of the models, old
    and new) made to products and drafted; returns the draft's revision id."""
    project.migrated()
    project.add_revision("sales", revision("sales1", head_revision(), SALES, "sales view"))
    project.ok("migrate")
    models = project.root / "db" / "models.py"
    models.write_text(models.read_text().replace(*change))
    project.ok("makemigration", what)
    [draft] = project.versions.glob(f"*_{what.replace(' ', '_')}.py")
    return draft.stem.split("_")[1]


def sold(project: Project) -> tuple[list[object], list[tuple[object, ...]]]:
    """The revision dev is at, and what the view reads once a product is sold."""
    with project.sqlite() as db:
        db.execute("insert into users (telegram_id) values (1)")
        db.execute("insert into categories (name) values ('c')")
        db.execute("insert into products (category_id, name, price) values (1, 'p', 1)")
        db.execute(
            "insert into purchases (user_id, product_id, price, payment_id) values (1, 1, 1, 'x')"
        )
        at = [row[0] for row in db.execute("select version_num from alembic_version")]
        return at, db.execute("select * from sales").fetchall()


def test_a_table_a_view_reads_is_changed_on_sqlite_as_on_postgres(project: Project) -> None:
    """Batch mode drops the table and renames its copy; SQLite refused the rename while a
    view read the table ('error in view sales: no such table: main.products'), where
    PostgreSQL makes the change with the view in place."""
    longer = viewed_products(project, FILE_ID, "longer file ids")

    for task in ("migrate", "rollback", "migrate"):
        project.ok(task)

    assert sold(project) == ([longer], [("p", 1)])
    assert "check passed" in project.ok("check").stderr


def test_a_view_a_changed_table_breaks_fails_the_revision_with_what_to_do(
    project: Project,
) -> None:
    """A view that reads a column the change takes away would no longer work: PostgreSQL
    refuses such a change, and so does dev, naming the view and what to do."""
    titles = viewed_products(project, TITLE, "titles")

    error = project.fails("migrate")

    assert (
        f"upgrade of revision {titles} (titles) failed: OperationalError: view sales no "
        "longer works once table products is changed (no such column: p.name): drop the "
        "view before the change, in the same revision, and create it again after if it is "
        "still wanted"
    ) in error
    assert sold(project) == (["sales1"], [("p", 1)])


PRICE_LOG = (
    'op.execute("CREATE TABLE price_log (product_id INTEGER, price NUMERIC)")\n'
    '    op.execute("CREATE TRIGGER log_price AFTER UPDATE OF price ON products BEGIN '
    'INSERT INTO price_log VALUES (new.id, new.price); END")'
)


def batch_changed(project: Project, built: str, table: str, change: str) -> None:
    """Dev at head, then two revisions: ``built`` (what is built on ``table``), and a batch
    change of ``table`` (``change``: a batch_op call), which copies it on SQLite."""
    project.migrated()
    project.add_revision("built", revision("built1", head_revision(), built, "built on it"))
    changed = revision(
        "changed1",
        "built1",
        f'with op.batch_alter_table("{table}") as batch_op:\n        batch_op.{change}',
        f"changed {table}",
    )
    project.add_revision("changed", changed)


def test_a_trigger_on_a_table_batch_mode_copies_is_kept(project: Project) -> None:
    """Batch mode drops the table it copies, and its triggers with it: after a change to
    products, dev logged no price change any more, without a word."""
    batch_changed(project, PRICE_LOG, "products", 'alter_column("file_id", type_=sa.String(300))')

    for task in ("migrate", "rollback", "migrate"):
        project.ok(task)

    with project.sqlite() as db:
        db.execute("insert into categories (name) values ('c')")
        db.execute("insert into products (category_id, name, price) values (1, 'p', 1)")
        db.execute("update products set price = 2")
        assert db.execute("select * from price_log").fetchall() == [(1, 2)]
        [(made,)] = db.execute("select sql from sqlite_master where name = 'products'")
        assert "file_id VARCHAR(300)" in made


CASELESS = (
    'op.create_index("uq_users_username_lower", "users", [sa.text("lower(username)")], unique=True)'
)


def test_an_index_on_an_expression_is_kept_through_a_batch_copy(project: Project) -> None:
    """SQLAlchemy cannot reflect a SQLite index on an expression, so batch mode left out
    the one that keeps usernames unique whatever their case, with a warning that said only
    'Skipped unsupported reflection of expression-based index'."""
    batch_changed(project, CASELESS, "users", 'alter_column("first_name", type_=sa.String(200))')

    migrated = project.ok("migrate")

    assert "warning" not in migrated.stderr
    with project.sqlite() as db:
        db.execute("insert into users (telegram_id, username) values (1, 'Anna')")
        with pytest.raises(sqlite3.IntegrityError, match="uq_users_username_lower|username"):
            db.execute("insert into users (telegram_id, username) values (2, 'anna')")


def test_an_index_a_batch_change_breaks_fails_the_revision_with_what_to_do(
    project: Project,
) -> None:
    batch_changed(project, CASELESS, "users", 'drop_column("username")')

    error = project.fails("migrate")

    assert (
        "upgrade of revision changed1 (changed users) failed: OperationalError: index "
        "uq_users_username_lower no longer works once table users is changed (no such "
        "column: username): drop the index before the change, in the same revision, and "
        "create it again after if it is still wanted"
    ) in error
    with project.sqlite() as db:
        assert db.execute("select version_num from alembic_version").fetchall() == [("built1",)]


PRICE_RULE = (
    'with op.batch_alter_table("products") as batch_op:\n'
    '        batch_op.create_check_constraint("price_not_negative", "price >= 0")'
)


VAT_COLUMN = (
    'with op.batch_alter_table("products") as batch_op:\n'
    '        batch_op.add_column(sa.Column("price_with_vat", sa.Numeric(10, 2), '
    'sa.Computed("price * 1.2")))'
)
READERS = {  # what reads products.price, and the batch call that drops it
    "CHECK constraint price_not_negative": (
        PRICE_RULE,
        'drop_constraint("price_not_negative", type_="check")',
    ),
    "generated column price_with_vat": (VAT_COLUMN, 'drop_column("price_with_vat")'),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "change", ['alter_column("price", new_column_name="amount")', 'drop_column("price")']
)
def test_what_reads_a_column_a_batch_change_breaks_fails_the_revision_with_what_to_do(
    project: Project, reader: str, change: str
) -> None:
    """PostgreSQL follows a renamed column into a CHECK constraint, and drops the
    constraint with a dropped column (a generated column it refuses to leave behind);
    SQLite's copy failed with only 'no such column: price', naming none of the revision's
    own lines."""
    built, undo = READERS[reader]
    batch_changed(project, built, "products", change)

    error = project.fails("migrate")

    kind = reader.rsplit(" ", 1)[0]
    assert (
        f"upgrade of revision changed1 (changed products) failed: OperationalError: {reader} "
        "no longer works once table products is changed (no such column: price): drop the "
        f"{kind} before the change, in the same revision, and create it again after if it "
        "is still wanted\n"
        "the database is at built1; this run kept built1; changed1 was rolled back"
    ) in error
    dropped = (
        'with op.batch_alter_table("products") as batch_op:\n'
        f"        batch_op.{undo}\n"
        f"        batch_op.{change}"
    )
    project.add_revision("changed", revision("changed1", "built1", dropped))

    project.ok("migrate")


VAT = "    price_with_vat: Mapped[Decimal] = mapped_column(\n"
VAT += '        Numeric(10, 2), sa.Computed("price * 1.2")\n    )\n'


def test_a_table_with_a_generated_column_is_copied_by_batch_mode_with_it(
    project: Project,
) -> None:
    """Batch mode's copy of a SQLite table wrote its generated column too, which SQLite
    refuses, so every later change of the table failed on dev; and SQLAlchemy read back
    the expression of a NUMERIC(10, 2) column empty, so the copy was made ``AS ()`` (a
    syntax error), and check warned on every run that the expression could not change."""
    project.migrated()
    project.ok("seed")
    models_with(project, "")
    models = project.root / "db" / "models.py"
    file_id = "    file_id: Mapped[str | None] = mapped_column(String(255))"
    text = models.read_text()
    models.write_text(text.replace(file_id, VAT + file_id, 1))
    project.ok("makemigration", "price with vat")
    project.ok("migrate")
    assert "Computed" not in project.ok("check").stderr
    models.write_text(models.read_text().replace(*FILE_ID))

    project.ok("makemigration", "longer file ids")  # a change that copies products
    project.ok("migrate")

    with project.sqlite() as connection:
        rows = connection.execute("select price, price_with_vat from products").fetchall()
        [sql] = connection.execute("select sql from sqlite_master where name = 'products'")
    assert rows and all(vat == pytest.approx(float(price) * 1.2) for price, vat in rows)
    assert "price_with_vat NUMERIC(10, 2) NOT NULL GENERATED ALWAYS AS (price * 1.2)" in sql[0]
    assert "file_id VARCHAR(300)" in sql[0]
    checked = project.ok("check").stderr
    assert "check passed" in checked and "Computed" not in checked
    project.ok("rollback")  # copied back


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("price_with_vat", "price * 1.2"),
        ("PRICE_WITH_VAT", "price * 1.2"),
        ('odd "name"', "round(price, 2)"),
        ("br", "'a,b' || name"),
        ("bt", "CAST(price AS NUMERIC(10, 2))"),
        ("price", None),
        ("id", None),
        ("nowhere", None),
    ],
)
def test_a_generated_columns_expression_is_read_whole(name: str, found: str | None) -> None:
    sql = (
        'CREATE TABLE "odd (table" (\n'
        "  id INTEGER NOT NULL,\n"
        "  price NUMERIC(10, 2) NOT NULL, price_with_vat NUMERIC(10, 2) AS (price * 1.2),\n"
        '  "odd ""name""" NUMERIC(10,2) CHECK (price > 0) GENERATED ALWAYS AS (round(price, 2)),\n'
        "  [br] TEXT AS ('a,b' || name) VIRTUAL,\n"
        "  `bt` TEXT GENERATED ALWAYS AS ( CAST(price AS NUMERIC(10, 2)) ) STORED,\n"
        "  CONSTRAINT pk PRIMARY KEY (id)\n"
        ")"
    )

    assert expression(sql, name) == found


CASELESS_MODEL = (
    '\nsa.Index("ix_users_lower_username", sa.func.lower(User.username), unique=True)\n'
)


def caseless_usernames(project: Project) -> None:
    """The models make usernames unique whatever their case, with an index on lower()."""
    models_with(project, CASELESS_MODEL)


@pytest.mark.postgres
def test_an_index_on_an_expression_added_to_the_models_is_drafted_against_sqlite(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """SQLAlchemy cannot reflect a SQLite index on an expression, so a draft made on dev
    left out the one the models added, with a warning that it could not be compared, and
    check passed there; PostgreSQL then lacked it, and its check failed. It is compared by
    name on SQLite now."""
    project = pg_project
    project.migrated("ci")
    project.migrated()
    caseless_usernames(project)
    assert "would write: add_index ix_users_lower_username" in failed_check(project)

    drafted = project.ok("makemigration", "caseless")

    assert "compared" not in drafted.stderr
    for env, task in [("ci", "migrate"), ("ci", "rollback"), ("ci", "migrate"), ("dev", "migrate")]:
        project.ok(task, f"--env={env}")
    for env in ("dev", "ci"):
        assert "check passed" in project.ok("check", f"--env={env}").stderr
    for env in ("dev", "ci"):
        again = project.ok("makemigration", f"--env={env}", "again").stderr
        assert "no changes" in again and "warning" not in again
    pg_fetch(pg_database.dsn, "insert into users (telegram_id, username) values (1, 'Anna')")
    with pytest.raises(asyncpg.UniqueViolationError, match="ix_users_lower_username"):
        pg_fetch(pg_database.dsn, "insert into users (telegram_id, username) values (2, 'anna')")


def test_an_index_on_an_expression_taken_out_of_the_models_is_drafted_and_comes_back(
    project: Project,
) -> None:
    """One the models no longer have was left in the database by a draft made on dev, as
    check passed. It is dropped now, and a rollback makes it again as it was, partial."""
    project.migrated()
    partial = (
        "CREATE UNIQUE INDEX ix_users_first ON users (lower(first_name), id DESC) "
        "WHERE (username IS NOT NULL)"
    )
    with project.sqlite() as db:
        db.execute(partial)

    assert "would write: remove_index ix_users_first" in failed_check(project)
    project.ok("makemigration", "no first")
    project.ok("migrate")
    assert "check passed" in project.ok("check").stderr
    made = "select sql from sqlite_master where name = 'ix_users_first'"
    with project.sqlite() as db:
        assert db.execute(made).fetchall() == []
    project.ok("rollback", "--yes")
    with project.sqlite() as db:
        assert db.execute(made).fetchall() == [(partial,)]


INDEXED = """
    __table_args__ = (
        sa.Index("ix_products_lower_name", sa.func.lower(sa.column("name"))),
        sa.Index("ix_products_cheap", "price", sqlite_where=sa.text("price < 10")),
    )
    stock: Mapped[int] = mapped_column(server_default=sa.text("(0)"))
"""


def test_indexes_a_table_copy_cannot_make_are_made_after_it_in_a_block_of_their_own(
    project: Project,
) -> None:
    """An index on an expression, or partial, drafted in the batch block of a change that
    copies the table on SQLite: the copy failed on the first (KeyError: 'lower(name)') and
    dropped the WHERE of the second (Alembic's issue #1112). Each is made after the copy."""
    project.migrated()
    products = '    __tablename__ = "products"\n'
    models = project.root / "db" / "models.py"
    models_with(project, "")
    models.write_text(models.read_text().replace(products, products + INDEXED.lstrip("\n")))

    project.ok("makemigration", "stock")
    project.ok("migrate")
    project.ok("rollback")
    project.ok("migrate")

    assert "check passed" in project.ok("check").stderr
    with project.sqlite() as db:
        made = dict(db.execute("select name, sql from sqlite_master where type = 'index'"))
    assert made["ix_products_cheap"].endswith("WHERE price < 10")
    assert "lower(name)" in made["ix_products_lower_name"]


SEARCHED = (
    '    __tablename__ = "products"\n'
    "    __table_args__ = (\n"
    '        sa.Index("ix_products_search", {}, postgresql_using="gin"),\n'
    "    )\n"
)
TSVECTOR = 'sa.func.to_tsvector("english", sa.column("name"))'


@pytest.mark.parametrize("expression", [TSVECTOR, "sa.text(\"to_tsvector('english', name)\")"])
def test_an_index_on_an_expression_sqlite_cannot_build_is_left_to_postgresql(
    project: Project, expression: str
) -> None:
    """A full-text index: SQLite has no to_tsvector, so dev cannot have it. Compared by name,
    it was drafted there, and the draft failed on dev; as a function of SQLAlchemy's, the
    draft was not even written (a traceback: 'english' as a REGCONFIG has no SQL literal).
    It is left out, with a warning saying how to make it on PostgreSQL alone."""
    project.migrated()
    models_with(project, "")
    models = project.root / "db" / "models.py"
    products = '    __tablename__ = "products"\n'
    models.write_text(models.read_text().replace(products, SEARCHED.format(expression)))

    warned = "warning: index ix_products_search of products is on an expression SQLite cannot "
    assert warned in project.ok("check").stderr
    drafted = project.ok("makemigration", "search").stderr
    assert warned in drafted and "no changes" in drafted


@pytest.mark.postgres
def test_comparing_an_expression_sqlalchemy_cannot_write_is_an_error_not_a_traceback(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """On PostgreSQL, Alembic compiles the models' index expression to compare it: the
    REGCONFIG of func.to_tsvector("english", ...) has no SQL literal, and check and
    makemigration ended in a traceback. The error says to write it as text."""
    project = pg_project
    project.migrated("ci")
    pg_execute(
        pg_database.dsn,
        "CREATE INDEX ix_products_search ON products USING gin (to_tsvector('english', name))",
    )
    models_with(project, "")
    models = project.root / "db" / "models.py"
    products = '    __tablename__ = "products"\n'
    models.write_text(models.read_text().replace(products, SEARCHED.format(TSVECTOR)))

    for task in (["check", "--env=ci"], ["makemigration", "--env=ci", "search"]):
        result = project.invoke(*task)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.endswith(
            "error: db/models.py has an expression that cannot be written as SQL here "
            "(CompileError: No literal value renderer is available for literal value "
            "\"'english'\" with datatype REGCONFIG): give it as sa.text(...) in the models, "
            "e.g. an index on sa.text(\"to_tsvector('english', name)\")\n"
        )
    models.write_text(
        models.read_text().replace(TSVECTOR, "sa.text(\"to_tsvector('english', name)\")")
    )
    assert "check passed" in project.ok("check", "--env=ci").stderr


@pytest.mark.postgres
def test_postgres_changes_a_table_a_view_reads_and_refuses_a_change_that_breaks_it(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """What dev now does with a view over a changed table is what PostgreSQL does."""
    project = pg_project
    project.migrated("ci")
    viewed_products(project, FILE_ID, "longer file ids")
    for task in ("migrate", "rollback", "migrate"):
        project.ok(task, "--env=ci")
    project.ok("migrate")
    models = project.root / "db" / "models.py"
    models.write_text(models.read_text().replace(*TITLE))
    project.ok("makemigration", "titles")

    error = project.fails("migrate", "--env=ci")

    assert "cannot drop column name of table products because other objects depend on it" in error
    assert pg_fetch(pg_database.dsn, "select count(*) from sales")[0][0] == 0


def failed_check(project: Project) -> str:
    result = project.invoke("check")
    assert result.returncode == 5, result.stderr
    return result.stderr


def test_check_finds_pending_revisions_heads_and_edited_files(project: Project) -> None:
    assert "1 revision(s) pending" in failed_check(project)
    project.ok("migrate")
    [initial] = project.versions.glob(f"*_{head_revision()}_*.py")
    initial.write_text(initial.read_text() + "\nEDITED = True\n")  # code: it counts
    assert "changed after revision" in failed_check(project)
    project.add_revision("h1", revision("head1", head_revision()))
    project.add_revision("h2", revision("head2", head_revision()))
    assert "2 heads (head1, head2): run `invoke merge`" in failed_check(project)


def test_merge_joins_two_heads(project: Project) -> None:
    project.add_revision("h1", revision("head1", head_revision()))
    project.add_revision("h2", revision("head2", head_revision()))
    assert "2 heads: run `invoke merge`" in project.ok("status").stdout

    result = project.ok("merge", "--message=join branches")

    [merged] = project.versions.glob("*_join_branches.py")
    assert f"wrote db/migrations/versions/{merged.name}" in result.stderr
    assert "Revises: head1, head2" in merged.read_text()
    project.migrated()
    assert "pending: none" in project.ok("status").stdout
    assert "only one head" in project.fails("merge")


def test_status_json_and_check_for_deploy_scripts(project: Project) -> None:
    pending = project.invoke("status", "--json", "--check")
    assert pending.returncode == 5
    data = json.loads(pending.stdout)
    assert data["environment"] == "dev"
    assert data["current"] == [] and data["up_to_date"] is False
    assert data["pending"] == [
        {
            "id": head_revision(),
            "transactional": True,
            "message": "create shop tables: users, categories, products, purchases",
        }
    ]
    assert data["heads"] == data["pending"]

    project.migrated()
    done = project.ok("status", "--json", "--check")
    assert json.loads(done.stdout)["up_to_date"] is True


def test_history_json(project: Project) -> None:
    project.migrated()
    project.ok("makemigration", "later", "--empty")

    later, first = json.loads(project.ok("history", "--json").stdout)

    assert later["applied"] is False and later["is_head"] is True
    assert later["applied_at"] is None and later["applied_by"] is None
    assert first["revision"]["id"] == head_revision() and first["applied"] is True
    assert first["applied_at"].endswith("+00:00") and "@" in first["applied_by"]


def test_the_bundled_revisions_lint_clean(project: Project) -> None:
    result = project.ok("lint", "--env=prod", "--all")
    assert "no findings" in result.stderr and result.stdout == ""


def test_lint_catches_a_blocking_index_and_a_required_column(project: Project) -> None:
    project.add_revision("ix", revision("idx001", head_revision(), INDEX, message="index"))
    project.add_revision("nn", revision("req001", "idx001", REQUIRED, message="email"))

    result = project.invoke("lint", "--env=prod", "--all")

    assert result.returncode == 5
    assert "idx001: require-concurrent-index-creation" in result.stdout
    assert "    CREATE INDEX ix_users_username ON users (username);" in result.stdout
    assert "req001: adding-required-field" in result.stdout
    assert "2 finding(s)" in result.stderr


def test_a_squawk_ignore_comment_excuses_one_statement(project: Project) -> None:
    excused = 'op.execute("-- squawk-ignore require-concurrent-index-creation\\n' + INDEX[12:]
    project.add_revision("ix", revision("idx001", head_revision(), excused))
    assert "no findings" in project.ok("lint", "--env=prod", "--all").stderr


def test_a_squawk_config_it_cannot_read_fails_the_lint(project: Project) -> None:
    """squawk exits 1 on a broken .squawk.toml, with no findings on stdout: read as "[]",
    it passed the lint of a revision with a blocking index."""
    project.add_revision("ix", revision("idx001", head_revision(), INDEX, message="index"))
    (project.root / ".squawk.toml").write_text("excluded_rules = [ not toml\n")

    result = project.invoke("lint", "--env=prod", "--all")

    assert result.returncode == 2, result.stderr
    assert "error: .squawk.toml: squawk cannot read it: Configuration error" in result.stderr
    assert "no findings" not in result.stderr


@pytest.mark.parametrize("flags", [[], ["--all"]])
def test_lint_needs_a_postgresql_environment(project: Project, flags: list[str]) -> None:
    """Refused before the pending revisions are read: it said first that the dev database
    was not there yet, then that it was not the kind lint takes."""
    result = project.invoke("lint", "--env=dev", *flags)
    assert result.returncode == 2
    assert result.stderr.endswith(
        "error: lint checks PostgreSQL SQL: dev is not a PostgreSQL environment\n"
    )
    assert "no database" not in result.stderr


@pytest.mark.postgres
def test_lint_of_pending_revisions_and_the_protected_plan(
    project: Project, pg_database: PgDatabase
) -> None:
    project.write_env("pg", f"DATABASE_URL={pg_database.url}\nPROTECTED=true\n")
    project.migrated("pg")
    project.add_revision("ix", revision("idx001", head_revision(), INDEX, message="index"))

    pending = project.invoke("lint", "--env=pg")
    plan = project.invoke("migrate", "--env=pg")

    assert pending.returncode == 5 and "idx001: require-concurrent-index-creation" in pending.stdout
    assert "1 finding(s)" in pending.stderr
    assert plan.returncode == 4
    assert "lint: 1 finding(s)" in plan.stderr
    assert "idx001: require-concurrent-index-creation" in plan.stderr


def test_seed_fills_the_dev_database_once(project: Project) -> None:
    project.migrated()
    first = project.ok("seed")
    again = project.ok("seed")

    assert "added 3 users, 3 categories, 4 products, 3 purchases" in first.stderr
    assert "dev: the sample shop is already there: nothing added" in again.stderr
    with project.sqlite() as connection:
        assert connection.execute("select count(*) from purchases").fetchone() == (3,)


def test_seed_refuses_protected_and_unmigrated_databases(project: Project) -> None:
    project.write_env("safe", "DATABASE_URL=sqlite:///var/safe.sqlite3\nPROTECTED=true\n")
    refused = project.invoke("seed", "--env=safe")
    assert refused.returncode == 4 and "seed data is for development databases" in refused.stderr
    unmigrated = project.fails("seed")
    assert unmigrated.endswith(
        "cannot seed dev: it has no database yet (run `invoke migrate --env=dev` first)\n"
    )
    assert not (project.root / "var" / "dev.sqlite3").exists()  # no empty file left behind
    project.write_env("empty", "DATABASE_URL=sqlite:///var/empty.sqlite3\n")
    (project.root / "var").mkdir()
    (project.root / "var" / "empty.sqlite3").touch()  # a file, but no tables
    assert "run `invoke migrate --env=empty` first" in project.fails("seed", "--env=empty")


def test_a_seed_that_fails_on_a_migrated_database_does_not_say_to_migrate(
    project: Project,
) -> None:
    project.migrated()
    project.extend_env("dev", "CONNECT_TIMEOUT=0.2\n")
    with project.sqlite() as blocker:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the file

        error = project.fails("seed")

    assert error.endswith(
        "cannot seed dev: database is locked (nothing was added)\nanother connection keeps the "
        "SQLite file locked (the app writing a large transaction, or a migration?): run it "
        "again when it is done\n"
    ), error
    with project.sqlite() as connection:
        assert connection.execute("select count(*) from users").fetchone() == (0,)


@pytest.mark.postgres
def test_seed_through_asyncpg(project: Project, pg_database: PgDatabase) -> None:
    project.write_env("pg", f"DATABASE_URL={pg_database.url}\n")
    project.migrated("pg")
    project.ok("seed", "--env=pg")
    rows = pg_fetch(pg_database.dsn, "select sum(price) as total from purchases")
    assert str(rows[0]["total"]) == "3430.00"


@pytest.mark.postgres
def test_a_seed_that_another_seed_beats_to_a_row_looks_again(
    project: Project, pg_database: PgDatabase
) -> None:
    """Seeds run at once (each replica of an app seeding as it starts): the one that lost
    the race to a row failed with `duplicate key` and exit 1, although the shop was there."""
    project.write_env("pg", f"DATABASE_URL={pg_database.url}\n")
    project.migrated("pg")
    other = subprocess.Popen(  # another seed, under way: its first user not yet committed
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pg_database.dsn],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert other.stdin is not None
        other.stdin.write("begin;\n")
        other.stdin.write("insert into users (telegram_id, first_name) values (100001, 'Anna');\n")
        other.stdin.flush()
        wait_until(lambda: sessions(pg_database, "state = 'idle in transaction'"), "its insert")
        run = popen(project, "seed", "--env=pg")
        wait_until(lambda: sessions(pg_database, "wait_event_type = 'Lock'"), "a wait", process=run)
        other.stdin.write("commit;\n")
        other.stdin.close()
        _, err = run.communicate(timeout=60)
    finally:
        other.terminate()
        other.wait(timeout=10)

    assert run.returncode == 0, err
    assert "pg: added 2 users, 3 categories, 4 products, 3 purchases" in err
    assert pg_fetch(pg_database.dsn, "select count(*) as n from users")[0]["n"] == 3


def sessions(database: PgDatabase, where: str) -> list[object]:
    """The database's other sessions that match ``where`` (on pg_stat_activity)."""
    query = "select pid from pg_stat_activity where datname = current_database() and "
    return pg_fetch(database.dsn, query + where)
