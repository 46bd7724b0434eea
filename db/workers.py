"""The worker processes of a fleet run, and what each does to one target.

A pool of forked processes, each started once, takes target after target; the parent
hands out targets so that no server has more than ``MAX_CONNECTIONS_PER_HOST`` of them at
once. A target whose migration lock another run holds comes back ``locked`` and is tried
again, waiting for the lock this time, once the other targets are done. A signal to the
parent stops new targets, and the running ones stop as a single run would (the revision
under way is rolled back, those before it stay). After a failure, unless the run keeps
going, the running ones finish the revision under way and stop there. A worker that dies
breaks Python's pool: the others stop likewise, the targets that were running are read
back from here, and new workers take the rest.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError

from db import commands, guards
from db.environments import Environment, load_environment
from db.errors import CheckFailed, ConnectError, DbError, Halted, LockTimeout
from db.failures import describe, what_to_do
from db.fleet import RETRIED_LAST, Outcome, Plan, Target, TaskArgs, environment
from db.locks import LOCK_WAIT
from db.revision_ids import revision_error
from db.runner import RunOptions, load_scripts, make_config
from db.stop import Stop
from db.versions import current_heads

P = ParamSpec("P")
HALT = -1  # told to the workers when a target failed (a signal's number, when signalled)
RETRY_CONNECT_WAIT = 10.0  # seconds a target tried again last retries connecting


class Pool:
    """Worker processes for one fleet run; ``run`` sends them the targets."""

    def __init__(
        self,
        env: Environment,
        environ: Mapping[str, str],
        plan: Plan,
        hosts: Mapping[str, str],
        cap: int,
        stop: Stop | None = None,
        first: Target | None = None,
    ) -> None:
        self.env, self.environ, self.plan = env, dict(environ), plan
        self.hosts, self.cap, self.stop = hosts, cap, stop or Stop()
        # a target's own environment: the fleet's may hold {target} where a name must be
        self._preload(environment(env, first) if first else env)
        # what the workers inherit stays out of their collections: none scans it, and none
        # copies its pages to write the collector's marks (Python's advice before a fork)
        gc.freeze()
        self._start()
        self._forget = self.stop.on_request(self._tell_workers)

    def _start(self) -> None:
        """Start the workers (again, after one died and broke the pool)."""
        context = multiprocessing.get_context("fork")  # workers start from this process's state
        # what the workers are told: 0 go on, HALT (a target failed), or a signal's number.
        # Shared memory they poll, not an Event: setting one a killed worker waited on hangs
        self._told = context.RawValue("i", 0)
        self._leave = context.RawValue("i", 0)  # 1: the pool broke, leave once idle
        self._executor = ProcessPoolExecutor(
            max_workers=max(1, self.plan.jobs),
            mp_context=context,
            initializer=_start_worker,
            initargs=(self._told, self._leave),
        )

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._forget()
        self._executor.shutdown(wait=True)
        gc.unfreeze()  # the workers are gone; a caller's process may live on and collect

    def _tell_workers(self) -> None:
        self._told.value = self.stop.signum or signal.SIGTERM

    def _halt(self) -> None:
        """A target failed: each running one finishes the revision it is in, then stops."""
        if self._told.value == 0:
            self._told.value = HALT

    def _preload(self, env: Environment) -> None:
        """Do once here, before the workers fork, what each would do on its first target
        (``env``): import the modules, load and checksum the revision files, read who runs
        them."""
        import importlib

        from db import audit, locks  # noqa: F401  (env.py's)
        from db.engines import is_async

        extra = {"check": "db.review", "stamp": "db.records", "seed": "db.seed"}
        if self.plan.task in extra:
            importlib.import_module(extra[self.plan.task])

        if is_async(env.url(need_secrets=False)):  # which imports the dialect too
            import asyncpg  # type: ignore[import-untyped]  # noqa: F401
            import sqlalchemy.ext.asyncio  # noqa: F401

        with suppress(DbError):  # broken files: each target reports it
            script = load_scripts(make_config(env, offline=True))
            if self.plan.task in ("migrate", "rollback"):
                audit.Who.here(env)
                for revision in script.walk_revisions():
                    audit.checksum(revision.path)
                    audit.code_checksum(revision.path)

    def run(
        self,
        chosen: list[Target],
        on_done: Callable[[Outcome], None] | None = None,
        on_start: Callable[[Target], None] | None = None,
    ) -> list[Outcome]:
        done: dict[str, Outcome] = {}
        waiting, later, final = deque(chosen), deque[Target](), False
        running: dict[Future[Outcome], Target] = {}
        while waiting or running or later:
            if not waiting and not running:  # only targets locked by other runs are left
                waiting, later, final = later, deque(), True
            if self.stop.requested:
                waiting.extend(later)
                later.clear()
                self._skip(waiting, done, "interrupted", on_done)
            broken = not self._fill(waiting, running, final, on_start)
            if not running and not broken:
                continue
            for target, outcome in self._collect(running, broken):
                if on_done is not None:
                    on_done(outcome)
                if outcome.state in RETRIED_LAST:
                    later.append(target)
                    continue
                done[target.name] = outcome
                if outcome.state == "failed" and not self.plan.keep_going:
                    self._halt()
                    waiting.extend(later)
                    later.clear()
                    why = "interrupted" if self.stop.requested else "after a failure"
                    self._skip(waiting, done, why, on_done)
        return [done[target.name] for target in chosen]

    def _fill(
        self,
        waiting: deque[Target],
        running: dict[Future[Outcome], Target],
        final: bool,
        on_start: Callable[[Target], None] | None,
    ) -> bool:
        """Start waiting targets while there is room; False if the pool broke."""
        while len(running) < self.plan.jobs and (target := self._next(waiting, running)):
            args = TaskArgs(**self.plan.args, retry=not final)
            where = (self.env.root, self.env.name, self.environ)
            try:
                future = self._executor.submit(_work, *where, target, self.plan.task, args)
            except BrokenProcessPool:
                waiting.appendleft(target)
                return False
            running[future] = target
            if on_start is not None:
                on_start(target)
        return True

    def _collect(
        self, running: dict[Future[Outcome], Target], broken: bool
    ) -> list[tuple[Target, Outcome]]:
        """The targets that finished (waiting for the first), or every running one if the
        pool broke (a worker died)."""
        if not broken:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            if not any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                found = []
                for future in finished:
                    target = running.pop(future)
                    found.append((target, _outcome(future, target)))
                return found
        return self._recover(running)

    def _recover(self, running: dict[Future[Outcome], Target]) -> list[tuple[Target, Outcome]]:
        """A worker died (killed, out of memory) and broke the pool: the others finish the
        revision they are in, each target that was running is read back, and new workers
        start for the targets still to go."""
        self._halt()
        self._leave.value = 1  # Python 3.13 sends no worker of a broken pool off, so they go
        self._executor.shutdown(wait=True)
        lost = [(target, _lost(self.env, target)) for target in running.values()]
        running.clear()
        self._start()
        return lost

    def _next(
        self, waiting: deque[Target], running: Mapping[Future[Outcome], Target]
    ) -> Target | None:
        """The next waiting target whose server has fewer than ``cap`` targets running."""
        busy = Counter(self.hosts[target.name] for target in running.values())
        for index, target in enumerate(waiting):
            if busy[self.hosts[target.name]] < self.cap:
                del waiting[index]
                return target
        return None

    @staticmethod
    def _skip(
        waiting: deque[Target],
        done: dict[str, Outcome],
        why: str,
        on_done: Callable[[Outcome], None] | None,
    ) -> None:
        for target in waiting:
            done[target.name] = Outcome(target.name, "skipped", why)
            if on_done is not None:
                on_done(done[target.name])
        waiting.clear()


def _lost(env: Environment, target: Target) -> Outcome:
    """A target whose run the broken pool cut short, and where it is, read from here."""
    why = "a worker process died (killed?), so its run ended early"
    here = environment(env, target)
    try:
        current = current_heads(here.url(), here.connect_timeout, here.schema)
    except (DbError, DBAPIError) as exc:
        return Outcome(
            target.name,
            "failed",
            f"{why}; its revision could not be read back ({describe(exc)})",
            exit_code=1,
        )
    at = ", ".join(current) or "base"
    return Outcome(
        target.name, "failed", f"{why}; the database is at {at}", current=current, exit_code=1
    )


def _outcome(future: Future[Outcome], target: Target) -> Outcome:
    try:
        return future.result()
    except Exception as exc:  # a worker that died: the target's state is unknown
        why = f"the worker failed: {type(exc).__name__}; see `invoke status` for where it is"
        return Outcome(target.name, "failed", why, exit_code=1)


# --- inside a worker ----------------------------------------------------------------------

_STOP = Stop()
_BUSY = threading.Event()  # set while the worker runs a target
_NOTES: list[str] = []  # what the target's run noted (a backup, a warning), for its outcome


def _start_worker(told: Any, leave: Any) -> None:
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


def _busy(work: Callable[P, Outcome]) -> Callable[P, Outcome]:
    """``work``, with the worker marked busy while it runs (a broken pool's worker leaves
    only once idle)."""

    @functools.wraps(work)
    def marked(*args: P.args, **kwargs: P.kwargs) -> Outcome:
        _BUSY.set()
        try:
            return work(*args, **kwargs)
        finally:
            _BUSY.clear()

    return marked


@_busy
def _work(
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
    try:
        env = environment(load_environment(root, env_name, environ), target)
        outcome = TASKS[task](env, args)
    except LockTimeout as exc:
        outcome = Outcome(target.name, "failed", one_line(exc), exit_code=exc.exit_code)
        if args.get("retry"):
            outcome = Outcome(target.name, "locked", "another run holds its lock: retried last")
    except Halted as exc:
        why = one_line(exc)
        outcome = Outcome(target.name, "stopped", why, current=exc.at, exit_code=exc.exit_code)
    except ConnectError as exc:  # a server the run itself may have filled up: tried again last
        why = one_line(exc)
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
    return replace(outcome, seconds=seconds, notes=tuple(_NOTES))


def one_line(exc: Exception) -> str:
    """The whole message on one line: its second line says where the database is now."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _options(args: TaskArgs) -> RunOptions:
    """A target's run: the first try gives a held lock up at once; the last, of a target
    that came back locked or busy, waits for the lock, and a while for a free connection
    (the run's own targets that filled the server are ending then)."""
    last = args.get("retry") is False
    wait = args.get("wait")
    return RunOptions(
        lock_wait=0 if args.get("retry") else args.get("lock_wait", LOCK_WAIT),
        wait=max(wait or 0.0, RETRY_CONNECT_WAIT) if last else wait,
        allow_env_mismatch=args.get("allow_env_mismatch", False),
        on_note=_NOTES.append,
        stop=_STOP,
    )


