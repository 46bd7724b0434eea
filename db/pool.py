"""The pool of worker processes for a fleet run, and its schedule.

A pool of forked processes, each started once, takes target after target; the parent
hands out targets so that no server has more than ``MAX_CONNECTIONS_PER_HOST`` of them at
once. A target whose migration lock another run holds comes back ``locked`` and is tried
again, waiting for the lock this time, once the other targets are done. A signal to the
parent stops new targets, and the running ones stop as a single run would (the revision
under way is rolled back, those before it stay). After a failure, unless the run keeps
going, the running ones finish the revision under way and stop there. A worker that dies
breaks Python's pool: the others stop likewise, the targets that were running are read
back from here, and new workers take the rest. What a worker does is :mod:`db.workers`.
"""

from __future__ import annotations

import gc
import multiprocessing
import signal
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import suppress
from types import TracebackType

from sqlalchemy.exc import DBAPIError

from db.environments import Environment
from db.errors import DbError
from db.failures import describe
from db.fleet import Target, environment
from db.fleet_runs import RETRIED_LAST, Outcome, Plan, TaskArgs
from db.runner import load_scripts, make_config
from db.stop import Stop
from db.versions import current_heads
from db.workers import HALT, start_worker, work


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
        self._was_locked: set[str] = set()  # targets that came back locked, to retry last
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
            initializer=start_worker,
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

        extra = {"check": "db.review", "seed": "db.seed"}
        extra.update(dict.fromkeys(("stamp", "accept-changes"), "db.records"))
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
                    if outcome.state == "locked":
                        self._was_locked.add(target.name)
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
            args = TaskArgs(
                **self.plan.args, retry=not final, was_locked=target.name in self._was_locked
            )
            where = (self.env.root, self.env.name, self.environ)
            try:
                future = self._executor.submit(work, *where, target, self.plan.task, args)
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
        lost = [(target, _lost(self.env, target, self.stop)) for target in running.values()]
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


def _lost(env: Environment, target: Target, stop: Stop) -> Outcome:
    """A target whose run the broken pool cut short, and where it is, read from here;
    a signal (``stop``) gives up the read of a server slow to answer."""
    why = "a worker process died (killed?), so its run ended early"
    here = environment(env, target)
    try:
        current = current_heads(
            here.url(),
            here.connect_timeout,
            here.schema,
            stopped=stop.check,
            network_timeout=here.network_timeout,
        )
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
