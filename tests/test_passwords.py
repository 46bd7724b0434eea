"""Passwords: a throwaway PostgreSQL cluster that really checks them (scram-sha-256).

The shared test server trusts every local connection, so wrong passwords and passwords
full of URL syntax can only be tested against a server of our own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import Project, cluster, head_revision, owned_dir, pg_execute, pg_fetch

pytestmark = pytest.mark.postgres

NASTY = "p%40 @:/?#'\"x%"  # every character that breaks a URL or a quoted string
ADMIN_PASSWORD = "admin-pw-1"


@pytest.fixture(scope="session")
def scram_server(pg_server: str) -> Iterator[int]:
    """A cluster with scram-sha-256 auth on a free port, stopped and deleted after."""
    pw = owned_dir("pw-") / "pw"
    pw.write_text(ADMIN_PASSWORD)
    try:
        with cluster("--auth=scram-sha-256", f"--pwfile={pw}") as found:
            yield found.port
    finally:
        shutil.rmtree(pw.parent, ignore_errors=True)


@pytest.fixture
def shop_role(scram_server: int) -> Iterator[int]:
    """A role ``shop`` with the NASTY password, owning a fresh database ``shop``."""
    admin = f"postgresql://postgres:{ADMIN_PASSWORD}@127.0.0.1:{scram_server}/postgres"
    literal = NASTY.replace("'", "''")
    pg_execute(
        admin, f"CREATE ROLE shop LOGIN PASSWORD '{literal}'", "CREATE DATABASE shop OWNER shop"
    )
    yield scram_server
    pg_execute(admin, "DROP DATABASE shop WITH (FORCE)", "DROP ROLE shop")


def test_the_server_really_checks_passwords(shop_role: int) -> None:
    import asyncpg

    with pytest.raises(asyncpg.InvalidPasswordError):
        pg_fetch(f"postgresql://shop:wrong@127.0.0.1:{shop_role}/shop", "select 1")


def test_password_full_of_url_syntax_migrates_and_never_prints(
    project: Project, shop_role: int
) -> None:
    project.write_env(
        "secure",
        (
            f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{shop_role}/shop\n"
            "DATABASE_PASSWORD=${SHOP_PASSWORD}\n"
        ),
    )
    tasks = [
        ("migrate", "--env=secure"),
        ("status", "--env=secure"),
        ("history", "--env=secure"),
        ("envs",),
    ]
    outputs = [project.ok(*task, SHOP_PASSWORD=NASTY) for task in tasks]

    assert f"shop:***@127.0.0.1:{shop_role}/shop" in outputs[0].stderr
    for result in outputs:
        printed = result.stdout + result.stderr
        assert NASTY not in printed and quote(NASTY, safe="") not in printed
    dsn = f"postgresql://shop:{quote(NASTY, safe='')}@127.0.0.1:{shop_role}/shop"
    rows = pg_fetch(dsn, "select version_num from alembic_version")
    assert [row["version_num"] for row in rows] == [head_revision()]


def test_percent_encoded_password_inside_the_url(project: Project, shop_role: int) -> None:
    """A URL-encoded password is full of % signs, which ConfigParser would choke on."""
    project.write_env(
        "inline",
        (
            f"DATABASE_URL=postgresql+asyncpg://shop:${{SHOP_PASSWORD_QUOTED}}@127.0.0.1:{shop_role}/shop\n"
        ),
    )
    quoted = quote(NASTY, safe="")
    result = project.ok("migrate", "--env=inline", SHOP_PASSWORD_QUOTED=quoted)

    assert quoted not in result.stderr and NASTY not in result.stderr
    assert f"applied {head_revision()}" in result.stderr


def test_wrong_password_is_a_clear_error_without_the_password(
    project: Project, shop_role: int
) -> None:
    project.write_env(
        "wrong",
        (
            f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{shop_role}/shop\n"
            "DATABASE_PASSWORD=Not-The-Pa55word\n"
        ),
    )
    error = project.fails("migrate", "--env=wrong")

    assert f"cannot connect to postgresql+asyncpg://shop:***@127.0.0.1:{shop_role}/shop" in error
    said = 'password authentication failed for user "shop" (check the password the env file '
    assert said in error
    assert "Not-The-Pa55word" not in error


def test_a_password_with_a_trailing_newline_is_pointed_out(
    project: Project, shop_role: int
) -> None:
    """A secret mounted from a file often ends with a newline, which is part of it."""
    project.write_env(
        "ci",
        f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{shop_role}/shop\n"
        "DATABASE_PASSWORD=${SHOP_PASSWORD}\n",
    )

    error = project.fails("migrate", "--env=ci", SHOP_PASSWORD=NASTY + "\n")

    assert error.endswith(
        "(check the password the env file gives (DATABASE_PASSWORD): it starts or ends with a "
        "space or a newline (a secret file's last line?))\n"
    )
    assert NASTY not in error
    project.ok("migrate", "--env=ci", SHOP_PASSWORD=NASTY)


def test_a_fleet_never_prints_a_targets_password(project: Project, shop_role: int) -> None:
    """Two targets on the password-checking server, one of which does not exist."""
    admin = f"postgresql://postgres:{ADMIN_PASSWORD}@127.0.0.1:{shop_role}/postgres"
    pg_execute(admin, "CREATE DATABASE shop_alpha OWNER shop")
    try:
        project.write_env(
            "shops",
            f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{shop_role}/shop_{{target}}\n"
            "DATABASE_PASSWORD=${SHOP_PASSWORD}\nTARGETS=alpha, missing\n",
        )
        migrated = project.invoke("migrate", "--env=shops", "--keep-going", SHOP_PASSWORD=NASTY)
        status = project.invoke("status", "--env=shops", "--json", SHOP_PASSWORD=NASTY)

        assert migrated.returncode == 6, migrated.stderr
        assert "alpha] migrated" in migrated.stderr
        assert 'database "shop_missing" does not exist' in migrated.stderr
        reports = [p.read_text() for p in (project.root / "var" / "runs").glob("*.json")]
        assert len(reports) == 1 and "shop_missing" in reports[0]
        for printed in [result.stdout + result.stderr for result in (migrated, status)] + reports:
            assert NASTY not in printed and quote(NASTY, safe="") not in printed
    finally:
        pg_execute(admin, "DROP DATABASE IF EXISTS shop_alpha WITH (FORCE)")


def test_stamp_and_seed_reach_their_databases_with_such_a_password(
    project: Project, shop_role: int
) -> None:
    """stamp builds a scratch database's URL from the env's, and seed goes through the
    app's session: each must carry the password as it is, and print it nowhere."""
    admin = f"postgresql://postgres:{ADMIN_PASSWORD}@127.0.0.1:{shop_role}/postgres"
    pg_execute(admin, "ALTER ROLE shop CREATEDB")  # for stamp's scratch database
    project.write_env(
        "secure",
        (
            f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{shop_role}/shop\n"
            "DATABASE_PASSWORD=${SHOP_PASSWORD}\n"
        ),
    )
    project.ok("migrate", "--env=secure", SHOP_PASSWORD=NASTY)

    stamped = project.ok("stamp", "--env=secure", head_revision(), SHOP_PASSWORD=NASTY)
    seeded = project.ok("seed", "--env=secure", SHOP_PASSWORD=NASTY)

    assert f"secure: already at {head_revision()}: nothing recorded" in stamped.stderr
    assert "secure: added 3 users" in seeded.stderr
    for result in (stamped, seeded):
        printed = result.stdout + result.stderr
        assert NASTY not in printed and quote(NASTY, safe="") not in printed
    scratch = "select datname from pg_database where datname like 'stamp_scratch%'"
    assert pg_fetch(admin, scratch) == []