def _read(env: Environment, to: str = "heads") -> Outcome:
    """Where a target is, read without the lock or env.py, and what is pending to ``to``."""
    script = load_scripts(make_config(env, offline=True))
    return _at(env, script, current_heads(env.url(), env.connect_timeout, env.schema), to)


def _at(env: Environment, script: ScriptDirectory, current: tuple[str, ...], to: str) -> Outcome:
    """A target at ``current``, and what is pending to ``to``; a revision no file has is
    refused as on one database, saying where the target is."""
    try:
        guards.known_revisions(script, current, env)
    except DbError as exc:
        exc.at = current
        raise
    pending = commands.plan_steps(script, to, current, up=True, flags=env.flags)
    return Outcome(
        env.target,
        "read",
        current=current,
        heads=tuple(script.get_heads()),
        pending=tuple(step.revision.revision for step in pending),
    )


def _migrate(env: Environment, args: TaskArgs) -> Outcome:
    """Read the target's revision on the migration connection, and take its lock only if
    something is pending: a target already there costs one connection and one read."""
    to = args.get("to") or "head"
    script = load_scripts(make_config(env, offline=True))
    if to == "head":
        guards.single_head(script, to_flag=True)
    seen: list[Outcome] = []

    def behind(current: tuple[str, ...]) -> bool:
        seen.append(_at(env, script, current, "heads" if to == "head" else to))
        return bool(seen[0].pending)

    steps = commands.migrate(env, to, replace(_options(args), before_lock=behind))
    before = seen[0]
    if not before.pending:  # at --to=REV, or past it: refused, as on one database
        guards.reached(script, to, before.current or (), env)
        return replace(before, state="up to date")
    # every step committed: at head, the target is at the one head the guard checked
    after = replace(before, current=before.heads, pending=()) if to == "head" else _read(env)
    if not steps:  # another run got there first, while this one waited for the lock
        return replace(after, state="up to date", detail="migrated by another run")
    return replace(after, state="migrated", detail=", ".join(s.revision for s in steps))


