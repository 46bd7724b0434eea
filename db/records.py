"""Commands that record facts about a database without running its revisions.

``stamp`` adopts a database made some other way (``Base.metadata.create_all()``) once its
schema matches what the revision produces; ``resolve`` records how an interrupted
non-transactional revision ended; ``accept_changes`` records an applied file's edit.
Each runs under the migration lock, with the guards of ``migrate``, and leaves audit rows.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from alembic.runtime.migration import HeadMaintainer, RevisionStep
from alembic.runtime.migration import MigrationContext as Context
from alembic.script import Script, ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL

from db import audit, guards
from db.commands import (
    connection_of,
    migrate,
    record_event,
)
from db.connections import with_connection
from db.environments import Environment
from db.errors import (
    ConnectError,
    DbError,
    GuardRefused,
    Interrupted,
    MigrationFailed,
    NotApplied,
    RevisionError,
)
from db.revision_ids import by_id
from db.runner import RunOptions, load_scripts, make_config, run_env
from db.schema import differences, snapshot
from db.stop import Stop
from db.versions import applied_revisions, clear_versions, has_revision

T = TypeVar("T")


@dataclass(frozen=True)
class Stamped:
    revision: str  # the full id
    differences: list[str]  # what --force went past; empty when the schemas matched
    recorded: tuple[str, ...] = ()  # revisions now recorded as applied that were not
    unrecorded: tuple[str, ...] = ()  # revisions no longer applied (a stamp back), newest first
    # revisions applied already, whose files the audit trail had no checksum of (applied by
    # plain Alembic, or the trail was emptied), oldest first: recorded now
    adopted: tuple[str, ...] = ()
    # the revision(s) the version table held that no file has (squashed into others): gone
    replaced: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.recorded or self.unrecorded or self.adopted or self.replaced)

    @property
    def what(self) -> str:
        """What the stamp did to the version table and the audit trail, in words."""
        if self.replaced:
            gone = ", ".join(self.replaced)
            return (
                f"recorded {self.revision} as its revision, not run, in place of {gone}, "
                "which no file has"
            )
        if self.unrecorded:
            gone = ", ".join(self.unrecorded)
            done = f"recorded {self.revision} as its revision, not run; no longer applied: {gone}"
        elif self.recorded:
            done = f"recorded {self.revision} as applied, not run"
        elif self.adopted:
            done = f"already at {self.revision}"
        else:
            return f"already at {self.revision}: nothing recorded"
        if self.adopted:
            done += (
                f"; recorded the checksums of {len(self.adopted)} revision(s) applied without "
                f"any: {', '.join(self.adopted)}"
            )
        return done


def stamp_target(script: ScriptDirectory, revision: str, flags: str) -> Script:
    """The one revision ``stamp`` may record: one the files have, and not base."""
    found = by_id(script, revision, flags, "stamp")
    if found is None:
        raise RevisionError("stamp needs a revision, not base: roll back instead")
    return found


def stamp(
    env: Environment, revision: str, force: bool = False, options: RunOptions | None = None
) -> Stamped:
    """Record ``revision`` as applied without running it, once the database's schema is the
    one ``revision`` produces (built in a scratch database to compare); ``force`` skips that."""
    options = options or RunOptions()
    config = make_config(env, options, lock=True)
    script = load_scripts(config)
    found = stamp_target(script, revision, env.flags)
    stop = options.stop
    try:  # a signal while it compares: the scratch database's state is nobody's business
        here = snapshot(env, stop.check)
        sides = ("in the database", f"in what {found.revision} produces")
        gaps = differences(here, scratch_schema(env, found.revision, stop), sides)
    except Interrupted as exc:
        raise Interrupted("interrupted before stamping: nothing was recorded", exc.signum) from None
    if gaps and not force:
        raise GuardRefused(
            f"the {env.label} database is not what revision {found.revision} produces "
            f"({'; '.join(gaps[:5])}{'; ...' if len(gaps) > 5 else ''}): nothing was recorded; "
            "make them match, or pass --force if you are sure"
        )

    added: list[str] = []
    removed: list[str] = []
    adopted: list[str] = []  # applied already, without a checksum in the trail
    replaced: list[str] = []  # in the version table, in no file: squashed away

    def record(current: tuple[str, ...], context: Context) -> list[RevisionStep]:
        connection = connection_of(context)
        guards.valid_ids(current)
        replaced.extend(rev for rev in current if not has_revision(script, rev))
        if not replaced:  # else the schema matched (or --force): the files' history wins
            guards.known_revisions(script, current, env)
        log = audit.entries(connection, env.schema)
        guards.same_environment(log, env, options.allow_env_mismatch)
        guards.all_finished(log, env, connection)
        before = set() if replaced else applied_revisions(script, current)
        if replaced:
            clear_versions(connection, env.schema)
        context.stamp(script, found.revision)
        audit.ensure_table(connection.execute)
        heads = tuple(context.get_current_heads())
        now = applied_revisions(script, heads)
        adopted.extend(rev for rev in guards.unrecorded(log, script, heads) if rev in before)
        # a row for each revision the stamp added, and for each applied one the trail had no
        # checksum of (the schema matched, so their files are taken as they are), and one for
        # each it took away (a stamp back), so the trail says which files count as applied
        for rev in script.walk_revisions():  # newest first, Scripts with their paths
            if rev.revision in now - before:
                added.append(rev.revision)
                record_event(connection, env, rev.revision, "stamp", rev.path)
            elif rev.revision in adopted:
                record_event(connection, env, rev.revision, "stamp", rev.path)
            elif rev.revision in before - now:
                removed.append(rev.revision)
                record_event(connection, env, rev.revision, "unstamp", rev.path)
        # and, squashed, each revision the trail has as applied that no file has any more:
        # else every later run would call its file missing (and refuse, where protected)
        for gone in audit.applied_checksums(log) if replaced else ():
            if not has_revision(script, gone):
                record_event(connection, env, gone, "unstamp", None)
        return []

    run_env(config, script, record)
    return Stamped(
        found.revision, gaps, tuple(added), tuple(removed), tuple(adopted), tuple(replaced)
    )


def scratch_schema(
    env: Environment, revision: str, stop: Stop | None = None
) -> dict[str, dict[str, object]]:
    """The schema ``revision`` produces, migrated into a scratch database of the same kind;
    ``stop``: the stamp's, which a signal (or a fleet's halt) ends that migration with."""
    with scratch_database(env) as url:
        values = {**env.values, "DATABASE_URL": url.render_as_string(hide_password=False)}
        values.pop("MIGRATION_URL", None)
        values.update(PROTECTED="false", BACKUP="")
        sources = {key: env.sources.get(key, env.root / "environments") for key in values}
        scratch = replace(env, values=values, sources=sources, missing={})
        try:
            migrate(scratch, revision, RunOptions(backup=False, stop=stop or Stop()))
        except MigrationFailed as exc:  # its "the database is at" is the scratch database's
            failed = str(exc).splitlines()[0]
            raise MigrationFailed(
                f"stamp builds what {revision} produces in a scratch database, to compare, and "
                f"the revisions failed there: {failed}\nnothing was recorded; the {env.label} "
                "database is as it was. A revision that needs what a new database lacks (an "
                "extension: CREATE EXTENSION IF NOT EXISTS ...) must make it, as each new "
                "database needs; or pass --force to record it without comparing"
            ) from exc
        except ConnectError as exc:  # made a moment ago: what stands between does not know it
            raise ConnectError(
                f"{exc}; stamp had just made that scratch database to compare with: a pooler "
                "(PgBouncer) in front of the server knows only the databases it lists, so set "
                f"MIGRATION_URL in environments/{env.name}.env to the server itself, or pass "
                "--force; nothing was recorded"
            ) from exc
        return snapshot(scratch)


@contextmanager
def scratch_database(env: Environment) -> Iterator[URL]:
    """A throwaway database beside the env's: a SQLite file, or a PostgreSQL database on the
    same server (needs CREATEDB), dropped afterwards."""
    url = env.url()
    if url.get_backend_name() == "sqlite":
        with tempfile.TemporaryDirectory(prefix="stamp-") as folder:
            yield url.set(database=str(Path(folder) / "scratch.sqlite3"))
        return
    # named for the database it is compared with (one a killed stamp left says whose it is)
    named = f"stamp_scratch_{uuid.uuid4().hex[:12]}_{url.database or ''}".encode()
    name = named[:63].decode(errors="ignore")  # PostgreSQL's longest name, in bytes
    quoted = '"' + name.replace('"', '""') + '"'
    drop = f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"
    try:  # a signal while the server creates it (no task is told) must not leave it behind
        _admin(url, f"CREATE DATABASE {quoted}")
        yield url.set(database=name)
    except BaseException:
        with suppress(Exception):  # the failure that stopped it is the one to tell
            _admin(url, drop)
        raise
    _admin(url, drop)


def _admin(url: URL, statement: str) -> None:
    def run(connection: Connection) -> None:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.execute(text(statement))

    try:
        with_connection(url, run)
    except DbError:
        raise
    except Exception as exc:
        raise DbError(
            f"cannot make a scratch database to compare with ({exc.__class__.__name__}): "
            "grant CREATEDB for stamp's check, or pass --force"
        ) from exc


@dataclass(frozen=True)
class Accepted:
    revision: str  # the full id
    checksum: str
    changed: bool  # False: the file was as recorded, and nothing was written
    first: bool = False  # the trail had no checksum of it (applied by plain Alembic): one now


def accept_changes(env: Environment, revision: str, options: RunOptions | None = None) -> Accepted:
    """Record the current checksum of an applied revision's edited file."""

    def accept(script: ScriptDirectory, current: tuple[str, ...], context: Context) -> Accepted:
        connection = connection_of(context)
        found = by_id(script, revision, env.flags, "accept-changes")
        if found is None or found.revision not in applied_revisions(script, current):
            raise NotApplied(f"revision {revision} is not applied to the {env.label} database")
        log = audit.entries(connection, env.schema)
        sums = audit.applied_checksums(log).get(found.revision, (None, None))
        first = sums[0] is None
        changed = first or not audit.unchanged(found.path, *sums)
        if changed:
            audit.ensure_table(connection.execute)
            record_event(connection, env, found.revision, "accept", found.path)
        return Accepted(found.revision, audit.checksum(found.path), changed, first)

    return _locked(env, options, accept)


