"""Fleets: one environment, many databases (one per shop, or one schema per shop).

An env file names its targets with ``TARGETS`` (commas or whitespace), ``TARGETS_FILE``
(a name a line, optionally followed by that target's own URL) or ``TARGETS_QUERY`` (run on
``TARGETS_DATABASE_URL``: a name, and optionally a URL, per row), and puts ``{target}`` in
``DATABASE_URL`` (database per shop) or in ``SCHEMA`` (schema per shop).

Each target is an ordinary environment of its own, run through the one-database path with
all its promises (its own lock, per-revision atomicity, audit rows, checksums, guards).
Alembic keeps its state in module globals, so targets run in worker processes (each starts
once and takes target after target), never in threads of one interpreter.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from sqlalchemy.exc import DBAPIError

from db.environments import SCHEMA_NAME, SCHEMA_RULE, Environment
from db.errors import ConfigError, first_line
from db.files import write_whole
from db.urls import mask, parse_url

if TYPE_CHECKING:
    from db.stop import Stop

PLACEHOLDER = "{target}"
_BRACED = re.compile(r"\{\w*\}")
RUNS_DIR = Path("var") / "runs"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # never "..": a name is a path part
_TEMPLATED = ("DATABASE_URL", "MIGRATION_URL", "SCHEMA")
_SOURCES = ("TARGETS", "TARGETS_FILE", "TARGETS_QUERY")  # where a fleet's targets come from
CHANGING = ("migrate", "rollback", "stamp", "seed")  # the tasks that write a run report
# a target's run came back without an outcome: locked by another run, or its server had no
# free connection; it is tried again once the other targets are done
RETRIED_LAST = ("locked", "busy")


@dataclass(frozen=True)
class Target:
    name: str
    url: str = ""  # its own DATABASE_URL, from TARGETS_FILE or TARGETS_QUERY; "": the template


@dataclass(frozen=True)
class Outcome:
    """What became of one target."""

    target: str
    # migrated, up to date, rolled back, stamped, seeded, read, passed, problems,
    # locked (retried at the end), failed, stopped (after a revision: another failed), skipped
    state: str
    detail: str = ""  # the revisions applied, or the one-line reason
    current: tuple[str, ...] | None = None  # its revision(s), () at base; None: not known
    heads: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()  # revision ids still to apply, oldest first
    applied: tuple[str, ...] = ()  # every revision applied (history)
    exit_code: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()  # what its run noted on the way: a backup, a warning

    @property
    def where(self) -> str | None:
        """Its revision(s) in words ("base" for none), or None when not known."""
        return None if self.current is None else ", ".join(self.current) or "base"

    @property
    def failed(self) -> bool:
        return self.state in ("failed", "stopped", "skipped")


class TaskArgs(TypedDict, total=False):
    """What each target's task takes from the command line."""

    to: str | None  # migrate: the revision to reach; rollback: the one to go back to
    steps: int  # rollback
    revision: str  # stamp
    force: bool  # stamp
    lock_wait: float
    wait: float | None
    allow_env_mismatch: bool
    retry: bool  # set by the pool: False on the last try, which waits for the lock


@dataclass(frozen=True)
class Plan:
    """How a fleet run goes: how many at once, what stops it, what each target is asked."""

    task: str
    args: TaskArgs = field(default_factory=lambda: TaskArgs())
    jobs: int = 1
    keep_going: bool = False
    canary: int = 0


