"""Every bad input gets a clear answer: env files, flags, and revision ranges.

The environment rules are tested in-process; what the command line does with a mistake
(message, exit code, nothing changed) through ``invoke``.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import re
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import Project, head_revision, revision, tmpfs, version

from db.environments import load_environment
from db.errors import ConfigError
from db.runner import session_settings

HEAD = head_revision()


def env_file(tmp_path: Path, text: str, local: str | None = None) -> Path:
    folder = tmp_path / "environments"
    folder.mkdir(exist_ok=True)
    (folder / "x.env").write_text(text)
    if local is not None:
        (folder / "x.local.env").write_text(local)
    return tmp_path


def test_a_key_set_twice_in_one_file_names_both_lines(tmp_path: Path) -> None:
    root = env_file(tmp_path, "DATABASE_URL=sqlite://\nPROTECTED=true\n\nPROTECTED=false\n")

    with pytest.raises(ConfigError, match=r"x.env: PROTECTED is set twice, on lines 2 and 4"):
        load_environment(root, "x", {})


@pytest.mark.parametrize("line", ["PROTECTED", "export PROTECTED", "  PROTECTED  "])
def test_a_key_with_no_value_is_refused_not_read_as_unset(tmp_path: Path, line: str) -> None:
    """python-dotenv reads a bare ``PROTECTED`` as a key with no value, which was taken for
    unset: an environment its author meant to protect ran unprotected, without a word."""
    root = env_file(tmp_path, f"DATABASE_URL=sqlite:///x.db\n\n{line}\n")

    with pytest.raises(ConfigError) as refused:
        load_environment(root, "x", {})
    assert str(refused.value) == (
        "environments/x.env, line 3: PROTECTED has no = and no value: write PROTECTED=VALUE, "
        "or PROTECTED= for an empty one"
    )
    empty = env_file(tmp_path, "DATABASE_URL=sqlite:///x.db\nPROTECTED=\n")
    assert not load_environment(empty, "x", {}).protected  # = with nothing after it: unset


@pytest.mark.parametrize(
    ("line", "said"),
    [
        (
            "DATABASE_URL:postgresql+asyncpg://shop:s3cret@db/shop",
            "DATABASE_URL is followed by a colon, where an env file has =: write "
            "DATABASE_URL=VALUE",
        ),
        (
            "DATABASE_URL: postgresql+asyncpg://shop:s3cret@db/shop",
            "DATABASE_URL is followed by a colon, where an env file has =: write "
            "DATABASE_URL=VALUE",
        ),
        (
            "export DATABASE_PASSWORD : s3cret",
            "DATABASE_PASSWORD is followed by a colon, where an env file has =: write "
            "DATABASE_PASSWORD=VALUE",
        ),
        (
            "postgresql+asyncpg://shop:s3cret@db/shop",
            "no KEY=value (the line, not shown here as it may hold a secret, has no =): "
            "write KEY=VALUE, or remove the line",
        ),
    ],
)
def test_a_line_with_no_equals_sign_is_refused_without_its_text(
    project: Project, line: str, said: str
) -> None:
    """A line without ``=`` was named whole as a key "with no value", and the fix repeated
    it twice: a pasted URL's password, or ``KEY: value`` written as in a compose file,
    printed in the error."""
    project.write_env("x", f"TARGETS=a\n{line}\nDATABASE_URL=sqlite:///var/x.sqlite3\n")

    for task in (["migrate", "--env=x"], ["envs"]):
        result = project.invoke(*task)

        output = result.stdout + result.stderr  # envs lists each one's error with it
        assert result.returncode == 2, output
        assert f"environments/x.env, line 2: {said}\n" in output
        assert "s3cret" not in output
    assert not (project.root / "var" / "x.sqlite3").exists()


URL = "DATABASE_URL=postgresql+asyncpg://shop@db:5432/shop\n"
USES = "DATABASE_PASSWORD=${SHOP_PW}\n"


@pytest.mark.parametrize(
    ("text", "local", "fix"),
    [
        (
            URL + USES,
            None,
            "export SHOP_PW, or set DATABASE_PASSWORD itself in environments/x.local.env",
        ),
        # the advice was "set it in x.local.env", which a ${VAR} above it never sees
        (
            URL + USES,
            "SHOP_PW=s3cret\n",
            "SHOP_PW is set in environments/x.local.env, which is read after it: "
            "set DATABASE_PASSWORD there",
        ),
        (
            URL + USES + "SHOP_PW=s3cret\n",
            None,
            "SHOP_PW is set below it, and a ${VAR} sees only the keys above: move it up",
        ),
    ],
)
def test_an_unset_variable_says_what_would_set_it(
    tmp_path: Path, text: str, local: str | None, fix: str
) -> None:
    root = env_file(tmp_path, text, local)

    with pytest.raises(ConfigError) as refused:
        load_environment(root, "x", {}).url()
    assert str(refused.value) == (
        f"environments/x.env: DATABASE_PASSWORD uses ${{SHOP_PW}}, which is not set; {fix}"
    )
    if local is not None:  # as the message says
        (root / "environments" / "x.local.env").write_text("DATABASE_PASSWORD=s3cret\n")
        assert load_environment(root, "x", {}).url().password == "s3cret"


def test_a_setting_whose_variable_is_unset_is_refused_not_read_as_its_default(
    project: Project,
) -> None:
    """``PROTECTED=${IS_PROD}`` with IS_PROD unset read as empty, so as unprotected: reset
    dropped every table. Only a secret may stay unset until a task needs it."""
    project.write_env("gated", "DATABASE_URL=sqlite:///var/g.sqlite3\nPROTECTED=${IS_PROD}\n")
    project.ok("migrate", "--env=gated", IS_PROD="false")

    error = project.fails("reset", "--env=gated")

    assert error.endswith(
        "error: environments/gated.env: PROTECTED uses ${IS_PROD}, which is not set; export "
        "IS_PROD, or set PROTECTED itself in environments/gated.local.env\n"
    )
    assert version(project, "var/g.sqlite3") == [HEAD]  # and the tables with it
    assert "is protected" in project.fails("reset", "--env=gated", IS_PROD="true")
    project.ok("offline-sql", "--env=prod")  # ${PROD_DB_PASSWORD} unset: a secret may wait


def test_a_local_file_may_still_override_a_key(tmp_path: Path) -> None:
    root = env_file(tmp_path, "DATABASE_URL=sqlite://\nPROTECTED=true\n", "PROTECTED=false\n")

    assert not load_environment(root, "x", {}).protected


@pytest.mark.parametrize(
    ("line", "meant"),
    [
        ("PROTECTD=true", "PROTECTED"),
        ("protected=true", "PROTECTED"),
        ("LOCK_TIMOUT=1s", "LOCK_TIMEOUT"),
        ("STATEMNT_TIMEOT=1min", "STATEMENT_TIMEOUT"),
        ("TARGET=alpha", "TARGETS"),
        ("BACKUPS_KEEP=2", "BACKUP_KEEP"),
    ],
)
def test_a_misspelled_setting_is_refused_not_ignored(tmp_path: Path, line: str, meant: str) -> None:
    """``PROTECTD=true`` would leave production unprotected without a word."""
    root = env_file(tmp_path, "DATABASE_URL=sqlite://\n", f"{line}\n")
    key = line.split("=")[0]

    with pytest.raises(ConfigError) as refused:
        load_environment(root, "x", {})

    assert str(refused.value) == (
        f"environments/x.local.env: {key} is no setting; did you mean {meant}? (a misspelled "
        "setting would be ignored without a word)"
    )


def test_keys_that_are_no_misspelled_setting_may_stay(tmp_path: Path) -> None:
    """The app's own keys, and a key that only feeds a ${VAR}, even one that looks close."""
    root = env_file(
        tmp_path,
        "BOT_TOKEN=123:abc\nDATABASE_URL_RO=sqlite://\nDATABASE_USER=shop\nSCHEMAS=x\n"
        "DATABASE_URL=sqlite:///var/${SCHEMAS}.sqlite3\n",
    )

    assert load_environment(root, "x", {}).url().database == str(tmp_path / "var" / "x.sqlite3")


