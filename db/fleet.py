"""Fleets: one environment, many databases (one per shop), migrated in parallel.

An env file names its targets with ``TARGETS`` (commas or whitespace) or ``TARGETS_FILE``
(one name a line), and puts ``{target}`` in ``DATABASE_URL`` (and ``MIGRATION_URL``).
Each target is an ordinary environment of its own, run through the one-database path with
all its promises (its own lock, per-revision atomicity, audit rows, checksums, guards).
Alembic keeps its state in module globals, so targets run in worker processes (each
starts once and takes target after target), never in threads of one interpreter.
"""

from __future__ import annotations

import fnmatch
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError

from db.environments import Environment, load_environment
from db.errors import ConfigError, DbError, first_line

PLACEHOLDER = "{target}"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
FAILED_EXIT = 6  # some targets failed


@dataclass(frozen=True)
class Outcome:
    """What became of one target."""

    target: str
    state: str  # migrated, up to date, failed, skipped, read
    detail: str = ""  # the revisions applied, or the one-line reason
    current: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    pending: int = 0
    exit_code: int = 0


def is_fleet(env: Environment) -> bool:
    return any(env.get(key).strip() for key in ("TARGETS", "TARGETS_FILE", "TARGETS_QUERY"))


def targets(env: Environment, only: str = "") -> list[str]:
    """The fleet's target names, in order, narrowed to those matching ``only`` (globs)."""
    if env.get("TARGETS_QUERY").strip():
        names = _from_catalog(env)
    elif env.get("TARGETS_FILE").strip():
        path = env.root / env.get("TARGETS_FILE").strip()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read TARGETS_FILE {env.relative(path)}: {exc.strerror}"
            ) from None
        names = [line.split("#")[0].strip() for line in text.splitlines()]
    else:
        names = re.split(r"[\s,]+", env.get("TARGETS"))
    names = [name for name in names if name]
    for name in names:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{env.name}: target {name!r} may hold letters, digits, . _ - only")
    if PLACEHOLDER not in env.get("DATABASE_URL"):
        raise ConfigError(f"{env.name}: a fleet's DATABASE_URL must contain {PLACEHOLDER}")
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [n for n in names if not patterns or any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"{env.name}: no target matches --only={only}")
    return chosen


def _from_catalog(env: Environment) -> list[str]:
    """Target names from ``TARGETS_QUERY`` (its first column) run on ``TARGETS_DATABASE_URL``."""
    from sqlalchemy import Connection, text

    from db.engines import with_connection

    if not env.get("TARGETS_DATABASE_URL"):
        raise ConfigError(f"{env.name}: TARGETS_QUERY needs TARGETS_DATABASE_URL, the catalog")
    catalog = replace(env, values={**env.values, "DATABASE_URL": env.get("TARGETS_DATABASE_URL")})
    catalog_url = catalog.url(app=True)

    def names(connection: Connection) -> list[str]:
        return [str(row[0]) for row in connection.execute(text(env.get("TARGETS_QUERY")))]

    try:
        return with_connection(catalog_url, names, connect_timeout=env.connect_timeout)
    except DBAPIError as exc:
        raise ConfigError(f"{env.name}: TARGETS_QUERY failed: {first_line(exc)}") from None


def target(env: Environment, name: str) -> Environment:
    """The environment of one target: ``{target}`` filled in its URLs."""
    values = dict(env.values)
    for key in ("DATABASE_URL", "MIGRATION_URL"):
        if key in values:
            values[key] = values[key].replace(PLACEHOLDER, name)
    return replace(env, values=values)


