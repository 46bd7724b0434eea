"""Unit tests of environment loading: precedence, ${VAR}, URLs, masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.environments import known_environments, load_environment
from db.errors import ConfigError
from db.urls import mask


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "environments").mkdir()
    return tmp_path


def write(root: Path, name: str, text: str) -> None:
    (root / "environments" / name).write_text(text)


def test_known_environments_ignore_local_files(root: Path) -> None:
    for name in ("dev.env", "prod.env", "dev.local.env"):
        write(root, name, "")
    assert known_environments(root) == ["dev", "prod"]


def test_a_folder_named_like_an_env_file_is_no_environment(root: Path) -> None:
    write(root, "dev.env", "DATABASE_URL=sqlite:///var/dev.sqlite3\n")
    (root / "environments" / "old.env").mkdir()

    assert known_environments(root) == ["dev"]
    with pytest.raises(
        ConfigError, match=r"unknown environment 'old': known environments are dev \("
    ):
        load_environment(root, "old", {})


def test_a_link_to_an_env_file_that_is_not_there_is_said_not_skipped(root: Path) -> None:
    """dev.local.env may be a link to a secret's mount. One whose file was missing was
    skipped without a word, so the tasks ran on the URL dev.env commits; an environment
    whose own file is such a link was "unknown", to be made by adding that file."""
    write(root, "dev.env", "DATABASE_URL=postgresql+asyncpg://u@committed/db\n")
    (root / "environments" / "dev.local.env").symlink_to(root / "secrets" / "dev.local.env")

    with pytest.raises(
        ConfigError,
        match=r"cannot read environments/dev\.local\.env: it is a link to \S+/secrets/dev\.local"
        r"\.env, which is not there; make that file, or remove the link",
    ):
        load_environment(root, "dev", {})
    (root / "secrets").mkdir()
    (root / "secrets" / "dev.local.env").write_text("DATABASE_URL=postgresql+asyncpg://u@mine/db\n")
    assert load_environment(root, "dev", {}).url().host == "mine"

    (root / "environments" / "y.env").symlink_to(root / "nowhere.env")
    assert known_environments(root) == ["dev", "y"]
    with pytest.raises(ConfigError, match=r"cannot read environments/y\.env: it is a link to"):
        load_environment(root, "y", {})


def test_variables_come_from_the_given_environ(root: Path) -> None:
    write(root, "x.env", "DATABASE_URL=postgresql+asyncpg://u@${HOST}/db\n")
    env = load_environment(root, "x", {"HOST": "db.example"})
    assert env.url().host == "db.example"


def test_process_environment_never_replaces_a_file_key(root: Path) -> None:
    write(root, "x.env", "DATABASE_URL=sqlite:///var/x.sqlite3\n")
    env = load_environment(root, "x", {"DATABASE_URL": "sqlite:///elsewhere.sqlite3"})
    assert env.url().database == str(root / "var" / "x.sqlite3")


def test_local_file_overrides_and_may_define_the_secret(root: Path) -> None:
    write(
        root,
        "x.env",
        ("DATABASE_URL=postgresql+asyncpg://u@h/db\nDATABASE_PASSWORD=${X_PASSWORD}\n"),
    )
    write(
        root, "x.local.env", "X_PASSWORD=from-local\nDATABASE_URL=postgresql+asyncpg://u@other/db\n"
    )
    url = load_environment(root, "x", {"X_PASSWORD": "from-process"}).url()
    assert url.host == "other"
    assert url.password == "from-process"  # X_PASSWORD is defined below the key that uses it


def test_a_key_defined_above_feeds_a_reference(root: Path) -> None:
    write(root, "x.env", "PW=from-file\nDATABASE_URL=sqlite:///a\nDATABASE_PASSWORD=${PW}\n")
    assert load_environment(root, "x", {"PW": "process"}).get("DATABASE_PASSWORD") == "from-file"


def test_double_dollar_is_a_literal_dollar(root: Path) -> None:
    write(root, "x.env", "DATABASE_URL=sqlite:///a\nDATABASE_PASSWORD='pa$$${NOT}'\n")
    env = load_environment(root, "x", {})
    assert env.missing == {"DATABASE_PASSWORD": "NOT"}
    write(root, "x.env", "DATABASE_URL=sqlite:///a\nDATABASE_PASSWORD='pa$$$$word'\n")
    assert load_environment(root, "x", {}).get("DATABASE_PASSWORD") == "pa$$word"


def test_a_reference_may_give_a_default_as_python_dotenv_reads_it(root: Path) -> None:
    write(root, "x.env", "DATABASE_URL=sqlite:///a\nDATABASE_PASSWORD=${PW:-dev pass}\n")
    assert load_environment(root, "x", {}).get("DATABASE_PASSWORD") == "dev pass"
    assert load_environment(root, "x", {"PW": "s3cret"}).get("DATABASE_PASSWORD") == "s3cret"
    assert load_environment(root, "x", {"PW": ""}).get("DATABASE_PASSWORD") == ""  # set: kept


@pytest.mark.parametrize("value", ["${PW:?unset}", "${PW-d}", "pa${ss", "${1}", "${}"])
def test_a_reference_it_cannot_expand_is_refused_not_kept_as_text(root: Path, value: str) -> None:
    """Kept as text, ``${PW:?unset}`` would silently become part of the password."""
    write(root, "x.env", f"DATABASE_URL=sqlite:///a\nDATABASE_PASSWORD='{value}'\n")
    with pytest.raises(ConfigError) as refused:
        load_environment(root, "x", {"PW": "s3cret"})
    said = str(refused.value)
    assert said == (
        "environments/x.env: DATABASE_PASSWORD has a ${...} that is neither ${NAME} nor "
        "${NAME:-default}: write $$ for a literal $"
    )


def test_missing_variable_is_an_error_only_when_secrets_are_needed(root: Path) -> None:
    write(root, "x.env", "DATABASE_URL=postgresql+asyncpg://u@h/db\nDATABASE_PASSWORD=${PW}\n")
    env = load_environment(root, "x", {})
    with pytest.raises(ConfigError, match=r"environments/x.env: DATABASE_PASSWORD uses \$\{PW\}"):
        env.url()
    assert env.url(need_secrets=False).get_backend_name() == "postgresql"


def test_password_with_url_syntax_survives_and_is_masked(root: Path) -> None:
    nasty = "p%40 @:/?#'\"x%"
    write(root, "x.env", "DATABASE_URL=postgresql+asyncpg://u@h:5432/db\nDATABASE_PASSWORD=${PW}\n")
    url = load_environment(root, "x", {"PW": nasty}).url()
    assert url.password == nasty
    assert url.host == "h" and url.port == 5432 and url.database == "db"
    assert mask(url) == "postgresql+asyncpg://u:***@h:5432/db"


def test_relative_sqlite_paths_resolve_against_the_root(root: Path) -> None:
    write(root, "x.env", "DATABASE_URL=sqlite:///var/dev.sqlite3\n")
    write(root, "y.env", "DATABASE_URL=sqlite:////abs/y.sqlite3\n")
    assert load_environment(root, "x", {}).url().database == str(root / "var/dev.sqlite3")
    assert load_environment(root, "y", {}).url().database == "/abs/y.sqlite3"


def test_a_sqlite_path_from_home_is_not_a_folder_named_tilde(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(root / "home"))
    write(root, "x.env", "DATABASE_URL=sqlite:///~/shop/dev.sqlite3\n")
    assert load_environment(root, "x", {}).url().database == str(root / "home/shop/dev.sqlite3")
    assert load_environment(root, "x", {}).url(app=True).database == str(
        root / "home/shop/dev.sqlite3"
    )
    write(root, "y.env", "DATABASE_URL=sqlite:///~nobody_here_at_all/dev.sqlite3\n")
    with pytest.raises(ConfigError, match="starts with a home folder that does not exist here"):
        load_environment(root, "y", {}).url()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("DATABASE_URL=mysql://u@h/db", "unsupported driver 'mysql'"),
        ("DATABASE_URL=not a url", "not a valid database URL"),
        ("DATABASE_URL=postgresql+asyncpg://u@h:99999/db", "has port 99999; a port is 1 to 65535"),
        ("CONNECT_TIMEOUT=1", "does not set DATABASE_URL"),
        # migrated, then gone with the task: every later task would find it at base
        ("DATABASE_URL=sqlite://", "DATABASE_URL is an in-memory SQLite database, which is gone"),
        ("DATABASE_URL=sqlite:///:memory:", "is an in-memory SQLite database"),
        # a folder: SQLite would make a file "var", or take var/x/ for the file var/x
        ("DATABASE_URL=sqlite:///var/", r"ends with /, so it names a folder: .*sqlite:///var/dev"),
        ("DATABASE_URL=sqlite:///var/dev.sqlite3/", "ends with /, so it names a folder"),
        # pysqlite ignores ?mode=ro (with a warning, after the run wrote to the file)
        ("DATABASE_URL=sqlite:///x.db?mode=ro", r"has \?mode=, which these tasks do not take"),
        ("DATABASE_URL=sqlite:///file:x.db?uri=true", r"has \?uri=, .* by a plain path"),
        ("DATABASE_URL=sqlite:///x.db?timeout=9", "set CONNECT_TIMEOUT"),
        # quotes keep the space: a file "x.db " made, or a database "shop " not found
        ('DATABASE_URL="sqlite:///x.db "', "DATABASE_URL starts or ends with a space"),
        ("DATABASE_URL=' postgresql+asyncpg://u@h/shop'", "starts or ends with a space"),
    ],
)
def test_bad_urls(root: Path, line: str, message: str) -> None:
    write(root, "x.env", line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_environment(root, "x", {}).url()


def test_connect_wait_comes_from_the_env_file_unless_the_flag_says(root: Path) -> None:
    from db.runner import RunOptions, make_config

    write(root, "x.env", "DATABASE_URL=sqlite:///x.sqlite3\nCONNECT_WAIT=7\n")
    env = load_environment(root, "x", {})
    assert make_config(env).attributes["run"].wait == 7
    assert make_config(env, RunOptions(wait=2)).attributes["run"].wait == 2