def test_every_key_the_code_reads_is_a_known_setting() -> None:
    """SETTINGS is the one list the typo check knows: a key read anywhere must be in it."""
    from db.environments import SETTINGS
    from db.session import POOL_COUNTS, POOL_SECONDS

    read = re.compile(r"(?<!environ)\.(?:get|number|count|duration|flag)\(\s*\"([A-Z_]+)\"")
    sources = [*Path("db").rglob("*.py"), *Path("cli").rglob("*.py"), Path("tasks.py")]
    keys = {key for path in sources for key in read.findall(path.read_text())}
    assert len(keys) > 10  # the pattern still finds the reads
    assert keys | set(POOL_COUNTS) | set(POOL_SECONDS) <= set(SETTINGS)


@pytest.mark.parametrize("key", ["BACKUP_KEEP", "RUNS_KEEP", "POOL_SIZE", "MAX_OVERFLOW"])
@pytest.mark.parametrize("value", ["2.5", "-1", "x", "\u00b2"])
def test_a_count_setting_takes_whole_numbers_only(tmp_path: Path, key: str, value: str) -> None:
    """A count was read as any number and cut: ``BACKUP_KEEP=2.5`` kept 2 unseen, and
    ``MAX_CONNECTIONS_PER_HOST=0.5`` became 0, which means no cap at all."""
    root = env_file(tmp_path, f"DATABASE_URL=sqlite:///x.sqlite3\n{key}={value}\n")

    with pytest.raises(ConfigError, match=f"{key} must be a whole number, 0 or more"):
        load_environment(root, "x", {}).count(key, 5)
    env_file(tmp_path, f"DATABASE_URL=sqlite:///x.sqlite3\n{key}=7\n")
    assert load_environment(root, "x", {}).count(key, 5) == 7
    env_file(tmp_path, "DATABASE_URL=sqlite:///x.sqlite3\n")
    assert load_environment(root, "x", {}).count(key, 5) == 5


