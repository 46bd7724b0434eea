"""Acceptance: the invoke tasks against a real PostgreSQL server, through asyncpg."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    SAVEPOINT_RECOVERY,
    SESSION_ROLLBACK,
    PgDatabase,
    Project,
    add_good_then_bad,
    cluster,
    free_port,
    head_revision,
    need,
    pg_execute,
    pg_fetch,
    revision,
    tcp_server,
)
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.postgres

SHOP_TABLES = {"users", "categories", "products", "purchases"}


def pg_tables(database: PgDatabase) -> set[str]:
    rows = pg_fetch(database.dsn, "select tablename from pg_tables where schemaname = 'public'")
    return {row["tablename"] for row in rows} - {"alembic_version", "migration_log"}


def pg_version(database: PgDatabase) -> list[str]:
    if "alembic_version" not in {
        r["tablename"] for r in pg_fetch(database.dsn, "select tablename from pg_tables")
    }:
        return []
    return [row["version_num"] for row in pg_fetch(database.dsn, "select * from alembic_version")]


def test_up_to_head_down_to_base_and_up_again(pg_project: Project, pg_database: PgDatabase) -> None:
    up = pg_project.ok("migrate", "--env=ci")
    assert up.stderr.startswith(f"[ci] {pg_database.url}")
    assert f"applied {head_revision()}" in up.stderr
    # a new connection sees head: the run really committed
    assert pg_tables(pg_database) == SHOP_TABLES
    assert pg_version(pg_database) == [head_revision()]

    pg_project.ok("rollback", "--env=ci", "--to=base")
    assert pg_tables(pg_database) == set()
    assert pg_version(pg_database) == []

    pg_project.ok("migrate", "--env=ci")
    assert pg_tables(pg_database) == SHOP_TABLES


def test_a_url_with_several_hosts_tries_them_in_turn(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """SQLAlchemy's form for several hosts, ``?host=A:port&host=B:port``: the query's one
    option that may come more than once. The first host here has nothing listening."""
    url = make_url(pg_database.url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    hosts = f"host=127.0.0.1:{closed}&host={url.host}:{url.port or 5432}"
    pg_project.write_env(
        "ci", f"DATABASE_URL=postgresql+asyncpg://{url.username}@/{url.database}?{hosts}\n"
    )

    pg_project.ok("migrate", "--env=ci")

    assert pg_version(pg_database) == [head_revision()]
    assert "pending: none" in pg_project.ok("status", "--env=ci").stdout


def test_status_history_and_makemigration_on_postgres(pg_project: Project) -> None:
    assert "pending: 1" in pg_project.ok("status", "--env=ci").stdout
    pg_project.migrated("ci")

    status = pg_project.ok("status", "--env=ci").stdout
    assert f"current: {head_revision()}" in status and "pending: none" in status
    assert "applied" in pg_project.ok("history", "--env=ci").stdout
    # the models and the PostgreSQL schema agree: autogenerate finds nothing to write
    assert "no changes" in pg_project.ok("makemigration", "noop", "--env=ci").stderr


STATUS_COLUMN = """    payment_id: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(
        sa.Enum("pending", "paid", "refunded", name="purchase_status"), server_default="paid"
    )
"""
COUPONS_WITH_ENUMS = """

class Coupon(Base):
    __tablename__ = "coupons"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.Enum("percent", "fixed", name="coupon_kind"))
    state: Mapped[str] = mapped_column(
        sa.Enum("pending", "paid", "refunded", name="purchase_status")
    )
