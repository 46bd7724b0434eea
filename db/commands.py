"""The migration commands, one small function each over an environment."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

from alembic import util
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection

from db import audit, backups, guards
from db.engines import (
    sqlite_file_missing,
)
from db.environments import Environment
from db.errors import DbError, RevisionError, refused_at, resolve_hint
from db.progress import Revision
from db.revision_ids import PAST_THE_ENDS, known_revision, one_way
from db.runner import Progress, RunOptions, Step, load_scripts, make_config, run_env, run_of
from db.versions import applied_revisions

Plan = Callable[[ScriptDirectory, tuple[str, ...]], list[RevisionStep]]


@dataclass(frozen=True)
class Unfinished:
    """A non-transactional run that started and never finished: migrate and rollback
    refuse until ``invoke resolve`` records how it ended."""

    id: str
    direction: str  # "upgrade" or "downgrade"
    started_at: datetime
    said: str  # what it is and what to do, in words


@dataclass(frozen=True)
class Status:
    current: tuple[Revision, ...]
    heads: tuple[Revision, ...]
    pending: tuple[Revision, ...]
    unfinished: tuple[Unfinished, ...] = ()

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.unfinished


@dataclass(frozen=True)
class HistoryEntry:
    revision: Revision
    applied: bool
    is_head: bool
    applied_at: datetime | None = None
    applied_by: str | None = None  # user@host


@dataclass(frozen=True)
class State:
    """What the database says: its revision(s) and its audit trail."""

    current: tuple[str, ...]
    log: list[audit.Entry]


def migrate(env: Environment, to: str = "head", options: RunOptions | None = None) -> list[Step]:
    """Upgrade to ``to`` (head, an id or prefix, or ``+N``); returns the steps applied."""
    one_way(to, up=True, flags=env.flags)

    def plan(script: ScriptDirectory, current: tuple[str, ...]) -> list[RevisionStep]:
        known_revision(script, to, env.flags)
        steps = plan_steps(script, to, current, up=True, flags=env.flags)
        if not steps:
            guards.reached(script, to, current, env)
        return steps

    return _change(env, options, plan, single_head=to == "head")


def rollback(
    env: Environment, steps: int = 1, to: str | None = None, options: RunOptions | None = None
) -> list[Step]:
    """Downgrade ``steps`` revisions, or to ``to`` (an id, prefix or ``base``)."""
    if steps < 1:
        raise DbError(f"--steps must be 1 or more, not {steps}")
    if to is not None:
        one_way(to, up=False, flags=env.flags)

    def plan(script: ScriptDirectory, current: tuple[str, ...]) -> list[RevisionStep]:
        return rollback_plan(env, script, current, steps, to)

    return _change(env, options, plan, creates=False)  # nothing to undo in a file not made


def rollback_plan(
    env: Environment,
    script: ScriptDirectory,
    current: tuple[str, ...],
    steps: int = 1,
    to: str | None = None,
) -> list[RevisionStep]:
    """What a rollback of ``steps`` revisions, or to ``to``, undoes from ``current``."""
    if to is None and not current:
        return []
    if to is not None:
        known_revision(script, to, env.flags)
        guards.not_ahead(script, to, current, env)
    back = to or steps_back(script, current, steps)
    return plan_steps(script, back, current, up=False, flags=env.flags)


def steps_back(script: ScriptDirectory, current: tuple[str, ...], steps: int) -> str:
    """The target that undoes the last ``steps`` revisions, also at a merge point.

    At a merge revision, one step back undoes the merge alone and leaves its branches as
    heads; from several heads, the caller must say which branch with --to.
    """
    if len(current) > 1:
        raise RevisionError(
            f"the database has {len(current)} heads ({', '.join(current)}): say which branch to "
            f"roll back, e.g. --to={current[0]}@-1, or join them with `invoke merge` first"
        )
    head = script.get_revision(current[0])
    parents = util.to_tuple(head.down_revision if head else None, default=())
    if len(parents) > 1:
        if steps > 1:
            raise RevisionError(
                f"revision {current[0]} merges {', '.join(parents)}, so {steps} steps back is "
                "ambiguous: roll back the merge alone (--steps=1), then a branch with --to=REV@-1"
            )
        return str(parents[0])  # Alembic undoes only the merge: both parents stay applied
    depth = _depth(script, current[0])
    if steps > depth:
        applied = "only 1 is applied" if depth == 1 else f"only {depth} are applied"
        raise RevisionError(
            f"cannot roll back {steps} revisions: {applied} (use --to=base to undo them all)"
        )
    return f"-{steps}"


def status(env: Environment, options: RunOptions | None = None) -> Status:
    """The database's revision(s), the scripts' head(s), and what is pending, oldest first.

    Applied files that changed are an error on protected environments, else a warning.
    """
    options = options or RunOptions()
    config = make_config(env, options)
    script = load_scripts(config)
    state = read_state(env, config, script)
    guards.unchanged_files(state.log, script, env, options.note)
    missing = no_database_yet(env, run_of(config).url)
    if missing:
        options.note(missing)
    pending = [step.revision for step in plan_steps(script, "heads", state.current, up=True)]
    return Status(
        current=tuple(Revision.of(script.get_revision(rev)) for rev in state.current),
        heads=tuple(Revision.of(script.get_revision(rev)) for rev in script.get_heads()),
        pending=tuple(Revision.of(rev) for rev in pending),
        unfinished=unfinished(state.log, env),
    )


def no_database_yet(env: Environment, url: URL) -> str | None:
    """A SQLite file that no migrate has made, in words: read, it is at base."""
    if not sqlite_file_missing(url):
        return None
    where = env.relative(Path(url.database or ""))
    return f"there is no database at {where} yet: `invoke migrate {env.flags}` makes it"


def unfinished(log: list[audit.Entry], env: Environment) -> tuple[Unfinished, ...]:
    """The non-transactional runs the audit trail shows started and never finished."""
    found = []
    for entry in audit.unfinished(log):
        upgrade = entry.direction == "run-up"
        hint = resolve_hint(env.flags, entry.revision, upgrade)
        said = f"{guards.never_finished(entry)}: check what it did, then record it with {hint}"
        direction = "upgrade" if upgrade else "downgrade"
        found.append(Unfinished(entry.revision, direction, entry.started_at, said))
    return tuple(found)


def history(env: Environment) -> list[HistoryEntry]:
    """Every revision, newest first, marking those applied, and when and by whom."""
    config = make_config(env)
    script = load_scripts(config)
    state = read_state(env, config, script)
    applied = applied_revisions(script, state.current)
    last_up = {e.revision: e for e in state.log if e.direction in ("up", "stamp")}
    heads = set(script.get_heads())
    entries = []
    for rev in script.walk_revisions():
        up = last_up.get(rev.revision) if rev.revision in applied else None
        entries.append(
            HistoryEntry(
                Revision.of(rev),
                rev.revision in applied,
                rev.revision in heads,
                up.started_at if up else None,
                f"{up.os_user}@{up.host}" if up else None,
            )
        )
    return entries


def read_state(
    env: Environment, config: Config, script: ScriptDirectory, known: bool = True
) -> State:
    """The revision ids recorded in the database (empty at base) and its audit trail;
    ``known``: each must be a revision of the files (reset, which drops them all, need not
    know where the database is)."""
    found: list[State] = []

    def read(current: tuple[str, ...], context: MigrationContext) -> list[RevisionStep]:
        found.append(State(tuple(current), audit.entries(connection_of(context), env.schema)))
        return []

    run_env(config, script, read, dont_mutate=True)
    if known:
        guards.known_revisions(script, found[0].current, env)
    return found[0]


def _change(
    env: Environment,
    options: RunOptions | None,
    plan: Plan,
    *,
    single_head: bool = False,
    creates: bool = True,
) -> list[Step]:
    """Run the steps ``plan(script, current)`` chooses, under the lock, after the guards;
    ``creates``: a SQLite file not there yet is made (migrate), or read as empty."""
    options = options or RunOptions()
    config = make_config(env, options, lock=True, creates=creates)
    backups.check_file(env, run_of(config).url, options)
    script = load_scripts(config)
    if single_head:
        guards.single_head(script, to_flag=True)
    progress = Progress(
        env.name, audit.Who.here(env), options.on_start, options.on_step, options.stop
    )
    confirmed = options.confirmed
    if confirmed is None:
        confirmed = _confirmed_first(env, config, script, plan, options)

    def run(current: tuple[str, ...], context: MigrationContext) -> Iterator[RevisionStep]:
        with refused_at(current):  # a refusal here leaves the database where it was
            guards.known_revisions(script, current, env)
            connection = connection_of(context)
            log = audit.entries(connection, env.schema)
            renamed = guards.same_environment(log, env, options.allow_env_mismatch)
            guards.unchanged_files(log, script, env, options.note)
            guards.all_finished(log, env, connection)
            steps = plan(script, current)
            guards.valid_ids(step.revision.revision for step in steps)
            revisions = tuple(Revision.of(step.revision) for step in steps)
            if confirmed is not None:
                guards.as_confirmed(confirmed, tuple(r.id for r in revisions))
            elif options.on_plan is not None:  # under the lock: the plan is what will run
                options.on_plan(revisions)
            if steps and options.backup:
                options.note(backups.before_change(env, run_of(config).url, options.stop))
        if steps or renamed:
            audit.ensure_table(connection.execute)
        if renamed:  # stamp the database with its new environment name
            record_event(connection, env, ",".join(current) or "base", "env", None)
        return progress.steps(steps, context)

    run_env(config, script, run, progress)
    return progress.applied


def _confirmed_first(
    env: Environment, config: Config, script: ScriptDirectory, plan: Plan, options: RunOptions
) -> tuple[str, ...] | None:
    """On SQLite, the plan shown and confirmed before the run locks the file: under the
    lock (a write transaction) the app could not write while a person read the plan. The
    run then refuses a plan that is no longer this one. None where the plan is confirmed
    under the lock (PostgreSQL's lock keeps no one from writing), or is not to be."""
    if options.on_plan is None or run_of(config).url.get_backend_name() != "sqlite":
        return None
    state = read_state(env, make_config(env, options), script)  # a read: no lock
    if audit.unfinished(state.log):  # refused under the lock, where it names the statement
        return None
    guards.same_environment(state.log, env, options.allow_env_mismatch)
    guards.unchanged_files(state.log, script, env, lambda _warning: None)  # said in the run
    revisions = tuple(Revision.of(step.revision) for step in plan(script, state.current))
    options.on_plan(revisions)
    return tuple(r.id for r in revisions)


def record_event(
    connection: Connection, env: Environment, revision: str, direction: str, path: str | None
) -> None:
    row = audit.Row(
        revision,
        direction,
        env.name,
        datetime.now(timezone.utc),
        0,
        audit.Who.here(env),
        audit.checksum(path) if path else None,
        audit.code_checksum(path) if path else None,
    )
    audit.record(connection, row)


def connection_of(context: MigrationContext) -> Connection:
    if context.connection is None:
        raise DbError("this task needs a database connection, not offline SQL")
    return context.connection


def _depth(script: ScriptDirectory, rev: str) -> int:
    return sum(1 for _ in script.revision_map.iterate_revisions(rev, "base"))


def plan_steps(
    script: ScriptDirectory, to: str, current: tuple[str, ...], *, up: bool, flags: str = ""
) -> list[RevisionStep]:
    """The steps from ``current`` to ``to``, as ``alembic upgrade``/``downgrade`` plan them;
    ``flags`` name the database in the message for a ``to`` past the history's ends."""
    heads = cast(str, current)  # Alembic's own commands pass the heads tuple, typed as str
    try:
        return script._upgrade_revs(to, heads) if up else script._downgrade_revs(to, heads)
    except AssertionError:  # Alembic asserts where REV+N, REV-N or head-N finds nothing
        where = " ".join(("invoke history", flags)).strip()
        raise RevisionError(f"{to!r}: {PAST_THE_ENDS}; see `{where}`") from None