def test_the_apps_pool_takes_its_settings_as_given(tmp_path: Path) -> None:
    """``POOL_TIMEOUT=0.5`` was cut to 0 (a checkout that never waits for a connection)."""
    from db.session import async_engine

    settings = "POOL_SIZE=3\nMAX_OVERFLOW=0\nPOOL_TIMEOUT=0.5\nPOOL_RECYCLE=90.5\n"
    root = env_file(tmp_path, f"DATABASE_URL=postgresql+asyncpg://s@h/d\n{settings}")
    pool = async_engine(load_environment(root, "x", {})).sync_engine.pool

    assert (pool.size(), pool.timeout(), pool._recycle) == (3, 0.5, 90.5)  # type: ignore[attr-defined]
    env_file(tmp_path, "DATABASE_URL=postgresql+asyncpg://s@h/d\nPOOL_SIZE=2.5\n")
    with pytest.raises(ConfigError, match="POOL_SIZE must be a whole number"):
        async_engine(load_environment(root, "x", {}))


def test_a_fractional_cap_on_a_fleet_is_refused(project: Project) -> None:
    project.write_env(
        "shops",
        "DATABASE_URL=sqlite:///var/shops/{target}.sqlite3\nTARGETS=a b\n"
        "MAX_CONNECTIONS_PER_HOST=0.5\n",
    )

    result = project.invoke("migrate", "--env=shops")

    assert result.returncode == 2, result.stderr
    assert "MAX_CONNECTIONS_PER_HOST must be a whole number, 0 or more, not '0.5'" in result.stderr
    assert not (project.root / "var" / "shops").exists()


def test_a_misspelled_setting_stops_the_task(project: Project) -> None:
    project.write_env("dev", "DATABASE_URL=sqlite:///var/dev.sqlite3\nPROTECTD=true\n")

    result = project.invoke("migrate")

    assert result.returncode == 2
    assert result.stderr.endswith(
        "did you mean PROTECTED? (a misspelled setting would be ignored without a word)\n"
    )
    assert not (project.root / "var" / "dev.sqlite3").exists()


@pytest.mark.parametrize("value", ["false", "no", "0", "sqlite", "pg_dumpall"])
def test_a_backup_setting_that_is_no_kind_of_backup_is_refused(tmp_path: Path, value: str) -> None:
    """``BACKUP=false`` looks like it turns SQLite's backups off; it was ignored."""
    root = env_file(tmp_path, f"DATABASE_URL=sqlite://\nBACKUP={value}\n")

    with pytest.raises(ConfigError) as refused:
        load_environment(root, "x", {})

    assert str(refused.value) == (
        f"environments/x.env: BACKUP takes only pg_dump (a PostgreSQL dump before each "
        f"migrate), not {value!r}; SQLite is always copied first, and BACKUP_KEEP=0 takes no "
        "backups"
    )


def test_backup_takes_pg_dump_in_any_case_or_nothing(tmp_path: Path) -> None:
    for value, meant in (("pg_dump", "pg_dump"), (" PG_DUMP ", "pg_dump"), ("", "")):
        root = env_file(tmp_path, f"DATABASE_URL=sqlite://\nBACKUP={value}\n")
        assert load_environment(root, "x", {}).backup == meant


def test_a_backup_setting_that_is_no_backup_stops_the_task(project: Project) -> None:
    project.extend_env("dev", "BACKUP=false\n")

    result = project.invoke("migrate")

    assert result.returncode == 2
    assert "BACKUP takes only pg_dump" in result.stderr
    assert not (project.root / "var" / "dev.sqlite3").exists()


@pytest.mark.parametrize("value", ["ture", "true#x", "maybe", "2"])
def test_a_boolean_that_is_not_one_is_an_error(tmp_path: Path, value: str) -> None:
    root = env_file(tmp_path, f"DATABASE_URL=sqlite://\nPROTECTED={value}\n")

    with pytest.raises(ConfigError, match="PROTECTED must be true or false"):
        load_environment(root, "x", {})


@pytest.mark.parametrize(("value", "protected"), [("yes", True), ("On", True), ("0", False)])
def test_booleans_accept_the_usual_words(tmp_path: Path, value: str, protected: bool) -> None:
    root = env_file(tmp_path, f"DATABASE_URL=sqlite://\nPROTECTED={value}\n")

    assert load_environment(root, "x", {}).protected is protected


def test_a_line_dotenv_cannot_parse_is_named_without_its_text(tmp_path: Path) -> None:
    root = env_file(tmp_path, "DATABASE_URL=sqlite://\nDATABASE_PASSWORD='s3cret\n")

    with pytest.raises(ConfigError) as raised:
        load_environment(root, "x", {})

    assert "x.env, line 2: python-dotenv cannot parse this line" in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_single_quotes_keep_hashes_and_spaces_in_a_password(tmp_path: Path) -> None:
    text = "DATABASE_URL=postgresql+asyncpg://u@h/d\nDATABASE_PASSWORD=' p#w '\n"
    root = env_file(tmp_path, text)

    assert load_environment(root, "x", {}).url().password == " p#w "