def check(env: Environment, plan: Plan, chosen: list[Target]) -> None:
    """Refuse, before any of the ``chosen`` targets starts, what would fail on every target
    alike: revision files that do not load, several heads for a migrate to head, a revision
    (``--to``, or the one to stamp) that the files do not have, a bad ``RUNS_KEEP``."""
    from db import guards
    from db.records import stamp_target
    from db.revision_ids import known_revision
    from db.runner import load_scripts, make_config

    if plan.task in CHANGING:  # a bad setting, said now rather than after the run
        env.number("RUNS_KEEP", 100)
    if plan.task not in ("migrate", "rollback", "stamp"):
        return
    # the files are the same for every target; a target's own settings make the Config
    script = load_scripts(make_config(environment(env, chosen[0]), offline=True))
    if plan.task == "stamp":
        stamp_target(script, plan.args.get("revision", ""), env.flags)
    elif plan.task == "migrate" and plan.args.get("to") == "head":
        guards.single_head(script, to_flag=True)
    elif plan.args.get("to"):
        known_revision(script, plan.args.get("to") or "", env.flags)


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
                f"{env.name}: target {t.name!r} must start with a letter, a digit or _, and "
                "hold letters, digits, . _ - only"
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
    path = env.root / env.get("TARGETS_FILE").strip()
    where = f"TARGETS_FILE {env.relative(path)}"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {where}: not UTF-8 text") from None
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
    """Targets from ``TARGETS_QUERY`` (a name, and optionally a URL) on ``TARGETS_DATABASE_URL``."""
    from sqlalchemy import Connection, text

    from db.engines import with_connection

    if not env.get("TARGETS_DATABASE_URL"):
        raise ConfigError(f"{env.name}: TARGETS_QUERY needs TARGETS_DATABASE_URL, the catalog")
    catalog_url = env.catalog_url()

    def rows(connection: Connection) -> list[Target]:
        found = connection.execute(text(env.get("TARGETS_QUERY")))
        if not found.returns_rows:  # an UPDATE, say: rolled back as the connection closes
            raise ConfigError(
                f"{env.name}: TARGETS_QUERY returns no rows: it must be a query that lists "
                "the targets (select name[, url] from ...)"
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

    try:
        return with_connection(catalog_url, rows, connect_timeout=env.connect_timeout)
    except DBAPIError as exc:
        raise ConfigError(f"{env.name}: TARGETS_QUERY failed: {first_line(exc)}") from None


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
    if len(chosen) != 1:
        names = ", ".join(t.name for t in (chosen or targets(env))[:5])
        raise UsageError(
            f"{env.name} is a fleet: this task works on one target at a time; name it with "
            f"--only=NAME (e.g. one of {names})"
        )
    return environment(env, chosen[0])


def history(env: Environment, outcomes: list[Outcome]) -> list[tuple[Any, list[str]]]:
    """Every revision, newest first, with the targets it is applied on."""
    from db.progress import Revision
    from db.runner import load_scripts, make_config

    script = load_scripts(make_config(env, offline=True))
    return [
        (Revision.of(rev), [o.target for o in outcomes if rev.revision in o.applied])
        for rev in script.walk_revisions()
    ]


def offline_sql(env: Environment, only: str, start: str | None, to: str) -> dict[str, str]:
    """Each chosen target's SQL: its own, since its audit rows name it (and its schema, or its
    own URL's dialect, may differ)."""
    from db.authoring import offline_sql as render

    return {t.name: render(environment(env, t), start, to) for t in targets(env, only)}


def write_sql(folder: Path, scripts: Mapping[str, str]) -> dict[str, Path]:
    """Write each target's SQL to ``folder/NAME.sql``; returns the paths."""
    from db.authoring import write_sql

    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"{folder} is a file: on a fleet, --output names a folder (a file per target)"
        )
    written = {name: folder / f"{name}.sql" for name in scripts}
    for name, path in written.items():
        write_sql(path, scripts[name])
    return written


def host(env: Environment) -> str:
    """The server a target lives on (``local files`` for SQLite), for the per-host cap."""
    url = env.url(need_secrets=False)
    if url.get_backend_name() == "sqlite":
        return "local files"
    if url.host:
        return f"{url.host}:{url.port or 5432}"
    given = url.query.get("host", "")  # a socket's folder, or several hosts tried in turn
    return ",".join(given) if isinstance(given, tuple) else given or "the local socket"


def default_jobs(count: int, hosts: int) -> int:
    """Two targets per core and server (they mostly wait on their servers), at most the
    number of targets."""
    return max(1, min(count, 2 * (os.cpu_count() or 1) * max(1, hosts)))