def _rollback(env: Environment, args: TaskArgs) -> Outcome:
    steps = commands.rollback(env, args.get("steps", 1), args.get("to"), _options(args))
    undone = ", ".join(s.revision for s in steps)
    return replace(_read(env), state="rolled back" if steps else "unchanged", detail=undone)


def _status(env: Environment, _args: TaskArgs) -> Outcome:
    return _read(env)


def _history(env: Environment, _args: TaskArgs) -> Outcome:
    found = _read(env)
    script = load_scripts(make_config(env, offline=True))
    applied = commands.applied_revisions(script, found.current or ())
    return replace(found, applied=tuple(sorted(applied)))


def _check(env: Environment, _args: TaskArgs) -> Outcome:
    from db import review

    problems = review.check(env)
    if not problems:
        return replace(_read(env), state="passed")
    return Outcome(env.target, "problems", "; ".join(problems), exit_code=CheckFailed.exit_code)


def _stamp(env: Environment, args: TaskArgs) -> Outcome:
    from db import records

    done = records.stamp(env, args["revision"], args.get("force", False), _options(args))
    forced = (
        f"; --force went past {len(done.differences)} difference(s)" if done.differences else ""
    )
    if not done.recorded and not done.unrecorded:
        return replace(_read(env), state="up to date", detail="nothing recorded")
    return replace(_read(env), state="stamped", detail=done.what + forced)


def _seed(env: Environment, _args: TaskArgs) -> Outcome:
    from db import seed

    return Outcome(env.target, "seeded", seed.described(seed.seed(env)))


TASKS: dict[str, Callable[[Environment, TaskArgs], Outcome]] = {
    "migrate": _migrate,
    "rollback": _rollback,
    "status": _status,
    "history": _history,
    "check": _check,
    "stamp": _stamp,
    "seed": _seed,
}