@pytest.mark.parametrize("key", ["LOCK_TIMEOUT", "STATEMENT_TIMEOUT", "CLIENT_CHECK_INTERVAL"])
def test_postgres_durations_are_checked_before_connecting(tmp_path: Path, key: str) -> None:
    root = env_file(tmp_path, f"DATABASE_URL=postgresql+asyncpg://u@h/d\n{key}=abc\n")

    with pytest.raises(ConfigError, match=f"{key} must be a duration"):
        session_settings(load_environment(root, "x", {}))


@pytest.mark.parametrize("key", ["LOCK_TIMEOUT", "STATEMENT_TIMEOUT", "CLIENT_CHECK_INTERVAL"])
@pytest.mark.parametrize("value", ["5", "1.5"])
def test_a_duration_without_its_unit_is_refused(tmp_path: Path, key: str, value: str) -> None:
    """PostgreSQL reads ``LOCK_TIMEOUT=5`` as 5 ms: meant as 5 s, it failed revisions that
    met any lock at all."""
    root = env_file(tmp_path, f"DATABASE_URL=postgresql+asyncpg://u@h/d\n{key}={value}\n")

    with pytest.raises(ConfigError) as raised:
        session_settings(load_environment(root, "x", {}))

    assert str(raised.value) == (
        f"environments/x.env: {key}={value} has no unit, and PostgreSQL reads a bare number as "
        f"milliseconds: write {value}s for seconds, or {value}ms"
    )


@pytest.mark.parametrize("value", ["0", "0.0", "5s", "1.5 s", "500ms", "15min"])
def test_durations_with_a_unit_or_0_are_taken_as_written(tmp_path: Path, value: str) -> None:
    root = env_file(tmp_path, f"DATABASE_URL=postgresql+asyncpg://u@h/d\nLOCK_TIMEOUT={value}\n")

    assert session_settings(load_environment(root, "x", {}))["lock_timeout"] == value


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("", {"idle": "10s", "interval": "5s", "count": "4", "user": "30000ms"}),
        (
            "NETWORK_TIMEOUT=60\n",
            {"idle": "20s", "interval": "10s", "count": "4", "user": "60000ms"},
        ),
        ("NETWORK_TIMEOUT=0\n", {}),  # the server's own (the system's) keepalive
    ],
)
def test_the_server_gives_a_silent_migration_session_up_after_network_timeout(
    tmp_path: Path, setting: str, expected: dict[str, str]
) -> None:
    root = env_file(tmp_path, f"DATABASE_URL=postgresql+asyncpg://u@h/d\n{setting}")
    settings = session_settings(load_environment(root, "x", {}))

    names = {
        "idle": "tcp_keepalives_idle",
        "interval": "tcp_keepalives_interval",
        "count": "tcp_keepalives_count",
        "user": "tcp_user_timeout",
    }
    assert {key: settings[name] for key, name in names.items() if name in settings} == expected


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "30s"])
def test_a_network_timeout_that_is_no_number_of_seconds_is_refused(
    tmp_path: Path, value: str
) -> None:
    root = env_file(tmp_path, f"DATABASE_URL=postgresql+asyncpg://u@h/d\nNETWORK_TIMEOUT={value}\n")

    with pytest.raises(ConfigError) as raised:
        session_settings(load_environment(root, "x", {}))

    assert str(raised.value) == (
        f"environments/x.env: NETWORK_TIMEOUT must be a number, 0 or more, not '{value}'"
    )