def test_a_pg_dump_backup_reaches_the_server_as_the_migration_does(
    project: Project, shop_role: int, tmp_path: Path
) -> None:
    """pg_dump got the URL's server, user and password, but not what asyncpg takes from its
    query: with ``?passfile=``, the migration could connect and pg_dump had no password.
    (asyncpg does not undo a passfile's escapes, so this password has no ``:`` or ``\\``.)"""
    admin = f"postgresql://postgres:{ADMIN_PASSWORD}@127.0.0.1:{shop_role}/postgres"
    pg_execute(admin, "ALTER ROLE shop PASSWORD 'in the passfile'")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{shop_role}:shop:shop:in the passfile\n")
    passfile.chmod(0o600)
    url = f"postgresql+asyncpg://shop@127.0.0.1:{shop_role}/shop?passfile={passfile}"
    project.write_env("ci", f"DATABASE_URL={url}\nBACKUP=pg_dump\n")
    project.environ.pop("PGPASSWORD", None)

    result = project.ok("migrate", "--env=ci")

    [dump] = (project.root / "var" / "backups").glob("ci-*.dump")
    assert f"backed up to var/backups/{dump.name} with pg_dump" in result.stderr


def test_a_refused_login_with_no_password_in_the_env_file_says_where_one_came_from(
    project: Project, shop_role: int, tmp_path: Path
) -> None:
    """The advice was always "check the password the env file gives (DATABASE_PASSWORD)",
    also when the env file gives none, and asyncpg took one from elsewhere, or sent none."""
    project.write_env("ci", f"DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1:{shop_role}/shop\n")
    project.environ.pop("PGPASSWORD", None)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{shop_role}:shop:shop:not-the-password\n")
    passfile.chmod(0o600)
    refused = 'password authentication failed for user "shop" (the env file gives no password'

    none = project.fails("status", "--env=ci", PGPASSFILE=str(tmp_path / "none"))
    from_file = project.fails("status", "--env=ci", PGPASSFILE=str(passfile))
    from_environ = project.fails("status", "--env=ci", PGPASSWORD="not-the-password")

    assert none.endswith(f"{refused}: set DATABASE_PASSWORD in it)\n")
    assert f"{refused}, so {passfile} was read: check its line for this server" in from_file
    assert f"{refused}, so PGPASSWORD in the process environment was used" in from_environ
    assert "not-the-password" not in none + from_file + from_environ