def exit_code(outcomes: list[Outcome], signum: int | None = None) -> int:
    """0 when every target got there; else the failures' common code (3: lock waits ran out,
    4: guards refused, 130/143: interrupted), or 6 when they differ. ``signum``: the signal
    that stopped the run, whose code it is when no target failed otherwise (say, a signal
    before any target started, so that all were skipped)."""
    from db.errors import FleetFailed

    codes = {o.exit_code for o in outcomes if o.state == "failed"}
    if signum and codes <= {128 + signum} and any(o.failed for o in outcomes):
        return 128 + signum
    if len(codes) == 1 and codes <= {3, 4, 130, 143}:
        return codes.pop()
    return FleetFailed.exit_code if codes or any(o.failed for o in outcomes) else 0


def report(
    env: Environment, plan: Plan, outcomes: list[Outcome], started: datetime, code: int
) -> dict[str, Any]:
    """The run as data: what ``--json`` prints and ``var/runs/ENV-TIMESTAMP.json`` keeps."""
    finished = datetime.now(timezone.utc)
    return {
        "environment": env.name,
        "task": plan.task,
        "started_at": started.isoformat(),
        "seconds": round((finished - started).total_seconds(), 3),
        "exit_code": code,
        "counts": {s: sum(o.state == s for o in outcomes) for s in {o.state for o in outcomes}},
        "targets": [target_json(o) for o in outcomes],
    }


def target_json(o: Outcome) -> dict[str, Any]:
    row = {k: v for k, v in asdict(o).items() if k not in ("applied", "exit_code", "detail")}
    row.update(
        up_to_date=not o.failed and not o.pending,
        detail=o.detail if not o.failed else "",
        error=o.detail if o.failed else None,
    )
    return {key: list(v) if isinstance(v, tuple) else v for key, v in row.items()}


def write_report(env: Environment, data: Mapping[str, Any]) -> Path | None:
    """Keep a run's report in ``var/runs``, and the newest ``RUNS_KEEP`` (default 100) of
    the environment's; returns its path, or None when ``RUNS_KEEP=0`` keeps none."""
    keep = int(env.number("RUNS_KEEP", 100))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = env.root / RUNS_DIR / f"{env.name}-{stamp}.json"
    if keep:
        try:
            write_whole(path, json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            why = exc.strerror
            raise ConfigError(f"cannot write the run's report to {RUNS_DIR}: {why}") from None
    for old in sorted(path.parent.glob(f"{env.name}-*.json"), reverse=True)[keep:]:
        old.unlink(missing_ok=True)
    return path if keep else None


def run(
    env: Environment,
    environ: Mapping[str, str],
    chosen: list[Target],
    plan: Plan,
    on_done: Callable[[Outcome], None] | None = None,
    on_start: Callable[[Target], None] | None = None,
    stop: Stop | None = None,
) -> list[Outcome]:
    """``plan.task`` on every target, ``plan.jobs`` at a time, in worker processes.

    The first failure stops new targets from starting (those are ``skipped``) and the
    running ones after their current revision (``stopped``), unless ``keep_going``;
    ``canary``: the first N go first, and the rest only if all N succeeded. A target whose
    lock another run holds is retried once the others are done. Outcomes come back in the
    order of ``chosen``. A requested ``stop`` (a signal) starts no more targets;
    the running ones stop as one run would.
    """
    from db.pool import Pool

    if plan.canary:
        batch, rest = chosen[: plan.canary], chosen[plan.canary :]
        first = run(env, environ, batch, replace(plan, canary=0), on_done, on_start, stop)
        if any(o.failed for o in first):
            return first + [Outcome(t.name, "skipped", "a canary failed") for t in rest]
        return first + run(env, environ, rest, replace(plan, canary=0), on_done, on_start, stop)
    hosts = {t.name: host(environment(env, t)) for t in chosen}
    cap = int(env.number("MAX_CONNECTIONS_PER_HOST", 0)) or plan.jobs
    # no more workers than can run at once: each is a process forked up front (--jobs=2000
    # on two targets forked 2000 of them)
    useful = min(plan.jobs, len(chosen), cap * len(set(hosts.values())))
    plan = replace(plan, jobs=max(1, useful))
    with Pool(env, environ, plan, hosts, cap, stop, first=chosen[0] if chosen else None) as pool:
        return pool.run(chosen, on_done, on_start)