def test_a_password_for_sqlite_is_a_clear_error(tmp_path: Path) -> None:
    root = env_file(tmp_path, "DATABASE_URL=sqlite:///x.sqlite3\nDATABASE_PASSWORD=pw\n")

    with pytest.raises(ConfigError, match="SQLite has no passwords"):
        load_environment(root, "x", {}).url()


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("sslmode=require", "?sslmode=, which these tasks do not take for PostgreSQL"),
        ("user=shop", "?user=, which these tasks do not take for PostgreSQL (they take ssl,"),
        ("database=shop", "write it in the URL itself: postgresql+asyncpg://USER@HOST:PORT/NAME"),
        ("port=5433", "write it in the URL itself: postgresql+asyncpg://USER@HOST:PORT/NAME"),
        ("password=pw", "in DATABASE_PASSWORD, or before the @ (USER:PASSWORD@HOST, URL-encoded)"),
        ("application_name=bot", "set APPLICATION_NAME in the env file instead"),
        ("ssl=require&command_timeout=5", "set CONNECT_TIMEOUT, LOCK_TIMEOUT or STATEMENT_TIMEOUT"),
        ("statement_cache_size=0", "write ?prepared_statement_cache_size=N (SQLAlchemy's"),
    ],
)
def test_a_url_parameter_the_tasks_do_not_take_is_named(
    tmp_path: Path, query: str, said: str
) -> None:
    """SQLAlchemy hands the query to asyncpg.connect(), which raised a TypeError on most of
    them. A user, database, port or password it would take, but the tasks read those from
    the URL itself (the lock's key, pg_dump), and mask only the password before the @."""
    url = "postgresql+asyncpg://shop:pw@db.invalid:5432/shop"
    root = env_file(tmp_path, f"DATABASE_URL={url}?{query}\n")

    with pytest.raises(ConfigError, match=re.escape(said)) as raised:
        load_environment(root, "x", {}).url()
    assert "pw" not in str(raised.value)
    env_file(tmp_path, f"DATABASE_URL={url}?ssl=require&target_session_attrs=primary\n")
    assert load_environment(root, "x", {}).url().query["ssl"] == "require"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgresql+asyncpg://s:pw@h/d?ssl=REQUIRE", "?ssl=REQUIRE; it takes one of disable,"),
        ("postgresql+asyncpg://s:pw@h/d?ssl=require&ssl=disable", "?ssl= 2 times: give it once"),
        ("postgresql+asyncpg://s:pw@h/d?target_session_attrs=rw", "one of any, primary,"),
        ("postgresql+asyncpg://s:pw@h/d?gsslib=krb", "?gsslib=krb; it takes gssapi or sspi"),
        ("postgresql+asyncpg://s:pw@h/d?prepared_statement_cache_size=x", "a whole number"),
        ("sqlite:///var/x.sqlite3?cached_statements=many", "?cached_statements=many; it takes a"),
        ("sqlite:///var/x.sqlite3?check_same_thread=maybe", "?check_same_thread=maybe; it take"),
    ],
)
def test_a_url_parameter_with_a_value_the_driver_cannot_take_is_named(
    tmp_path: Path, url: str, said: str
) -> None:
    """asyncpg refused these only when connecting (exit 1, as if the server were at fault,
    with a cache size as text a traceback) in words that were not the URL's: ``sslmode``
    for ``?ssl=``, and for ``?ssl=`` given twice that no PostgreSQL answered at all."""
    root = env_file(tmp_path, f"DATABASE_URL={url}\n")

    with pytest.raises(ConfigError, match=re.escape(said)) as raised:
        load_environment(root, "x", {}).url()
    assert "pw" not in str(raised.value)


def test_url_parameters_the_drivers_take_are_taken(tmp_path: Path) -> None:
    multihost = "host=a:5432&host=b:5433&target_session_attrs=primary"  # SQLAlchemy's form
    for query in (
        "ssl=verify_ca&target_session_attrs=read-write",
        "ssl=allow&gsslib=sspi",
        multihost,
    ):
        root = env_file(tmp_path, f"DATABASE_URL=postgresql+asyncpg://s@h/d?{query}\n")
        assert load_environment(root, "x", {}).url().query
    query = "check_same_thread=False&cached_statements=10"
    root = env_file(tmp_path, f"DATABASE_URL=sqlite:///var/x.sqlite3?{query}\n")
    assert load_environment(root, "x", {}).url().query["check_same_thread"] == "False"


def test_a_bad_url_parameter_is_a_usage_error_of_the_task(project: Project) -> None:
    project.write_env("dev", "DATABASE_URL=sqlite:///var/dev.sqlite3?cached_statements=many\n")

    result = project.invoke("migrate")

    assert result.returncode == 2
    assert result.stderr.endswith("it takes a whole number, 0 or more\n")
    assert "Traceback" not in result.stderr
    assert not (project.root / "var" / "dev.sqlite3").exists()


def test_libpqs_sslmode_gets_a_clear_error_from_the_task(project: Project) -> None:
    project.write_env("dev", "DATABASE_URL=postgresql+asyncpg://u@127.0.0.1/x?sslmode=require\n")

    error = project.fails("status")

    assert "for TLS write ?ssl=require (asyncpg's name for sslmode)" in error


def test_a_folder_that_cannot_be_made_is_a_clear_error(project: Project) -> None:
    (project.root / "blocked").write_text("a file where a folder should be\n")
    project.write_env("dev", "DATABASE_URL=sqlite:///blocked/dev.sqlite3\n")

    assert project.fails("status").endswith(
        f"error: cannot create {project.root}/blocked for the SQLite database: "
        f"{project.root}/blocked is a file; move it, or point DATABASE_URL elsewhere\n"
    )


def test_a_folder_where_the_sqlite_file_should_be_is_named(project: Project) -> None:
    (project.root / "var" / "dev.sqlite3").mkdir(parents=True)
    project.write_env("dev", "DATABASE_URL=sqlite:///var/dev.sqlite3\n")

    assert project.fails("migrate").endswith(
        f"error: {project.root}/var/dev.sqlite3 is a folder, not a SQLite file: point "
        "DATABASE_URL at a file\n"
    )


def test_a_backups_folder_that_cannot_be_made_stops_the_run(project: Project) -> None:
    project.migrated()
    project.add_revision("n", _revision("next01", HEAD))
    (project.root / "var" / "backups").write_text("not a folder\n")

    error = project.fails("migrate")

    assert "cannot write a backup in var/backups" in error