"""


def test_enum_columns_made_against_sqlite_migrate_on_postgres_both_ways(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """Alembic's drafts leave PostgreSQL's enum types out: a column added with a new
    ``sa.Enum`` failed there ("type purchase_status does not exist") after passing on
    dev's SQLite, a table made with a type already there failed ("already exists"), and a
    rollback left its types behind, so the next migrate failed."""
    project, models = pg_project, pg_project.root / "db" / "models.py"
    original = models.read_text()
    project.migrated()
    project.migrated("ci")

    def types() -> set[str]:
        rows = pg_fetch(pg_database.dsn, "select typname from pg_type where typtype = 'e'")
        return {row["typname"] for row in rows}

    def both_ways(env: str) -> None:
        for task in ("migrate", "rollback", "migrate"):
            project.ok(task, f"--env={env}")

    edited = original.replace(
        "from sqlalchemy import (", "import sqlalchemy as sa\nfrom sqlalchemy import ("
    )
    models.write_text(edited.replace(STATUS_COLUMN.splitlines()[0] + "\n", STATUS_COLUMN))
    project.ok("makemigration", "purchase status")  # against dev, on SQLite
    both_ways("dev")
    project.ok("rollback", "--env=dev")
    assert "CREATE TYPE purchase_status AS ENUM ('pending', 'paid', 'refunded');\n" in (
        project.ok("offline-sql", "--env=ci", f"--from={head_revision()}").stdout
    )
    project.ok("migrate", "--env=ci")
    assert types() == {"purchase_status"}
    project.ok("rollback", "--env=ci")
    assert types() == set()
    both_ways("ci")

    project.ok("migrate")
    models.write_text(models.read_text() + COUPONS_WITH_ENUMS)
    project.ok("makemigration", "coupons")
    both_ways("dev")
    project.ok("migrate", "--env=ci")
    assert types() == {"purchase_status", "coupon_kind"}
    project.ok("rollback", "--env=ci")
    assert types() == {"purchase_status"}  # the purchases still use it
    both_ways("ci")

    models.write_text(edited)  # both gone again, compared with PostgreSQL this time
    project.ok("makemigration", "no enums", "--env=ci")
    project.ok("migrate", "--env=ci")
    assert types() == set()
    project.ok("rollback", "--env=ci")
    assert types() == {"purchase_status", "coupon_kind"}
    both_ways("ci")
    assert types() == set()
    assert "check passed" in project.ok("check", "--env=ci").stderr


def test_an_enum_value_added_to_the_models_is_named_by_check_and_makemigration(
    pg_project: Project,
) -> None:
    """Autogenerate compares an enum column's type by name only: with a value added to the
    models, check passed and makemigration said the models matched the database, until
    the app wrote the value and PostgreSQL refused it."""
    project, models = pg_project, pg_project.root / "db" / "models.py"
    original = models.read_text()
    edited = original.replace(
        "from sqlalchemy import (", "import sqlalchemy as sa\nfrom sqlalchemy import ("
    )
    two = STATUS_COLUMN.replace('"paid", "refunded"', '"paid"')
    models.write_text(edited.replace(STATUS_COLUMN.splitlines()[0] + "\n", two))
    project.migrated()
    project.ok("makemigration", "purchase status")
    project.ok("migrate")
    project.migrated("ci")
    models.write_text(edited.replace(STATUS_COLUMN.splitlines()[0] + "\n", STATUS_COLUMN))
    said = (
        "the enum type purchase_status holds pending, paid in the database and pending, "
        "paid, refunded in the models, which autogenerate does not compare: write that "
        "change by hand (ALTER TYPE purchase_status ADD VALUE 'refunded')\n"
    )
    files = set(project.versions.iterdir())

    checked = project.invoke("check", "--env=ci")
    drafted = project.ok("makemigration", "refunded", "--env=ci")

    assert checked.returncode == 5, checked.stderr
    assert f"  {said}check failed: 1 problem(s)\n" in checked.stderr
    assert drafted.stderr.endswith(
        f"no changes: none that autogenerate writes, so no revision was written\nwarning: {said}"
    )
    assert set(project.versions.iterdir()) == files
    sqlite_draft = project.ok("makemigration", "refunded")  # against dev: a longer text
    assert sqlite_draft.stderr.endswith(
        "warning: the revision changes column purchases.status to the enum type "
        "purchase_status, as SQLite keeps an enum as text: on PostgreSQL it adds no value "
        "(ALTER TYPE ... ADD VALUE does), and its downgrade turns the column into text; make "
        "this draft with a PostgreSQL --env, or write it by hand\n"
    )
    for path in set(project.versions.iterdir()) - files:
        path.unlink()
    add_value = (
        'if op.get_context().dialect.name == "postgresql":\n'
        "        op.execute(\"ALTER TYPE purchase_status ADD VALUE 'refunded'\")"
    )
    [status] = project.versions.glob("*_purchase_status.py")
    project.add_revision("refunded", revision("refund", status.name.split("_")[1], add_value))
    project.migrated("ci")
    assert "check passed" in project.ok("check", "--env=ci").stderr

    models.write_text(
        models.read_text().replace('"paid", "refunded"', '"paid", "disputed", "refunded"')
    )
    hint = "ALTER TYPE purchase_status ADD VALUE 'disputed' BEFORE 'refunded'"
    assert f"write that change by hand ({hint})\n" in project.invoke("check", "--env=ci").stderr
    add_value = f'if op.get_context().dialect.name == "postgresql":\n        op.execute("{hint}")'
    project.add_revision("disputed", revision("dispute", "refund", add_value))
    project.migrated("ci")
    assert "check passed" in project.ok("check", "--env=ci").stderr  # the hint's SQL does it
    models.write_text(models.read_text().replace('"pending", "paid"', '"paid"'))
    assert (
        "write that change by hand (ALTER TYPE purchase_status RENAME VALUE renames one; one "
        "removed, or the order changed, takes a new type)\n"
    ) in project.invoke("check", "--env=ci").stderr


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        ('op.execute("select 1/0")', ["division by zero"]),
        # the driver's words hide the way out; the message adds it
        (
            'op.execute("create index concurrently ix_coupons_id on coupons (id)")',
            [
                "CREATE INDEX CONCURRENTLY cannot run inside a transaction block (a revision",
                "runs such a statement in `with op.get_context().autocommit_block():`)",
            ],
        ),
        (
            'op.execute("create table a (x int); create table b (x int)")',
            ["cannot insert multiple commands into a prepared statement (give each"],
        ),
        # async code in a data step: a BaseException, inside the run's own event loop; it
        # ended the task with a traceback and no word on where the database is
        (
            "import asyncio\n    raise asyncio.CancelledError",
            ["failed: CancelledError\nthe database is at good01; this run kept f3af01bc3f27, "],
        ),
    ],
)
def test_failing_migration_leaves_postgres_at_the_last_good_revision(
    pg_project: Project, pg_database: PgDatabase, failure: str, said: list[str]
) -> None:
    add_good_then_bad(pg_project, failure)

    error = pg_project.fails("migrate", "--env=ci")

    assert "upgrade of revision bad001 (add coupons) failed" in error
    for words in said:
        assert words in error
    assert pg_version(pg_database) == ["good01"]
    assert pg_tables(pg_database) == SHOP_TABLES | {"notes"}


def schema_dump(database: PgDatabase) -> str:
    dump = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", "--no-privileges", database.dsn],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # comments and pg_dump's per-run \restrict key differ between any two dumps
    return "\n".join(
        line
        for line in dump.splitlines()
        if line and not line.startswith(("--", "\\restrict", "\\unrestrict"))
    )


def test_offline_sql_for_prod_builds_the_same_schema_as_online(
    pg_project: Project, pg_database: PgDatabase, pg_database_2: PgDatabase
) -> None:
    assert shutil.which("psql") and shutil.which("pg_dump"), "PostgreSQL client tools needed"
    sql = pg_project.ok("offline-sql", "--env=prod").stdout
    applied = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pg_database_2.dsn],
        input=sql,
        capture_output=True,
        text=True,
    )
    assert applied.returncode == 0, applied.stderr

    pg_project.ok("migrate", "--env=ci")

    assert schema_dump(pg_database_2) == schema_dump(pg_database)
    assert pg_version(pg_database_2) == pg_version(pg_database) == [head_revision()]


@pytest.mark.parametrize("name", ["bob's deploy \\ 1", "deploy :prod \\:x"])
def test_offline_sql_quotes_a_setting_that_holds_a_quote(
    project: Project, pg_database: PgDatabase, name: str
) -> None:
    """``APPLICATION_NAME=bob's deploy`` made ``SET application_name = 'bob's deploy'``, SQL
    that psql refuses (online, the setting goes as a parameter). A backslash stays one on a
    server with standard_conforming_strings off, which the SQL sets only after. A colon
    before a word is no parameter (offline SQL wrote 'deploy NULL' for ':prod')."""
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\nAPPLICATION_NAME={name}\n")
    sql = project.ok("offline-sql", "--env=ci").stdout
    then = ["-c", "show application_name"]
    applied = subprocess.run(
        ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-f", "-", *then, pg_database.dsn],
        input=sql,
        capture_output=True,
        text=True,
        env={**os.environ, "PGOPTIONS": "-c standard_conforming_strings=off"},
    )
    assert applied.returncode == 0, applied.stderr
    assert pg_version(pg_database) == [head_revision()]
    assert applied.stdout.splitlines()[-1] == name


def test_offline_sql_for_a_schema_a_dba_made_needs_no_create_on_the_database(
    project: Project, pg_database: PgDatabase
) -> None:
    """The SQL began with CREATE SCHEMA IF NOT EXISTS, which PostgreSQL refuses without
    CREATE on the database even when the schema is there, as online migrate knew."""
    role = f"mig_{uuid.uuid4().hex[:8]}"
    pg_execute(pg_database.dsn, f"create role {role} login", f"create schema authorization {role}")
    try:
        project.write_env("ci", f"DATABASE_URL={pg_database.url}\nSCHEMA={role}\n")
        sql = project.ok("offline-sql", "--env=ci").stdout
        as_role = make_url(pg_database.dsn).set(username=role).render_as_string(False)
        applied = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", as_role],
            input=sql,
            capture_output=True,
            text=True,
        )
        assert applied.returncode == 0, applied.stderr
        rows = pg_fetch(pg_database.dsn, f"select version_num from {role}.alembic_version")
        assert [row["version_num"] for row in rows] == [head_revision()]
    finally:
        pg_execute(pg_database.dsn, f"drop owned by {role}", f"drop role {role}")


def test_unreachable_server_is_a_clear_error(project: Project) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    project.write_env("down", f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{port}/shop\n")

    for task in ("migrate", "status", "history", "check", "seed"):  # seed's traceback
        error = project.fails(task, "--env=down")

        assert f"cannot connect to postgresql+asyncpg://shop@127.0.0.1:{port}/shop" in error
        assert "refused" in error.lower()


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("", "what answered there does not speak PostgreSQL's protocol"),
        ("?ssl=disable", "the other end closed the connection"),
    ],
)
def test_a_port_where_no_postgresql_answers_is_named_as_such(
    project: Project, web_server: int, query: str, said: str
) -> None:
    """It said "PostgreSQL server at ... rejected SSL upgrade", which reads as a TLS problem."""
    url = f"postgresql+asyncpg://shop@127.0.0.1:{web_server}/shop{query}"
    project.write_env("wrong", f"DATABASE_URL={url}\nCONNECT_TIMEOUT=5\n")

    error = project.fails("status", "--env=wrong")

    assert error.endswith(
        f"error: cannot connect to {url}: {said} (is a PostgreSQL server listening on that "
        "host and port?)\n"
    )


def test_a_host_that_does_not_resolve_is_named_as_such(project: Project) -> None:
    """asyncpg's own words are socket.gaierror's "[Errno -2] Name or service not known",
    with no word of which host; .invalid never resolves (RFC 2606)."""
    url = "postgresql+asyncpg://shop:s3cret@shop-db.invalid:5432/shop"
    project.write_env("typo", f"DATABASE_URL={url}\nCONNECT_TIMEOUT=5\n")

    result = project.invoke("status", "--env=typo")

    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        "error: cannot connect to postgresql+asyncpg://shop:***@shop-db.invalid:5432/shop: "
        "unknown host ("
    )
    assert "s3cret" not in result.stdout + result.stderr


def test_a_server_without_ssl_where_the_url_requires_it_says_so(project: Project) -> None:
    with cluster() as server:  # initdb's: ssl off
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/postgres?ssl=require"
        project.write_env("tls", f"DATABASE_URL={url}\n")

        error = project.fails("status", "--env=tls")

    assert f"cannot connect to {url}: no SSL connection was possible, and ssl=require " in error
    assert "requires one (turn ssl on in the server; and is a PostgreSQL server" in error


def test_a_naive_time_is_utc_to_a_migration_whatever_the_servers_time_zone(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """A revision that made a timestamp column timestamptz took each value as a time in the
    server's zone: on a database set to Moscow's, 12:00 (UTC, as the app writes a naive
    time) became 09:00 UTC, three hours off without a word. (Offline SQL sets it too:
    tests/test_protected.py.)"""
    project = pg_project
    pg_execute(pg_database.dsn, f"alter database {pg_database.name} set timezone = 'Europe/Moscow'")
    project.migrated("ci")
    aware = (
        'op.add_column("users", sa.Column("seen", sa.DateTime()))\n'
        "    op.execute(\"insert into users (telegram_id, seen) values (1, '2026-12-01 12:00')\")\n"
        '    op.alter_column("users", "seen", type_=sa.DateTime(timezone=True))'
    )
    project.add_revision("seen", revision("seen1", head_revision(), aware, message="seen"))

    project.ok("migrate", "--env=ci")

    seen = "select (seen at time zone 'UTC')::text from users"
    assert pg_fetch(pg_database.dsn, seen)[0][0] == "2026-12-01 12:00:00"


def self_signed(openssl: str, name: str, key: Path, certificate: Path) -> None:
    """A key and a certificate for host ``name``, signed by that key itself."""
    made = f"req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN={name}".split()
    subprocess.run(
        [openssl, *made, "-keyout", str(key), "-out", str(certificate)],
        check=True,
        capture_output=True,
    )


def test_a_certificate_that_cannot_be_trusted_is_named_with_what_to_do(
    project: Project, tmp_path: Path
) -> None:
    """A server's certificate that failed its check was "Operation not permitted (is the
    server running on that host and port?)"; a PGSSLROOTCERT not there, "No such file or
    directory" with the same question; one with no certificate in it, "Unknown error 136"."""
    [openssl] = need("openssl")
    with cluster() as server:
        data = Path(server.data)
        trusted, other = data / "server.crt", tmp_path / "other.crt"
        self_signed(openssl, "shop-db.internal", data / "server.key", trusted)
        self_signed(openssl, "x", tmp_path / "x.key", other)
        (data / "server.key").chmod(0o600)
        if os.geteuid() == 0:
            for made in ("server.key", "server.crt"):
                shutil.chown(data / made, "postgres", "postgres")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("ssl = on\n")
        server.restart()
        garbage = tmp_path / "garbage.crt"
        garbage.write_text("not a certificate\n")
        missing = tmp_path / "missing.crt"

        def use(host: str, mode: str) -> str:
            url = f"postgresql+asyncpg://postgres@{host}:{server.port}/postgres?ssl={mode}"
            project.write_env("tls", f"DATABASE_URL={url}\n")
            return url

        def said(host: str, mode: str, **env: str) -> str:
            url = use(host, mode)
            return project.fails("status", "--env=tls", **env).split(f"{url}: ", 1)[-1].strip()

        use("localhost", "verify-ca")
        project.ok("status", "--env=tls", PGSSLROOTCERT=str(trusted))
        assert said("localhost", "verify-full", PGSSLROOTCERT=str(trusted)) == (
            "the server's certificate is not for this host: Hostname mismatch, certificate is "
            "not valid for 'localhost'. (write the host as the certificate names it, or use "
            "ssl=verify-ca, which checks only who signed it)"
        )
        signer = "the certificate of the CA that signed the server's"
        assert said("127.0.0.1", "verify-full", PGSSLROOTCERT=str(trusted)) == (
            "the server's certificate is not for this host: IP address mismatch, certificate "
            "is not valid for '127.0.0.1'. (write the host as the certificate names it, or "
            "use ssl=verify-ca, which checks only who signed it)"
        )
        assert said("localhost", "verify-ca", PGSSLROOTCERT=str(other)) == (
            "the server's certificate was not accepted: self-signed certificate (give "
            f"{signer} in PGSSLROOTCERT, or in ~/.postgresql/root.crt)"
        )
        assert said("localhost", "require", PGSSLROOTCERT=str(missing)) == (
            f"PGSSLROOTCERT names {missing}, which is no file that can be read: name the file "
            f"of {signer}"
        )
        assert said("localhost", "verify-full", PGSSLROOTCERT=str(garbage)) == (
            f"PGSSLROOTCERT names {garbage}, which holds no certificate: name the file of {signer}"
        )
        assert said("localhost", "verify-full", HOME=str(tmp_path)) == (
            f'root certificate file "{tmp_path}/.postgresql/root.crt" does not exist or cannot '
            "be accessed (ssl=verify-full checks the server's certificate: give "
            f"{signer} in PGSSLROOTCERT, or in ~/.postgresql/root.crt)"
        )


