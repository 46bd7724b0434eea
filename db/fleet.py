"""Fleets: one environment, many databases (one per shop, or one schema per shop).

An env file names its targets with ``TARGETS`` (commas or whitespace), ``TARGETS_FILE``
(a name a line, optionally followed by that target's own URL) or ``TARGETS_QUERY`` (run on
``TARGETS_DATABASE_URL``: a name, and optionally a URL, per row), and puts ``{target}`` in
``DATABASE_URL`` (database per shop) or in ``SCHEMA`` (schema per shop). Here the targets
are read and checked, and each becomes an ordinary environment of its own; a run over
them is :mod:`db.fleet_runs`.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from db.environments import NAME_MAX, SCHEMA_NAME, SCHEMA_RULE, Environment
from db.errors import ConfigError, ConnectError, DbError, first_line
from db.urls import mask, parse_url

if TYPE_CHECKING:
    from sqlalchemy import URL, CursorResult

PLACEHOLDER = "{target}"
_BRACED = re.compile(r"\{\w*\}")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # never "..": a name is a path part
_TEMPLATED = ("DATABASE_URL", "MIGRATION_URL", "SCHEMA")
_SOURCES = ("TARGETS", "TARGETS_FILE", "TARGETS_QUERY")  # where a fleet's targets come from
_GLOB = re.compile(r"[*?[]")  # what makes an --only pattern a glob, not a name


@dataclass(frozen=True)
class Target:
    name: str
    url: str = ""  # its own DATABASE_URL, from TARGETS_FILE or TARGETS_QUERY; "": the template


def is_fleet(env: Environment) -> bool:
    """Whether the environment names targets. A ``{target}`` left with none named (an empty
    ``TARGETS``) is refused: it would make one database literally called ``{target}``."""
    named = any(env.get(key).strip() for key in _SOURCES)
    for key in _TEMPLATED:  # {tenant}, {TARGET}: left as it is, it names one odd database
        where = re.sub(r"//[^/]*@", "//", env.get(key))  # never a password's braces
        other = next((m for m in _BRACED.findall(where) if m != PLACEHOLDER), None)
        if other:
            raise ConfigError(
                f"{env.name}: {key} has {other}, which nothing fills in: the placeholder a "
                f"fleet fills with each target's name is {PLACEHOLDER}"
            )
    if env.get("TARGETS_DATABASE_URL").strip() and not env.get("TARGETS_QUERY").strip():
        raise ConfigError(  # else a catalog named for nothing: one database, or TARGETS', migrated
            f"{env.name}: TARGETS_DATABASE_URL is set, but no TARGETS_QUERY reads the catalog: "
            "add TARGETS_QUERY (the query of the targets' names), or remove TARGETS_DATABASE_URL"
        )
    placeholders = [key for key in _TEMPLATED if PLACEHOLDER in env.get(key)]
    if placeholders and not named:
        raise ConfigError(
            f"{env.name}: {placeholders[0]} has {PLACEHOLDER}, but no targets are named: set "
            "TARGETS, TARGETS_FILE or TARGETS_QUERY"
        )
    return named


def targets(env: Environment, only: str = "") -> list[Target]:
    """The fleet's targets, in order, narrowed to those matching ``only`` (globs)."""
    sources = [key for key in _SOURCES if env.get(key).strip()]
    if len(sources) > 1:  # which one wins would be a guess: a forgotten TARGETS, say
        raise ConfigError(
            f"{env.name}: {' and '.join(sources)} are both set: a fleet's targets come from "
            "one of TARGETS, TARGETS_FILE and TARGETS_QUERY"
        )
    if env.get("TARGETS_QUERY").strip():
        found = _from_catalog(env)
    elif env.get("TARGETS_FILE").strip():
        found = _from_file(env)
    else:
        found = [Target(name) for name in re.split(r"[\s,]+", env.get("TARGETS"))]
    found = [t for t in found if t.name]
    templated = any(PLACEHOLDER in env.get(key) for key in ("DATABASE_URL", "SCHEMA"))
    if not templated and not all(t.url for t in found):
        raise ConfigError(
            f"{env.name}: a fleet needs {PLACEHOLDER} in DATABASE_URL or in SCHEMA "
            "(or a URL for every target)"
        )
    _check_names(env, found)
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    names = {t.name for t in found}
    unknown = [p for p in patterns if p not in names and not _GLOB.search(p)]
    if unknown:  # a typo in a list of names would leave that target out without a word
        raise ConfigError(
            f"{env.name} has no target named {unknown[0]} (its targets: {_first(found)}): "
            "--only takes target names, and globs such as 'shop_a*'"
        )
    chosen = [t for t in found if not patterns or any(fnmatch.fnmatch(t.name, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"{env.name}: no target matches --only={only}")
    return chosen


def _check_names(env: Environment, found: list[Target]) -> None:
    """Some targets, each named once (a run reports on each by its name), in plain words."""
    source = next(k for k in _SOURCES if env.get(k).strip())
    if not found:
        raise ConfigError(f"{env.name}: {source} names no targets")
    for t in found:
        if not _NAME.fullmatch(t.name):
            raise ConfigError(
                f"{env.name}: target {t.name!r} must start with an ASCII letter, a digit or _, "
                "and hold ASCII letters, digits, . _ - only"
            )
        if len(t.name) > NAME_MAX:  # every revision's audit row would fail on PostgreSQL
            raise ConfigError(
                f"{env.name}: target {t.name[:20]}... is {len(t.name)} characters long, and "
                f"the audit trail keeps {NAME_MAX} at most: give it a shorter name"
            )
    for t in found:
        if t.url:  # said here, not as if the env file's DATABASE_URL were wrong
            parse_url(t.url, env.name, f"the URL {source} gives target {t.name}")
    twice = [name for name, count in Counter(t.name for t in found).items() if count > 1]
    if twice:
        raise ConfigError(
            f"{env.name}: {source} names {', '.join(twice)} more than once; name each target once"
        )
    template = env.get("SCHEMA")
    for t in found if PLACEHOLDER in template else []:  # before any target runs
        schema = template.replace(PLACEHOLDER, t.name)
        if not SCHEMA_NAME.fullmatch(schema):
            raise ConfigError(
                f"{env.name}: target {t.name!r} makes SCHEMA {schema!r}, which {SCHEMA_RULE}: "
                f"rename the target, or put a prefix in SCHEMA (SCHEMA=shop_{PLACEHOLDER})"
            )
    _distinct(env, found)


def _distinct(env: Environment, found: list[Target]) -> None:
    """Each target a database (and schema) of its own: a MIGRATION_URL without {target}, or
    a catalog giving two shops one URL, would migrate one database as several, and report
    the others as up to date; so would a name PostgreSQL cuts to its 63 bytes."""
    seen: dict[tuple[object, ...], str] = {}
    for t in found:
        here = environment(env, t)
        for url in {here.url(need_secrets=False, app=app) for app in (True, False)}:
            name = url.database or ""
            if url.get_backend_name() == "postgresql" and len(name.encode()) > 63:
                raise ConfigError(
                    f"{env.name}: target {t.name!r} makes the database name {name!r}, longer "
                    "than PostgreSQL's 63 bytes: give it a shorter name"
                )
        url, schema = here.url(need_secrets=False), env.get("SCHEMA").replace(PLACEHOLDER, t.name)
        where = (url.get_backend_name(), url.host, url.port or 5432, url.database, schema)
        if where in seen:
            place = mask(url) + (f", schema {schema}" if schema else "")
            fix = "give each target its own URL"
            if env.get("MIGRATION_URL") and PLACEHOLDER not in env.get("MIGRATION_URL"):
                fix = f"put {PLACEHOLDER} in MIGRATION_URL too"
            raise ConfigError(
                f"{env.name}: targets {seen[where]} and {t.name} are one database ({place}): {fix}"
            )
        seen[where] = t.name


def _parse(words: list[str]) -> Target:
    return Target(words[0], words[1] if len(words) > 1 else "") if words else Target("")


def _from_file(env: Environment) -> list[Target]:
    """Targets from ``TARGETS_FILE``: a name a line, and optionally its URL; ``#`` comments."""
    path = env.path(env.get("TARGETS_FILE").strip(), "TARGETS_FILE")
    where = f"TARGETS_FILE {env.relative(path)}"
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM: Notepad
    except OSError as exc:  # missing, a folder, unreadable
        raise ConfigError(
            f"cannot read {where}: {exc.strerror}; point TARGETS_FILE (a path from the "
            "project's folder) at a file that lists the targets, a name a line"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {where}: not UTF-8 text; save it as UTF-8") from None
    found = []
    for number, line in enumerate(lines, start=1):
        words = line.split("#")[0].split()
        if len(words) > 2:  # a name with a space in it, or a URL cut in two: say so
            raise ConfigError(
                f"{where}, line {number}: {len(words)} words; a line holds a target's name "
                "and, optionally, its URL"
            )
        found.append(_parse(words))
    return found


def _from_catalog(env: Environment) -> list[Target]:
    """Targets from ``TARGETS_QUERY`` (a name, and optionally a URL) on ``TARGETS_DATABASE_URL``,
    in a transaction that is rolled back, under the env file's LOCK_TIMEOUT and
    STATEMENT_TIMEOUT on PostgreSQL (a catalog table that a migration holds locked)."""
    from sqlalchemy import Connection, text

    from db.connections import with_connection

    catalog = _catalog_url(env)
    limits = {"lock_timeout": env.duration("LOCK_TIMEOUT", "5s")}
    limits["statement_timeout"] = env.duration("STATEMENT_TIMEOUT", "15min")

    def rows(connection: Connection) -> list[Target]:
        if connection.dialect.name == "postgresql":  # for this transaction: poolers keep it
            for name, value in limits.items():
                connection.execute(text("select set_config(:n, :v, true)"), {"n": name, "v": value})
        return _listed(env, connection.execute(text(env.get("TARGETS_QUERY"))))

    try:
        return with_connection(
            catalog,
            rows,
            connect_timeout=env.connect_timeout,
            network_timeout=env.network_timeout,
        )
    except DBAPIError as exc:
        raise _query_failed(env, exc, limits) from None
    except ConnectError as exc:  # the header shows the fleet's URL: say this one is the catalog
        raise ConnectError(
            f"{env.name}: cannot list the targets from the catalog (TARGETS_DATABASE_URL): {exc}"
        ) from None


def _catalog_url(env: Environment) -> URL:
    """``TARGETS_DATABASE_URL``, which must be there, and name a database that is."""
    from db.engines import sqlite_file_missing

    if not env.get("TARGETS_DATABASE_URL"):
        raise ConfigError(f"{env.name}: TARGETS_QUERY needs TARGETS_DATABASE_URL, the catalog")
    url = env.catalog_url()
    if sqlite_file_missing(url):  # not "TARGETS_QUERY failed: no such table"
        raise ConfigError(
            f"{env.name}: the catalog {env.relative(Path(url.database or ''))} "
            f"(TARGETS_DATABASE_URL) does not exist: point TARGETS_DATABASE_URL in "
            f"{env.relative(env.sources['TARGETS_DATABASE_URL'])} at the database that lists "
            "the targets"
        )
    return url


def _listed(env: Environment, found: CursorResult[Any]) -> list[Target]:
    """The targets the query's rows name: a name, and optionally a URL, each."""
    where = env.relative(env.sources["TARGETS_QUERY"])
    if not found.returns_rows:  # an UPDATE, say: rolled back as the connection closes
        raise ConfigError(
            f"{env.name}: TARGETS_QUERY returns no rows: it must be a query that lists "
            "the targets (select name[, url] from ...)"
        )
    if len(found.keys()) > 2:  # a column meant as a filter (active) would be ignored
        raise ConfigError(
            f"{env.name}: TARGETS_QUERY returns {len(found.keys())} columns: it must "
            f"return a target's name and, optionally, its URL; fix it in {where}"
        )
    listed = []
    for number, row in enumerate(found, start=1):
        if row[0] is None or not str(row[0]).strip():  # a shop that would go unmigrated
            raise ConfigError(
                f"{env.name}: row {number} of TARGETS_QUERY has no name (its first "
                "column is empty); give every shop a name, or leave it out in the query"
            )
        listed.append(_parse(["" if value is None else str(value) for value in row[:2]]))
    return listed


def _query_failed(env: Environment, exc: DBAPIError, limits: dict[str, str]) -> DbError:
    """The query's failure, in words: its own, or a lock or a slow server it waited on."""
    state = getattr(exc.orig, "sqlstate", None)
    if state in ("55P03", "57014"):  # not the query's fault: a lock, a slow server
        key = "LOCK_TIMEOUT" if state == "55P03" else "STATEMENT_TIMEOUT"
        return DbError(
            f"{env.name}: TARGETS_QUERY waited {limits[key.lower()]} ({key}) on the catalog, "
            f"and gave up ({first_line(exc)}): run the task again once the session that "
            f"holds it (a migration of the catalog?) is done, or raise {key}"
        )
    where = env.relative(env.sources["TARGETS_QUERY"])
    return ConfigError(f"{env.name}: TARGETS_QUERY failed: {first_line(exc)}; fix it in {where}")


def environment(env: Environment, target: Target) -> Environment:
    """The environment of one target: ``{target}`` filled in, or the target's own URL."""
    values = dict(env.values)
    for key in _TEMPLATED:
        if key in values:
            values[key] = values[key].replace(PLACEHOLDER, target.name)
    sources = dict(env.sources)
    if target.url:  # the catalog's URL serves the app and migrations alike
        values.pop("MIGRATION_URL", None)
        values["DATABASE_URL"] = target.url
        sources.setdefault("DATABASE_URL", env.root / "environments" / f"{env.name}.env")
    return replace(env, values=values, sources=sources, target=target.name)


def one(env: Environment, only: str) -> Environment:
    """The one target ``only`` names, for the tasks that work on one database at a time."""
    from db.errors import UsageError

    chosen = targets(env, only) if only else []
    if len(chosen) > 1:  # a glob that matched several
        raise UsageError(
            f"--only={only} matches {len(chosen)} targets of {env.name} ({_first(chosen)}); "
            "this task works on one target at a time: name one"
        )
    if not chosen:
        raise UsageError(
            f"{env.name} is a fleet: this task works on one target at a time; name it with "
            f"--only=NAME (e.g. one of {_first(targets(env))})"
        )
    return environment(env, chosen[0])


def _first(chosen: list[Target], most: int = 5) -> str:
    """The first few targets' names, for a message."""
    return ", ".join(t.name for t in chosen[:most]) + (", ..." if len(chosen) > most else "")


def host(env: Environment) -> str:
    """The server a target lives on (``local files`` for SQLite), for the per-host cap."""
    url = env.url(need_secrets=False)
    if url.get_backend_name() == "sqlite":
        return "local files"
    if url.host:
        return f"{url.host}:{url.port or 5432}"
    given = url.query.get("host", "")  # a socket's folder, or several hosts tried in turn
    found = (",".join(given) if isinstance(given, tuple) else given) or "the local socket"
    return f"{found}:{url.port}" if url.port else found  # another port: another server