@pytest.mark.parametrize("flag", ["--lock-wait=abc", "--wait=-1", "--lock-wait=nan"])
def test_a_bad_number_of_seconds_is_a_usage_error(project: Project, flag: str) -> None:
    result = project.invoke("migrate", flag)

    assert result.returncode == 2, result.stderr
    assert "takes a number of seconds" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args", [("rollback", "--steps=x"), ("rollback", "--steps=0"), ("rollback", "--steps=1.5")]
)
def test_a_bad_count_is_a_usage_error(project: Project, args: tuple[str, ...]) -> None:
    result = project.invoke(*args)

    assert result.returncode == 2, result.stderr
    assert "--steps takes a whole number, 1 or more, not" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("migrate", "--to="),
        ("rollback", "--to="),
        ("offline-sql", "--to="),
        ("offline-sql", "--from="),
        ("stamp", ""),
        ("accept-changes", " "),
        ("resolve", "", "--applied"),
    ],
)
def test_an_empty_revision_is_a_usage_error(project: Project, args: tuple[str, ...]) -> None:
    """``--to=$REV`` with REV unset: refused, not taken for some revision (nor a crash)."""
    project.migrated()

    result = project.invoke(*args)

    assert result.returncode == 2, result.stderr
    assert "is empty: give a revision id, a prefix, or head" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("migrate", "--lock-wait="), "--lock-wait takes a number of seconds, 0 or more, not ''"),
        (("rollback", "--wait="), "--wait takes a number of seconds, 0 or more, not ''"),
        (("rollback", "--steps="), "--steps takes a whole number, 1 or more, not ''"),
        (("offline-sql", "--output="), "--output is empty: give a file"),
        (("restore", "--file="), "--file is empty: name a backup, or leave --file out"),
        # a fleet's flags, which one database has no use for, are checked on it all the same
        (("rollback", "--jobs="), "--jobs takes a whole number, 0 or more, not ''"),
        (("rollback", "--jobs=two"), "--jobs takes a whole number, 0 or more, not 'two'"),
        (("migrate", "--canary="), "--canary takes a whole number, 0 or more, not ''"),
        (("status", "--jobs=-1"), "--jobs takes a whole number, 0 or more, not '-1'"),
    ],
)
def test_an_empty_flag_is_refused_not_read_as_its_default(
    project: Project, args: tuple[str, ...], said: str
) -> None:
    """``--steps=$N`` or ``--file=$BACKUP`` with the variable unset: a usage error, not a run
    with the default (one step back, the newest backup) that the caller did not ask for."""
    project.add_revision("b", revision("second", HEAD))  # one step back is a real change
    project.migrated()

    result = project.invoke(*args)

    assert result.returncode == 2, result.stderr
    assert said in result.stderr
    assert "Traceback" not in result.stderr
    assert version(project) == ["second"]


def test_a_fleets_run_flags_run_one_database_as_without_them(project: Project) -> None:
    """One deploy script for every environment: --jobs, --canary and --keep-going have
    nothing to change on one database, and do not stop it."""
    project.add_revision("b", revision("second", HEAD))

    project.ok("migrate", "--jobs=4", "--canary=1", "--keep-going")

    assert version(project) == ["second"]


@pytest.mark.parametrize("args", [("migrate", "--to=+0"), ("rollback", "--to=-0")])
def test_a_step_of_nothing_is_a_usage_error(project: Project, args: tuple[str, ...]) -> None:
    """Alembic words ``+0`` as "Relative revision 0 didn't produce 0 migrations"."""
    project.migrated()

    result = project.invoke(*args)

    assert result.returncode == 2, result.stderr
    assert f"error: {args[1]} moves nowhere: give a step of 1 or more" in result.stderr


def test_seconds_flags_show_a_value_in_help(project: Project) -> None:
    shown = project.ok("--help", "migrate").stdout

    assert "--lock-wait=STRING" in shown and "--wait=STRING" in shown


@pytest.mark.parametrize("task", ["reset", "seed", "restore"])
def test_protected_environments_are_refused_before_their_password_is_needed(
    project: Project, task: str
) -> None:
    result = project.invoke(task, "--env=prod")

    assert result.returncode == 4, result.stderr
    assert "prod is protected" in result.stderr
    assert "PROD_DB_PASSWORD" not in result.stderr


def test_tasks_without_a_to_flag_do_not_suggest_one(project: Project) -> None:
    project.add_revision("a", _revision("branch1", HEAD))
    project.add_revision("b", _revision("branch2", HEAD))

    for task in (("makemigration", "--empty", "--message=x"), ("lint", "--all")):
        error = project.fails(*task)
        assert "2 heads" in error and "--to" not in error
    assert "--to=REV" in project.fails("migrate")