def test_a_database_or_role_the_server_lacks_says_what_to_do(
    project: Project, pg_database: PgDatabase
) -> None:
    base = pg_database.url.rsplit("/", 1)[0]
    project.write_env("nodb", f"DATABASE_URL={base}/{pg_database.name}_missing\n")
    project.write_env("norole", f"DATABASE_URL={base.replace('postgres@', 'no_such_role@')}/x\n")

    missing = project.fails("migrate", "--env=nodb")
    stranger = project.fails("status", "--env=norole")

    assert missing.endswith(
        f'database "{pg_database.name}_missing" does not exist (create that database first, '
        "or fix the database name in the URL)\n"
    )
    assert stranger.endswith(
        'role "no_such_role" does not exist (fix the user in the URL, or let it in: create '
        "the role, or add it to the server's pg_hba.conf)\n"
    )


def test_a_read_only_database_is_refused_before_any_revision_with_what_to_do(
    project: Project, pg_database: PgDatabase
) -> None:
    """A standby, or a database a DBA set read-only: the run says so, not just the error."""
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\n")
    pg_execute(
        pg_database.dsn,
        f'ALTER DATABASE "{pg_database.name}" SET default_transaction_read_only = on',
    )

    refused = project.fails("migrate", "--env=ci")

    assert "cannot execute CREATE TABLE in a read-only transaction\n" in refused
    assert refused.endswith(
        "no revision was run; the server takes only reads there: it is a standby (point the "
        "URL at the primary), or default_transaction_read_only is on for the database or the "
        "role (ALTER ... SET default_transaction_read_only = off)\n"
    )
    pg_execute(
        pg_database.dsn,
        "SET default_transaction_read_only = off",
        f'ALTER DATABASE "{pg_database.name}" RESET default_transaction_read_only',
    )
    assert pg_version(pg_database) == []
    project.ok("migrate", "--env=ci")
    assert pg_version(pg_database) == [head_revision()]