@dataclass(frozen=True)
class Resolved:
    revision: str
    upgrade: bool  # the run that did not finish was its upgrade (else its downgrade)
    applied: bool  # that run's changes are all in the database (else none are)
    at: str  # where the database is now

    @property
    def described(self) -> str:
        """What was recorded, in words that say whether the revision is applied now."""
        if self.upgrade:
            return f"recorded {self.revision} as {'applied' if self.applied else 'rolled back'}"
        if self.applied:
            return f"recorded the downgrade of {self.revision} as finished: it is not applied"
        return f"recorded the downgrade of {self.revision} as rolled back: it is still applied"


def resolve(
    env: Environment, revision: str, applied: bool, options: RunOptions | None = None
) -> Resolved:
    """Record how an unfinished non-transactional run of a revision ended.

    ``applied``: the run's work is all in the database, so the version table moves as that
    step would have moved it (past the revision after an upgrade, to its parents after a
    downgrade, other branches' heads kept); otherwise the revision stays where it was, and
    the run will be made again.
    """

    def settle(script: ScriptDirectory, _current: tuple[str, ...], context: Context) -> Resolved:
        connection = connection_of(context)
        log = audit.entries(connection, env.schema)
        found = [e for e in audit.unfinished(log) if e.revision == revision]
        if not found:
            raise RevisionError(
                f"revision {revision} has no unfinished run on the {env.label} database: "
                f"nothing to resolve (see `invoke history {env.flags}`)"
            )
        upgrade = found[-1].direction == "run-up"
        file = by_id(script, revision, env.flags, "resolve") if applied else None
        if file is not None:  # the version table moved as Alembic moves it after a step
            step = RevisionStep(script.revision_map, file, upgrade)
            HeadMaintainer(context, context.get_current_heads()).update_to_step(step)
        audit.resolve(connection, found[-1], applied, audit.Who.here(env))
        at = ", ".join(context.get_current_heads()) or "base"
        return Resolved(revision, upgrade, applied, at)

    return _locked(env, options, settle)


def _locked(
    env: Environment,
    options: RunOptions | None,
    work: Callable[[ScriptDirectory, tuple[str, ...], Context], T],
) -> T:
    """Run ``work`` under the migration lock, once the database's revision is known to the
    files; returns what it returns (it runs no revision, so it makes no SQLite file)."""
    config = make_config(env, options or RunOptions(), lock=True, creates=False)
    script = load_scripts(config)
    results: list[T] = []

    def run(current: tuple[str, ...], context: Context) -> list[RevisionStep]:
        guards.known_revisions(script, current, env)
        results.append(work(script, current, context))
        return []

    run_env(config, script, run)
    return results[0]
