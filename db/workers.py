"""What a worker process of a fleet run does: one task on one target, through the
one-database path, stopping as the parent tells it (a signal, or another target's failure).
The pool that starts the workers and hands them targets is :mod:`db.pool`.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from db import audit, commands, guards
from db.connections import with_database
from db.environments import Environment, load_environment
from db.errors import (
    CheckFailed,
    ConnectError,
    DbError,
    GuardRefused,
    Halted,
    LockTimeout,
    NotApplied,
    RevisionError,
    refused_at,
)
from db.failures import describe, what_to_do
from db.fleet import Target, environment
from db.fleet_runs import Outcome, TaskArgs
from db.locks import LOCK_WAIT, lock_timeout_for_this_read
from db.revision_ids import revision_error
from db.runner import RunOptions, load_scripts, make_config, session_settings
from db.stop import Stop
from db.versions import applied_revisions, version_of

P = ParamSpec("P")
HALT = -1  # told to the workers when a target failed (a signal's number, when signalled)
FEWER_AT_ONCE = "run fewer targets at once on that server: lower --jobs or MAX_CONNECTIONS_PER_HOST"
RETRY_CONNECT_WAIT = 10.0  # seconds a target tried again last retries connecting


_STOP = Stop()
_BUSY = threading.Event()  # set while the worker runs a target
_NOTES: list[str] = []  # what the target's run noted (a backup, a warning), for its outcome


def start_worker(told: Any, leave: Any) -> None:
    """Signals are the parent's to handle: it writes a signal's number in ``told``, and each
    worker stops its run as that signal would have; or HALT, when a target failed, and each
    worker lets its running revision finish, then stops. ``leave``: the pool broke (a worker
    died), so no result will be read: each worker exits once its target is done. A parent
    that died without a word (SIGKILL, the OOM killer) counts as SIGTERM and as ``leave``:
    no worker lives on without it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and so Python's terminate() on a broken pool
    parent = os.getppid()

    def watch() -> None:
        while True:
            value = told.value
            orphaned = os.getppid() != parent
            if orphaned and not _STOP.requested:
                _STOP.request(signal.SIGTERM)
            elif value > 0 and not _STOP.requested:
                _STOP.request(value)
            elif value == HALT and _STOP.halted is None:
                _STOP.halt("another target failed, so it stopped before its next revision")
            if (leave.value or orphaned) and not _BUSY.is_set():
                os._exit(0)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def _busy(task: Callable[P, Outcome]) -> Callable[P, Outcome]:
    """``task``, with the worker marked busy while it runs (a broken pool's worker leaves
    only once idle)."""

    @functools.wraps(task)
    def marked(*args: P.args, **kwargs: P.kwargs) -> Outcome:
        _BUSY.set()
        try:
            return task(*args, **kwargs)
        finally:
            _BUSY.clear()

    return marked


@_busy
def work(
    root: Path,
    env_name: str,
    environ: dict[str, str],
    target: Target,
    task: str,
    args: TaskArgs,
) -> Outcome:
    """One task on one target, through the one-database path."""
    clock = time.perf_counter()
    _NOTES.clear()
    trace: list[str] = []
    try:
        with _traced(args.get("debug", False), trace):
            env = environment(load_environment(root, env_name, environ), target)
            outcome = TASKS[task](env, args)
    except LockTimeout as exc:
        outcome = Outcome(target.name, "failed", one_line(exc), exit_code=exc.exit_code)
        if args.get("retry"):
            sqlite = env.url(need_secrets=False).get_backend_name() == "sqlite"
            holder = "another connection (the app?)" if sqlite else "another run"
            outcome = Outcome(target.name, "locked", f"locked by {holder}: retried last")
    except Halted as exc:
        why = one_line(exc)
        outcome = Outcome(target.name, "stopped", why, current=exc.at, exit_code=exc.exit_code)
    except ConnectError as exc:  # a server the run itself may have filled up: tried again last
        why = one_line(exc) + (f"; {FEWER_AT_ONCE}" if exc.busy else "")
        outcome = Outcome(target.name, "failed", why, current=exc.at, exit_code=exc.exit_code)
        if exc.busy and args.get("retry"):
            outcome = Outcome(
                target.name, "busy", "its server had no free connection: retried last"
            )
    except DbError as exc:  # where the target is, if the run read it back after failing
        why = one_line(exc)
        outcome = Outcome(target.name, "failed", why, current=exc.at, exit_code=exc.exit_code)
    except CommandError as exc:  # a revision the files do not have
        found = revision_error(exc, env.flags)
        outcome = Outcome(target.name, "failed", one_line(found), exit_code=found.exit_code)
    except DBAPIError as exc:  # reading its version failed: a file that is no database...
        advice = what_to_do(exc, env.flags, env.url(need_secrets=False).username)
        why = f"cannot read its version: {describe(exc)}" + (f"; {advice}" if advice else "")
        outcome = Outcome(target.name, "failed", why, exit_code=1)
    seconds = round(time.perf_counter() - clock, 3)
    trace = trace if outcome.state == "failed" else []  # not one retried last, or halted
    return replace(outcome, seconds=seconds, notes=tuple(_NOTES), trace="".join(trace))


