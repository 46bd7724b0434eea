"""Database URLs as the env files give them: parsed, checked before anything connects,
and shown with the password masked."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from db.errors import ConfigError

SUPPORTED_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql+asyncpg")
# What asyncpg takes from a URL's query: SQLAlchemy hands the query to asyncpg.connect()
# as text, so most else fails there (a timeout as text, libpq's sslmode); the timeouts
# are the env file's own keys. A user, password, database or port asyncpg would take, but
# the tasks read those from the URL itself (the lock's key, the banner's mask, pg_dump)
ASYNCPG_QUERY = (
    "ssl",
    "host",
    "passfile",
    "target_session_attrs",
    "krbsrvname",
    "gsslib",
    "prepared_statement_cache_size",
)
SQLITE_QUERY = ("check_same_thread", "cached_statements")  # the rest pysqlite ignores, or we set


_TARGET_PORT = re.compile(r"^[^/]*//[^/]*:\{target\}(/|$)")


def mask(url: URL) -> str:
    """The URL as text with its password replaced by ``***`` (a fleet's ``{target}`` kept),
    and a SQLite file's path as it is (not ``shop%20%2523`` for ``shop #2``)."""
    text = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database:
        text = text.replace("/" + quote(url.database, safe=" +/"), "/" + url.database, 1)
    return text.replace("%7Btarget%7D", "{target}")


def parse_url(text: str, where: str, what: str) -> URL:
    """``text`` as a URL of a supported driver; errors say ``where: what ...``, and never
    echo the text, which may hold a password."""
    if text != text.strip():  # kept by quotes: a database or file name ending in a space
        raise ConfigError(
            f"{where}: {what} starts or ends with a space (inside its quotes?): remove it"
        )
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        port = _TARGET_PORT.search(text)  # a fleet's targets told apart by port
        raise ConfigError(
            f"{where}: {what} is not a valid database URL "
            "(expected e.g. postgresql+asyncpg://user@host:5432/name or sqlite:///var/dev.sqlite3)"
            + (": {target} fills in a database, schema or host name, never a port" if port else "")
        ) from None
    if url.drivername not in SUPPORTED_DRIVERS:
        raise ConfigError(
            f"{where}: unsupported driver {url.drivername!r} in {what}; "
            f"use one of {', '.join(d + '://' for d in SUPPORTED_DRIVERS)}"
        )
    if url.port is not None and not 0 < url.port < 65536:  # else an OverflowError, connecting
        raise ConfigError(f"{where}: {what} has port {url.port}; a port is 1 to 65535")
    if url.get_backend_name() == "sqlite":
        _check_sqlite(url, where, what)
    if url.drivername == "postgresql+asyncpg":
        _check_asyncpg_query(url, where, what)
    return url


def _check_asyncpg_query(url: URL, where: str, what: str) -> None:
    unknown = [key for key in url.query if key not in ASYNCPG_QUERY]
    if unknown:
        raise ConfigError(
            f"{where}: {what} has ?{unknown[0]}=, which these tasks do not take for "
            f"PostgreSQL (they take {', '.join(ASYNCPG_QUERY)}){_QUERY_HINTS.get(unknown[0], '')}"
        )
    _check_query_values(url, where, what)


def _check_query_values(url: URL, where: str, what: str) -> None:
    """Each option of the query once, with a value the driver knows. Else the driver fails
    connecting, with exit 1 as if the server were at fault and in words that are not the
    URL's (``sslmode`` for ``?ssl=``), or SQLAlchemy fails with a traceback (a size as text)."""
    for key, value in url.query.items():
        if key == "host":  # given again and again: the hosts to try in turn (SQLAlchemy's)
            continue
        if not isinstance(value, str):  # ?ssl=require&ssl=disable: which one holds?
            raise ConfigError(f"{where}: {what} has ?{key}= {len(value)} times: give it once")
        takes, rule = _QUERY_VALUES.get(key, (lambda _value: True, ""))
        if not takes(value):
            raise ConfigError(f"{where}: {what} has ?{key}={value}; it takes {rule}")


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")  # libpq's
_SESSIONS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
_WHOLE = (str.isdigit, "a whole number, 0 or more")
# What each option takes, as the driver (or SQLAlchemy, for a boolean) reads it
_QUERY_VALUES: dict[str, tuple[Callable[[str], bool], str]] = {
    "ssl": (lambda v: v.replace("_", "-") in _SSL_MODES, f"one of {', '.join(_SSL_MODES)}"),
    "target_session_attrs": (lambda v: v in _SESSIONS, f"one of {', '.join(_SESSIONS)}"),
    "gsslib": (lambda v: v in ("gssapi", "sspi"), "gssapi or sspi"),
    "prepared_statement_cache_size": _WHOLE,
    "cached_statements": _WHOLE,
    "check_same_thread": (
        lambda v: v.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"),
        "true or false",
    ),
}


def _check_sqlite(url: URL, where: str, what: str) -> None:
    """A SQLite file, named by a plain path: an in-memory database would be migrated and
    gone when the task ends; a query option pysqlite ignores (``?mode=ro``) would be ignored
    silently, and a ``file:`` URI is no path to back up or check."""
    if not url.database or url.database == ":memory:":
        raise ConfigError(
            f"{where}: {what} is an in-memory SQLite database, which is gone when the task "
            "ends: name a file (sqlite:///var/dev.sqlite3)"
        )
    if url.database.endswith("/"):  # else a file named as the folder is made, or the one in it used
        raise ConfigError(
            f"{where}: {what} ends with /, so it names a folder: name the SQLite file in it "
            f"(sqlite:///{url.database}dev.sqlite3)"
        )
    unknown = [key for key in url.query if key not in SQLITE_QUERY]
    if unknown:
        hint = _QUERY_HINTS.get(unknown[0], "; name the file by a plain path, without options")
        raise ConfigError(
            f"{where}: {what} has ?{unknown[0]}=, which these tasks do not take for SQLite "
            f"(they take {', '.join(SQLITE_QUERY)}){hint}"
        )
    _check_query_values(url, where, what)


_IN_THE_URL = "; write it in the URL itself: postgresql+asyncpg://USER@HOST:PORT/NAME"
_QUERY_HINTS = {
    **dict.fromkeys(("user", "port", "database", "dbname"), _IN_THE_URL),
    "password": (
        "; give it in DATABASE_PASSWORD, or before the @ (USER:PASSWORD@HOST, URL-encoded): "
        "one in the query would be shown unmasked"
    ),
    "application_name": "; set APPLICATION_NAME in the env file instead",
    "sslmode": "; for TLS write ?ssl=require (asyncpg's name for sslmode)",
    "statement_cache_size": "; write ?prepared_statement_cache_size=N (SQLAlchemy's name for it)",
    **dict.fromkeys(
        ("timeout", "connect_timeout", "command_timeout", "statement_timeout"),
        "; set CONNECT_TIMEOUT, LOCK_TIMEOUT or STATEMENT_TIMEOUT in the env file instead",
    ),
}