def run(
    env: Environment,
    environ: Mapping[str, str],
    task: str,
    names: list[str],
    *,
    jobs: int,
    keep_going: bool = False,
    canary: int = 0,
    to: str = "head",
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """``task`` (migrate or status) on every target, ``jobs`` at a time, in worker processes.

    By default the first failure stops new targets from starting (those are ``skipped``);
    ``keep_going`` runs them all. ``canary``: the first N targets go first, and the rest
    only if all N succeeded. Outcomes come back in the order of ``names``.
    """
    if canary:

        def batch(chosen: list[str]) -> list[Outcome]:
            return run(
                env, environ, task, chosen, jobs=jobs, keep_going=keep_going, to=to, on_done=on_done
            )

        first = batch(names[:canary])
        if any(outcome.state == "failed" for outcome in first):
            return first + [Outcome(n, "skipped", "a canary failed") for n in names[canary:]]
        return first + batch(names[canary:])
    done: dict[str, Outcome] = {}
    waiting, where = list(reversed(names)), (env.root, env.name, dict(environ))
    hosts = {name: _host(target(env, name)) for name in names}
    cap = int(env.number("MAX_CONNECTIONS_PER_HOST", 0)) or jobs
    # imported once here, inherited by every forked worker instead of imported in each
    from db import commands  # noqa: F401
    from db.engines import is_async

    if names and is_async(target(env, names[0]).url(need_secrets=False)):
        import asyncpg  # type: ignore[import-untyped]  # noqa: F401
        import sqlalchemy.ext.asyncio  # noqa: F401

    context = multiprocessing.get_context("fork")  # workers start from this process's state
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool:
        running: dict[Future[Outcome], str] = {}
        while waiting or running:
            while len(running) < jobs and (name := _next(waiting, running, hosts, cap)):
                running[pool.submit(_work, *where, name, task, to)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                outcome = _outcome(future, running.pop(future))
                done[outcome.target] = outcome
                if on_done is not None:
                    on_done(outcome)
                if outcome.state == "failed" and not keep_going:
                    skipped = (Outcome(name, "skipped", "after a failure") for name in waiting)
                    done.update({outcome.target: outcome for outcome in skipped})
                    waiting.clear()
    return [done[name] for name in names]


def _next(
    waiting: list[str], running: dict[Future[Outcome], str], hosts: dict[str, str], cap: int
) -> str | None:
    """The next waiting target whose server has fewer than ``cap`` targets running."""
    busy = Counter(hosts[name] for name in running.values())
    for index in range(len(waiting) - 1, -1, -1):  # the list is reversed: the end is next
        if busy[hosts[waiting[index]]] < cap:
            return waiting.pop(index)
    return None


def _host(env: Environment) -> str:
    url = env.url(need_secrets=False)
    return f"{url.host}:{url.port or 5432}" if url.host else "local files"


def exit_code(outcomes: list[Outcome]) -> int:
    failed = [o for o in outcomes if o.state in ("failed", "skipped")]
    return FAILED_EXIT if failed else 0


def default_jobs(count: int) -> int:
    """Two targets per core (they mostly wait on their servers), never more than targets."""
    return max(1, min(count, 2 * (os.cpu_count() or 1)))


def _outcome(future: Future[Outcome], name: str) -> Outcome:
    try:
        return future.result()
    except Exception as exc:  # a worker that died: the target's state is unknown
        return Outcome(name, "failed", f"the worker failed: {type(exc).__name__}", exit_code=1)


def _work(
    root: Path, env_name: str, environ: dict[str, str], name: str, task: str, to: str
) -> Outcome:
    """One target, in a worker process: read its version (without the lock, and without
    Alembic's env.py); migrate it, through the one-database path, only if it is behind."""
    from db import commands
    from db.runner import RunOptions

    try:
        env = target(load_environment(root, env_name, environ), name)
        script = _scripts(env)
        current = _versions(env)
        heads = tuple(script.get_heads())
        pending = len(commands.plan_steps(script, "heads", current, up=True))
        if task == "status" or not pending:
            state = "read" if task == "status" else "up to date"
            return Outcome(name, state, "", current, heads, pending)
        steps = commands.migrate(env, to, RunOptions())
        applied = ", ".join(step.revision for step in steps)
        return Outcome(name, "migrated", applied, heads or current, heads)
    except DbError as exc:
        reason = str(exc).splitlines()[0]
        return Outcome(name, "failed", reason, exit_code=exc.exit_code)
    except CommandError as exc:  # a version the files do not have
        return Outcome(name, "failed", str(exc).splitlines()[0], exit_code=1)


_LOADED: dict[Path, ScriptDirectory] = {}


def _scripts(env: Environment) -> ScriptDirectory:
    """The revision files, read once per worker process, whatever the number of targets."""
    if env.root not in _LOADED:
        from db.runner import load_scripts, make_config

        _LOADED[env.root] = load_scripts(make_config(env, offline=True))
    return _LOADED[env.root]


def _versions(env: Environment) -> tuple[str, ...]:
    from db.runner import current_heads

    return current_heads(env.url(), env.connect_timeout)