def test_a_relative_target_the_other_way_says_which_task_goes_there(project: Project) -> None:
    """``migrate --to=-1`` with a revision before the current one was answered "there are not
    1 revision(s) before the database's current one"; ``rollback --to=+1`` likewise."""
    table = 'op.create_table("next01", sa.Column("id", sa.Integer))'
    project.add_revision("next", revision("next01", HEAD, table))
    project.ok("migrate", f"--to={HEAD}")

    back = project.invoke("migrate", "--to=-1")
    forward = project.invoke("rollback", "--to=+1")

    assert back.returncode == 1 and forward.returncode == 1
    assert back.stderr.endswith(
        "error: --to=-1 goes back from the database's revision, and migrate only goes forward: "
        "`invoke rollback --env=dev --to=-1` goes back\n"
    )
    assert "rollback only goes back: `invoke migrate --env=dev --to=+1` goes forward" in (
        forward.stderr
    )
    assert version(project) == [HEAD]
    project.ok("migrate", "--to=+1")  # each, the right way round, gets there
    project.ok("rollback", "--to=-1")
    assert version(project) == [HEAD]


def test_a_relative_target_past_head_says_so(project: Project) -> None:
    project.migrated()

    error = project.fails("migrate", "--to=+1")

    assert "error: no revision comes after the database's current one, so +1 leads" in error
    assert "didn't produce" not in error
    assert "fewer than 3 revisions come after the database's current one, so +3 leads" in (
        project.fails("migrate", "--to=+3")
    )


def test_offline_sql_refuses_a_downgrade_range(project: Project) -> None:
    result = project.invoke("offline-sql", f"--from={HEAD}", "--to=base")

    assert result.returncode == 1
    assert "offline-sql writes upgrade SQL only" in result.stderr
    assert result.stdout == ""
    unknown = project.fails("offline-sql", "--env=prod", "--from=zzzz")
    assert "No such revision or branch 'zzzz'; see `invoke history --env=prod`" in unknown


def test_offline_sql_to_a_file_it_cannot_write_is_a_clear_error(project: Project) -> None:
    (project.root / "var").mkdir()

    for where, why in (("var", "Is a directory"), ("/proc/1/no.sql", "No such file")):
        result = project.invoke("offline-sql", f"--output={where}")
        assert result.returncode == 2, result.stderr
        assert f"error: cannot write the SQL to {where}: {why}" in result.stderr
        assert "Traceback" not in result.stderr
    project.ok("offline-sql", "--output=var/sql/new/all.sql")  # its folder is made
    assert "CREATE TABLE" in (project.root / "var" / "sql" / "new" / "all.sql").read_text()


def test_offline_sql_to_a_pipe_writes_into_it(project: Project) -> None:
    """``--output=>(psql ...)`` names a pipe: the SQL goes down it. Writing the file whole
    (a new file renamed over the path) replaced the pipe with a file, and its reader waited
    for ever."""
    pipe = project.root / "to-psql"
    os.mkfifo(pipe)
    reader = subprocess.Popen(["cat", str(pipe)], stdout=subprocess.PIPE, text=True)
    try:
        result = project.invoke("offline-sql", f"--output={pipe}")
        read, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
        reader.wait()
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE users" in read
    assert stat.S_ISFIFO(pipe.lstat().st_mode)


def test_offline_sql_to_dev_stdout_keeps_what_the_file_held(project: Project) -> None:
    """``invoke offline-sql --output=/dev/stdout >> all.sql``: /dev/stdout reopens the file,
    and opening it to write emptied it first."""
    log = project.root / "all.sql"
    log.write_text("-- earlier\n")
    with log.open("a") as appending:
        task = project.start("offline-sql", "--output=/dev/stdout", stdout=appending)
        assert task.wait(timeout=60) == 0

    assert log.read_text().startswith("-- earlier\n")
    assert "CREATE TABLE users" in log.read_text()


def test_offline_sql_to_a_file_keeps_its_mode_and_its_link(project: Project) -> None:
    """A file written whole is still the user's file: an existing one keeps its mode, a
    new one gets the umask's (not a temporary file's 0600), and a link still points at it."""
    shared = project.root / "shared"
    shared.mkdir()
    (shared / "schema.sql").write_text("old\n")
    (shared / "schema.sql").chmod(0o640)
    (project.root / "schema.sql").symlink_to(shared / "schema.sql")
    umask = os.umask(0o022)
    os.umask(umask)

    project.ok("offline-sql", "--output=schema.sql")
    project.ok("offline-sql", "--output=new.sql")

    assert (project.root / "schema.sql").is_symlink()
    assert "CREATE TABLE users" in (shared / "schema.sql").read_text()
    assert stat.S_IMODE((shared / "schema.sql").stat().st_mode) == 0o640
    assert stat.S_IMODE((project.root / "new.sql").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in shared.iterdir()] == ["schema.sql"]  # no temporary file left


def test_a_reader_that_leaves_early_ends_the_output_quietly(project: Project) -> None:
    """``invoke history | head -1``: the rest of the output has nowhere to go; that is
    no error of the task's, and no traceback."""
    project.migrated()
    for args in (["history"], ["offline-sql"], ["status", "--json"]):
        reader, writer = os.pipe()
        os.close(reader)  # as head does once it has its line
        try:
            task = project.start(*args, stdout=writer, stderr=subprocess.PIPE, text=True)
            _, err = task.communicate(timeout=60)
        finally:
            os.close(writer)
        assert "Traceback" not in err and "Exception ignored" not in err
        assert task.returncode == 128 + signal.SIGPIPE, err  # as a SIGPIPE would