def test_a_database_without_a_schema_to_create_in_says_what_to_do(
    project: Project, pg_database: PgDatabase
) -> None:
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\n")
    pg_execute(pg_database.dsn, "DROP SCHEMA public")

    refused = project.fails("migrate", "--env=ci")

    assert "InvalidSchemaNameError: no schema has been selected to create in\n" in refused
    assert refused.endswith(
        "no revision was run; no schema on the role's search_path exists (public was "
        "dropped?): create it (CREATE SCHEMA public), or name one with SCHEMA in the env file\n"
    )
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\nSCHEMA=shop\n")
    project.ok("migrate", "--env=ci")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers, like a firewalled server."""
    with tcp_server(reply=None) as port:
        yield port


@pytest.fixture
def web_server() -> Iterator[int]:
    """A port where something that is no PostgreSQL answers, as a web server would: the
    URL's port is wrong (MariaDB's, an app's)."""
    with tcp_server(reply=b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n") as port:
        yield port


def test_a_server_that_never_answers_times_out(project: Project, silent_server: int) -> None:
    project.write_env(
        "hang",
        (
            f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{silent_server}/shop\n"
            "DATABASE_PASSWORD=Secret-in-timeout\nCONNECT_TIMEOUT=1\n"
        ),
    )
    started = time.monotonic()
    error = project.fails("migrate", "--env=hang")

    assert time.monotonic() - started < 20
    assert "timed out" in error
    assert "shop:***@127.0.0.1" in error
    assert "Secret-in-timeout" not in error


def test_after_migrate_a_new_session_can_use_the_schema(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """After migrate exits 0, a separate session can use the schema (nothing left uncommitted)."""
    pg_project.ok("migrate", "--env=ci")
    pg_execute(pg_database.dsn, "insert into categories (name) values ('e-books')")
    rows = pg_fetch(pg_database.dsn, "select name from categories")
    assert [row["name"] for row in rows] == ["e-books"]
    assert re.fullmatch(r"[0-9a-f]{12}", pg_version(pg_database)[0])


def test_a_role_that_may_not_create_tables_is_told_which_grant_it_needs(
    project: Project, pg_database: PgDatabase
) -> None:
    """PostgreSQL 15 and later let only a database's owner create in ``public``: a
    migrating role that is not the owner fails before its first revision, and is told so."""
    role, admin = f"shop_{uuid.uuid4().hex[:10]}", pg_database.dsn
    pg_execute(admin, f"create role {role} login", "revoke create on schema public from public")
    try:
        url = make_url(pg_database.url).set(username=role).render_as_string(hide_password=False)
        project.write_env("ci", f"DATABASE_URL={url}\n")

        refused = project.fails("migrate", "--env=ci")

        assert "ProgrammingError: permission denied for schema public\n" in refused
        assert refused.endswith(
            "no revision was run; the version table and the audit trail need CREATE on it: "
            f"GRANT CREATE ON SCHEMA public TO {role} (PostgreSQL 15 and later give it in "
            "public only to the database's owner), or migrate as the owner\n"
        )
        assert pg_version(pg_database) == []
        pg_execute(admin, f"grant create on schema public to {role}")
        project.ok("migrate", "--env=ci")
        assert pg_version(pg_database) == [head_revision()]
    finally:
        pg_execute(admin, f"drop owned by {role}", f"drop role {role}")


CALLS = ["commit", "rollback"]


def own_call(call: str) -> str:
    """A revision that makes a table, ends its transaction by ``call``, then fails."""
    return (
        'op.create_table("leftover", sa.Column("id", sa.Integer))\n'
        f"    {call}\n"
        '    op.execute("select 1/0")'
    )


# Its own savepoints are its business; a COMMIT after them is not
SAVEPOINTS = 'op.execute("SAVEPOINT mine")\n    op.execute("ROLLBACK TO SAVEPOINT mine")\n    '
OWN_TRANSACTION = [
    (SAVEPOINTS + own_call('op.execute("COMMIT")'), "runs COMMIT itself"),
    *[(own_call(f"op.get_bind().{c}()"), f"calls op.get_bind().{c}() itself") for c in CALLS],
    (own_call("op.get_bind().get_transaction().commit()"), "commits itself"),
    (SESSION_ROLLBACK, "rolled its transaction back part way (an ORM Session's "),
]


@pytest.mark.parametrize(("failure", "said"), OWN_TRANSACTION)
def test_a_revision_that_ends_its_own_transaction_is_refused_whole_on_postgres(
    pg_project: Project, pg_database: PgDatabase, failure: str, said: str
) -> None:
    """``op.execute("COMMIT")`` or ``op.get_bind().commit()`` committed what came before
    it, and a later failure left that in the database while the run said the revision was
    rolled back. A Session's rollback() lost the revision's first part, the rest ran in a
    new transaction, and the run recorded the revision as applied, saying "nothing to do"."""
    add_good_then_bad(pg_project, failure)

    error = pg_project.fails("migrate", "--env=ci")

    assert f"revision bad001 {said}" in error
    assert "the database is at good01; this run kept" in error
    assert "; bad001 was rolled back; fix it" in error
    assert pg_version(pg_database) == ["good01"]
    assert pg_tables(pg_database) == SHOP_TABLES | {"notes"}  # no coupons, no leftover


def test_a_revision_may_undo_to_a_savepoint_of_its_own_on_postgres(
    pg_project: Project, pg_database: PgDatabase
) -> None:
    """What the refusal of its connection's rollback() advises works: a failed statement
    leaves PostgreSQL's transaction aborted, and the savepoint brings it back."""
    pg_project.add_revision("sp", revision("sp0001", head_revision(), SAVEPOINT_RECOVERY))

    pg_project.ok("migrate", "--env=ci")

    assert pg_version(pg_database) == ["sp0001"]
    assert [tuple(row) for row in pg_fetch(pg_database.dsn, "select id from notes")] == [(1,)]


def test_a_pg_dump_backup_reaches_the_server_the_url_names(project: Project) -> None:
    """Hosts in the query (several tried in turn, or a socket's folder) leave the URL no
    host of its own: pg_dump was sent to localhost:5432, another server, which has no such
    database (or, worse, one of the same name to dump instead)."""
    [pg_restore] = need("pg_restore")
    with cluster() as own:
        pg_execute(f"postgresql://postgres@127.0.0.1:{own.port}/postgres", "CREATE DATABASE dumped")
        hosts = f"host=127.0.0.1:{free_port()}&host=127.0.0.1:{own.port}"  # the first is dead
        project.write_env("ci", f"DATABASE_URL=postgresql+asyncpg://postgres@/dumped?{hosts}\n")
        project.extend_env("ci", "BACKUP=pg_dump\n")
        project.ok("migrate", "--env=ci")
        project.add_revision("next", revision("next01", head_revision()))

        result = project.ok("migrate", "--env=ci")

    said = re.search(r"backed up to (var/backups/ci-\S+\.dump) with pg_dump", result.stderr)
    assert said is not None, result.stderr
    dump = project.root / said.group(1)
    listed = subprocess.run([pg_restore, "--list", str(dump)], capture_output=True, text=True)
    assert "TABLE public users" in listed.stdout  # the migrated database, from its server