@contextmanager
def _traced(wanted: bool, into: list[str]) -> Iterator[None]:
    """With ``wanted`` (--debug), the traceback of what the block raised, kept ``into``."""
    try:
        yield
    except Exception:
        if wanted:
            into.append(traceback.format_exc())
        raise


def one_line(exc: Exception) -> str:
    """The whole message on one line: its second line says where the database is now."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _options(args: TaskArgs, env: Environment) -> RunOptions:
    """A target's run: the first try gives a held lock up at once; the last, of a target
    that came back locked or busy, waits for the lock, and a while for a free connection
    (the run's own targets that filled the server are ending then). A protected fleet's
    run does only what its plan showed for the target."""
    last = args.get("retry") is False
    wait = args.get("wait")
    confirmed = args.get("confirmed")
    return RunOptions(
        lock_wait=0 if args.get("retry") else args.get("lock_wait", LOCK_WAIT),
        wait=max(wait or 0.0, RETRY_CONNECT_WAIT) if last else wait,
        allow_env_mismatch=args.get("allow_env_mismatch", False),
        on_note=_NOTES.append,
        confirmed=None if confirmed is None else confirmed.get(env.target, ()),
        stop=_STOP,
    )


def _read(
    env: Environment,
    stopped: Callable[[], None] = lambda: None,
    *,
    trail: bool = False,
    to: str = "heads",
    guard: Callable[[ScriptDirectory, list[audit.Entry]], None] | None = None,
    bounded: bool = False,
) -> Outcome:
    """Where a target is, read without the lock or env.py: at ``to``, or behind it (with
    what is pending); with ``trail``, read on the same connection, "unfinished" if a
    non-transactional run never finished (migrate and rollback refuse it until resolved),
    and ``guard`` given the trail, to raise where a run would refuse the target.
    ``stopped`` raises to give up connecting: a read-only task's, on a signal. ``bounded``:
    a run's read (its plan), which waits for a table lock no longer than the run would."""
    script = load_scripts(make_config(env, offline=True))

    def read(connection: Connection) -> tuple[tuple[str, ...], list[audit.Entry]]:
        if bounded:
            lock_timeout_for_this_read(connection, session_settings(env))
        log = audit.entries(connection, env.schema) if trail else []
        return version_of(connection, env.schema), log

    current, log = with_database(env, read, stopped)
    found = _at(env, script, current, to)
    if guard is not None:
        with refused_at(current):
            guard(script, log)
    unfinished = commands.unfinished(log, env)
    if unfinished:
        return replace(found, state="unfinished", detail=unfinished[0].said)
    there = "at head" if to == "heads" else f"at {to}"
    return replace(found, state="behind" if found.pending else there)


def _at(env: Environment, script: ScriptDirectory, current: tuple[str, ...], to: str) -> Outcome:
    """A target at ``current``, and what is pending to ``to`` (its state, "read", is for
    the caller to name); a revision no file has is refused as on one database, saying
    where the target is."""
    with refused_at(current):
        guards.known_revisions(script, current, env)
    pending = commands.plan_steps(script, to, current, up=True, flags=env.flags)
    return Outcome(
        env.target,
        "read",
        current=current,
        heads=tuple(script.get_heads()),
        pending=tuple(step.revision.revision for step in pending),
    )


def _wanted(args: TaskArgs) -> str:
    """Where a migrate takes a target, as :func:`_at` takes it: ``heads``, or --to's REV."""
    to = args.get("to") or "head"
    return "heads" if to == "head" else to


def _migrate(env: Environment, args: TaskArgs) -> Outcome:
    """Read the target's revision on the migration connection, and take its lock only if
    something is pending: a target already there costs one connection and one read."""
    to = args.get("to") or "head"
    script = load_scripts(make_config(env, offline=True))
    if to == "head":
        guards.single_head(script, to_flag=True)
    seen: list[Outcome] = []

    def behind(current: tuple[str, ...], connection: Connection) -> bool:
        seen.append(_at(env, script, current, _wanted(args)))
        if seen[0].pending:  # the trail is read under the lock, then
            return True
        return _guards_act(env, script, audit.entries(connection, env.schema), args)

    steps = commands.migrate(env, to, replace(_options(args, env), before_lock=behind))
    before = seen[0]
    if not before.pending:  # at --to=REV, or past it: refused, as on one database
        with refused_at(before.current or ()):
            guards.reached(script, to, before.current or (), env)
        # behind when its lock was found taken: the run that held it got it there
        by_another = "migrated by another run" if args.get("was_locked") else ""
        return replace(before, state="up to date", detail=by_another)
    # every step committed: at head, the target is at the one head the guard checked
    after = replace(before, current=before.heads, pending=()) if to == "head" else _read(env)
    if not steps:  # another run got there first, while this one waited for the lock
        return replace(after, state="up to date", detail="migrated by another run")
    return replace(after, state="migrated", detail=", ".join(s.revision for s in steps))


def _guards_act(
    env: Environment, script: ScriptDirectory, log: list[audit.Entry], args: TaskArgs
) -> bool:
    """Whether a run's guards would act on a target with nothing to do: refuse it (a
    non-transactional run that never finished, an applied file changed on a protected
    fleet, another environment's trail), warn (changed, elsewhere) or record its new name
    (--allow-env-mismatch). Then it runs under its lock as one database does, whose guards
    say so; else it is done without taking the lock."""
    if audit.unfinished(log) or guards.changed_files(log, script, env):
        return True
    try:
        return guards.same_environment(log, env, args.get("allow_env_mismatch", False))
    except GuardRefused:
        return True


def _rollback(env: Environment, args: TaskArgs) -> Outcome:
    steps = commands.rollback(env, args.get("steps", 1), args.get("to"), _options(args, env))
    undone = ", ".join(s.revision for s in steps)
    return replace(_read(env), state="rolled back" if steps else "unchanged", detail=undone)


def _signalled() -> None:
    """Give up connecting on a signal, and only then: a read or a seed is no revision, so a
    fleet's halt (another target failed) leaves it to finish."""
    if _STOP.requested:
        _STOP.check()


def _pending(env: Environment, args: TaskArgs) -> Outcome:
    """What a migrate would apply to the target (see :func:`_planned`): "behind", "there",
    or "past" --to's REV, which migrate refuses. How canaries are chosen, too."""

    def reaching(script: ScriptDirectory, found: Outcome) -> Outcome:
        if found.pending:
            return replace(found, state="behind")
        try:
            guards.reached(script, args.get("to") or "head", found.current or (), env)
        except RevisionError as exc:
            return replace(found, state="past", detail=str(exc))
        return replace(found, state="there")

    return _planned(env, args, _wanted(args), reaching)


def _undoing(env: Environment, args: TaskArgs) -> Outcome:
    """What a rollback would undo on the target (see :func:`_planned`), as ``pending``:
    "to undo", or "there" (nothing)."""

    def undoing(script: ScriptDirectory, found: Outcome) -> Outcome:
        current, steps, to = found.current or (), args.get("steps", 1), args.get("to")
        undone = [
            step.revision.revision
            for step in commands.rollback_plan(env, script, current, steps, to)
        ]
        return replace(found, state="to undo" if undone else "there", pending=tuple(undone))

    return _planned(env, args, "heads", undoing)


def _planned(
    env: Environment,
    args: TaskArgs,
    to: str,
    plan: Callable[[ScriptDirectory, Outcome], Outcome],
) -> Outcome:
    """A target read without its lock, and what a run would do to it (``plan``, given the
    revision files and what was read): a protected fleet's plan. A target whose
    non-transactional run never finished is "unfinished"; one the run would refuse (a
    revision no file has, a +N that leads nowhere, the audit trail of another environment
    or target, an applied file changed on a protected one), "refused"."""

    def guard(script: ScriptDirectory, log: list[audit.Entry]) -> None:  # as a run's are
        guards.same_environment(log, env, args.get("allow_env_mismatch", False))
        guards.unchanged_files(log, script, env, lambda _warning: None)  # said by the run

    try:
        found = _read(env, _signalled, trail=True, to=to, guard=guard, bounded=True)
        if found.state == "unfinished":
            return found
        return plan(load_scripts(make_config(env, offline=True)), found)
    except (RevisionError, GuardRefused, CommandError) as exc:
        why = revision_error(exc, env.flags) if isinstance(exc, CommandError) else exc
        return Outcome(env.target, "refused", one_line(why), current=why.at, exit_code=1)


def _status(env: Environment, _args: TaskArgs) -> Outcome:
    """Where the target is, and, as one database's status says, an applied file that
    changed (refused on a protected fleet, else a warning), and a SQLite file not made yet."""

    def changed(script: ScriptDirectory, log: list[audit.Entry]) -> None:
        guards.unchanged_files(log, script, env, _NOTES.append)

    missing = commands.no_database_yet(env, env.url())
    found = _read(env, _signalled, trail=True, guard=changed)  # a signal ends a slow connect
    _NOTES.extend([missing] if missing else [])
    return found


def _history(env: Environment, _args: TaskArgs) -> Outcome:
    found = _read(env, _signalled)
    script = load_scripts(make_config(env, offline=True))
    applied = applied_revisions(script, found.current or ())
    return replace(found, applied=tuple(sorted(applied)))


def _check(env: Environment, _args: TaskArgs) -> Outcome:
    from db import review

    problems = review.check(env, RunOptions(stop=_STOP))
    if not problems:
        return replace(_read(env, _signalled), state="passed")
    return Outcome(env.target, "problems", "; ".join(problems), exit_code=CheckFailed.exit_code)


def _stamp(env: Environment, args: TaskArgs) -> Outcome:
    from db import records

    try:
        done = records.stamp(env, args["revision"], args.get("force", False), _options(args, env))
    except Halted:  # before its lock or its record: say so, and where it is, as a migrate does
        why, at = "another target failed, so it stopped before stamping", None
        with suppress(DbError, DBAPIError):
            at = _read(env, _signalled).current
            why += f": the database is at {', '.join(at or ()) or 'base'}"
        halted = Halted(f"{why}; nothing was recorded")
        halted.at = at
        raise halted from None
    forced = (
        f"; --force went past {len(done.differences)} difference(s)" if done.differences else ""
    )
    if not done.changed:
        return replace(_read(env), state="up to date", detail="nothing recorded")
    return replace(_read(env), state="stamped", detail=done.what + forced)


def _accept(env: Environment, args: TaskArgs) -> Outcome:
    """An applied file's edit, recorded on the target; one behind, whose migrate will run
    the file as it is now, has nothing to accept."""
    from db import records

    revision = args["revision"]
    try:
        done = records.accept_changes(env, revision, _options(args, env))
    except NotApplied:
        why = f"{revision} is not applied: nothing to accept (a migrate runs the file as it is)"
        return replace(_read(env), state="not applied", detail=why)
    if not done.changed:
        return replace(_read(env), state="as recorded", detail=f"{done.revision} is as recorded")
    said = "recorded the checksum of" if done.first else "accepted"
    return replace(_read(env), state="accepted", detail=f"{said} {done.revision} as it is now")


def _seed(env: Environment, _args: TaskArgs) -> Outcome:
    from db import seed

    return Outcome(env.target, "seeded", seed.described(seed.seed(env, _signalled)))


TASKS: dict[str, Callable[[Environment, TaskArgs], Outcome]] = {
    "migrate": _migrate,
    "pending": _pending,
    "undoing": _undoing,
    "rollback": _rollback,
    "status": _status,
    "history": _history,
    "check": _check,
    "stamp": _stamp,
    "accept-changes": _accept,
    "seed": _seed,
}