def test_output_to_a_full_disk_ends_with_one_line(project: Project) -> None:
    """``invoke history > out.txt`` on a full disk: the task says so, without a traceback."""
    project.migrated()
    with tmpfs(project.root / "full", "4k") as full:
        (full / "filler").write_bytes(b"x" * 4096)
        for args in (["history"], ["offline-sql"], ["status", "--json"]):
            with (full / "out").open("w") as out:
                task = project.start(*args, stdout=out, stderr=subprocess.PIPE, text=True)
                _, err = task.communicate(timeout=60)
            assert task.returncode == 2, err
            assert err.endswith("error: cannot write the output: No space left on device\n")
            assert "Traceback" not in err and "Exception ignored" not in err


def test_output_to_a_closed_stdout_is_an_error_not_lost(project: Project) -> None:
    """``invoke status >&-``: Python gives the task no stdout, and print() dropped what it
    was given; status said nothing and exited 0, offline-sql ended in a traceback."""
    project.migrated()
    for args in (["history"], ["offline-sql"], ["status", "--json"], ["envs"]):
        task = project.start(
            *args, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1)
        )
        _, err = task.communicate(timeout=60)
        assert task.returncode == 2, err
        assert err.endswith(
            "error: cannot write the output: stdout is closed (the task was started with >&-?)\n"
        )
        assert "Traceback" not in err
    quiet = project.start(
        "migrate", stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1)
    )
    assert quiet.communicate(timeout=60)[1].endswith("already there\n")  # it writes no data
    assert quiet.returncode == 0


def test_output_its_encoding_cannot_hold_is_one_line_not_a_traceback(project: Project) -> None:
    """A revision's message in Japanese, printed where stdout is ASCII (a latin-1 locale,
    a Windows console sent to a file): status and history ended in a UnicodeEncodeError
    traceback. Never replaced either: offline-sql's output is SQL."""
    project.ok("makemigration", "日本語 coupons", "--empty")
    ascii_out = {**project.environ, "PYTHONIOENCODING": "ascii"}
    for args in (["history"], ["status"]):
        task = project.start(*args, env=ascii_out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = task.communicate(timeout=60)
        assert task.returncode == 2, err
        assert err.decode().endswith(
            "error: cannot write the output: it holds '\\u65e5\\u672c\\u8a9e', which "
            "stdout's encoding (ascii) cannot: set PYTHONIOENCODING=utf-8 (or a UTF-8 locale) "
            "and run it again\n"
        )
    utf8 = project.start("history", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert "日本語 coupons".encode() in utf8.communicate(timeout=60)[0]


def _revision(rev: str, down: str) -> str:
    return revision(rev, down, f'op.create_table("{rev}")')


def test_makemigration_without_a_message_gets_invokes_usage_line(project: Project) -> None:
    """invoke checks required arguments before the task runs: its own line, exit 1 (the
    README says so), and no traceback."""
    result = project.invoke("makemigration")

    assert result.returncode == 1
    assert "did not receive required positional arguments: 'message'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not [p for p in project.versions.glob("*.py") if HEAD not in p.name]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            "not Python",
            "error: db/migrations/env.py, line {last}, failed: SyntaxError: invalid syntax; fix "
            "it, or restore it from the repository (--debug shows the traceback)",
        ),
        (
            "an import that is gone",
            "error: db/migrations/env.py, line {line}, failed: ModuleNotFoundError: No module "
            "named 'db.lockz'; fix it, or restore it from the repository (--debug shows the "
            "traceback)",
        ),
        ("missing", "error: db/migrations/env.py is missing: restore it from the repository"),
    ],
)
def test_a_broken_or_missing_env_py_is_named_and_nothing_runs(
    project: Project, change: str, said: str
) -> None:
    """A user's edit that broke env.py ended in a traceback; a deleted one ran the stale
    bytecode of an older env.py from __pycache__ (Alembic's fallback for a missing file)."""
    env_py = project.root / "db" / "migrations" / "env.py"
    text = env_py.read_text()
    import_line = next(
        n for n, line in enumerate(text.splitlines(), 1) if line.startswith("from db.locks ")
    )
    if change == "not Python":
        env_py.write_text(text + "def (\n")
    elif change == "an import that is gone":
        env_py.write_text(text.replace("from db.locks import", "from db.lockz import"))
    else:
        py_compile.compile(str(env_py), cfile=importlib.util.cache_from_source(str(env_py)))
        env_py.unlink()  # its bytecode stays in __pycache__
    last = len(text.splitlines()) + 1

    for task in ("migrate", "offline-sql"):
        result = project.invoke(task)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1] == said.format(last=last, line=import_line)
        assert "Traceback" not in result.stderr
    assert not (project.root / "var" / "dev.sqlite3").exists()
