"""Database tasks: migrate, roll back and inspect the shop database per environment.

Only the command line lives here (flags, help, prompts, printing, turning errors into
exits); the work is done by the ``db`` package, imported inside each task so that
``invoke --list`` stays fast.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep

    from db.environments import Environment
    from db.fleet import Target
    from db.fleet_runs import Outcome, Plan, TaskArgs
    from db.lint import Finding
    from db.progress import Revision
    from db.runner import RunOptions, Step
    from db.stop import Stop

ROOT = Path(__file__).resolve().parent
# A task is a short-lived process that imports ~100,000 long-lived objects (SQLAlchemy,
# Alembic) and then makes many short-lived ones: collect garbage less often, as mypy does,
# and freeze (in reported) what the imports made so that no collection scans it again.
# Together 6% fewer instructions for a 200-revision migrate (valgrind; see bench/), and in
# wall time 0.72 s against 0.85 s for a 200-revision SQLite migrate (medians of 8
# interleaved runs each; fastest 0.70 s against 0.81 s).
gc.set_threshold(50_000, 20, 20)
# invoke turns bytecode caching off for all it imports (its --write-pyc flag), so every
# task would compile the db package, env.py (once per fleet target) and the revision files
# again. Python's own setting (-B, PYTHONDONTWRITEBYTECODE) decides instead, read as Python
# reads it (also where this interpreter was forked, not started, with that environment).
sys.dont_write_bytecode = bool(sys.flags.dont_write_bytecode) or (
    not sys.flags.ignore_environment and bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
)
# Mako, which Alembic imports, loads Pygments (when installed) at import time only to
# colour HTML error pages, which no task renders: 40 ms of every task's start-up. Without
# its plugin Mako falls back to plain text.
sys.modules.setdefault("mako.ext.pygmentplugin", None)  # type: ignore[arg-type]


def _quiet_when_the_reader_leaves() -> None:
    """``invoke history | head``: once stdout's reader has gone, end without a traceback,
    as Unix tools do (exit 141, as SIGPIPE would). Python ignores SIGPIPE, so that a
    server's closed socket raises an error instead of killing a run; a closed pipe raises
    BrokenPipeError. ``invoke offline-sql > upgrade.sql`` on a full disk: one line, exit 2
    (the files the tasks write themselves say which file they could not write)."""
    hook = sys.excepthook

    def cut_short(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if issubclass(kind, BrokenPipeError) and _stdout_reader_gone():
            sys.stderr.flush()
            os._exit(128 + signal.SIGPIPE)
        if isinstance(value, OSError) and _no_room_for_output(value):
            print(f"error: cannot write the output: {value.strerror}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(2)  # not through Python's exit, which would write stdout's rest again
        hook(kind, value, traceback)

    sys.excepthook = cut_short


def _no_room_for_output(error: OSError) -> bool:
    """Whether writing stdout failed for lack of room: an error with no file name (the
    files the tasks write name theirs), unless the user asked for tracebacks."""
    import errno

    full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and error.filename is None
    return full and "--debug" not in sys.argv and not os.environ.get("INVOKE_DB_DEBUG")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (not some socket's broken pipe)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout to ask
        return False


_quiet_when_the_reader_leaves()
COMMON = {
    "env": "environment name, a file in environments/ (default: dev, or INVOKE_DB_ENV)",
    "debug": "show the Python traceback of a failure (or set INVOKE_DB_DEBUG=1)",
}
RUN = {
    "lock_wait": "seconds to wait for another run's migration lock (default 60)",
    "wait": "seconds to keep retrying the first connection (default: CONNECT_WAIT or 0)",
    "allow_env_mismatch": "run although the database was last migrated under another env name",
}
FLEET = {
    "only": "on a fleet: only targets matching these globs, e.g. --only='shop_a*,beta'",
    "jobs": "on a fleet: targets at once (default: two per core and server, at most the targets)",
}
ONE = "on a fleet: the one target to work on (its name, or a glob that matches only it)"
FLEET_KEEP_GOING = "on a fleet: go on with the other targets past a failed one"
YES = "confirm a protected environment without a prompt (needed where there is no terminal)"


@task(
    help={
        **COMMON,
        **RUN,
        **FLEET,
        "to": "revision to reach: head, an id, a prefix, or +N",
        "yes": YES,
        "keep_going": FLEET_KEEP_GOING,
        "canary": "on a fleet: migrate this many targets first, the rest only if they all succeed",
        "json": "on a fleet: print the run's report as JSON (also kept in var/runs/)",
    }
)
def migrate(
    c: Context,
    env: str | None = None,
    to: str = "head",
    yes: bool = False,
    lock_wait: str | None = None,
    wait: str | None = None,
    allow_env_mismatch: bool = False,
    only: str | None = None,
    jobs: str | None = None,
    keep_going: bool = False,
    canary: str | None = None,
    json_: bool = False,
    debug: bool = False,
) -> None:
    """Upgrade the database to head, or to --to=REV (every target of a fleet)."""
    with reported(c, debug):
        from db import commands

        to = named("--to", to)
        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        options = run_options(lock_wait, wait, allow_env_mismatch)
        if is_fleet(target):
            plan = fleet_plan(
                "migrate", {**fleet_args(options), "to": to}, jobs, keep_going, canary
            )
            run_fleet(target, plan, only or "", options, json_=json_, yes=yes)
            return
        if target.protected:  # shown and confirmed inside the run, under the lock
            from db import lint

            # offline, so before the run: env.py cannot nest; the plan shows its own part
            findings = lint.lint(target) if lint.applies(target) else None

            def ask(plan: tuple[Revision, ...]) -> None:
                show_plan(target, plan, findings)
                if plan:
                    confirm(target, yes, "migrate", need_yes=False)

            options.on_plan = ask
        with on_signals(options.stop):
            steps = commands.migrate(target, to, options)
        summarize("migrated", target, steps)


@task(
    help={
        **COMMON,
        **RUN,
        "steps": "how many revisions to undo (default 1)",
        "to": "revision to go back to instead: an id, a prefix, or base",
        "yes": "needed on a protected environment, with the typed name on a terminal",
        **FLEET,
        "keep_going": FLEET_KEEP_GOING,
    }
)
def rollback(
    c: Context,
    env: str | None = None,
    steps: str | None = None,
    to: str | None = None,
    yes: bool = False,
    lock_wait: str | None = None,
    wait: str | None = None,
    allow_env_mismatch: bool = False,
    only: str | None = None,
    jobs: str | None = None,
    keep_going: bool = False,
    debug: bool = False,
) -> None:
    """Downgrade the database by --steps revisions, or to --to=REV (every target of a fleet)."""
    with reported(c, debug):
        from db import commands
        from db.errors import UsageError

        if steps is not None and to is not None:  # which one was meant? neither is guessed
            raise UsageError("--steps and --to do not go together: give one of them")
        count = whole("--steps", steps, default=1, least=1)
        to = None if to is None else named("--to", to)
        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        options = run_options(lock_wait, wait, allow_env_mismatch)
        if is_fleet(target):
            flags: TaskArgs = {**fleet_args(options), "steps": count, "to": to}
            plan = fleet_plan("rollback", flags, jobs, keep_going)
            run_fleet(target, plan, only or "", options, yes=yes)
            return
        if target.protected:  # shown and confirmed inside the run, under the lock

            def ask(plan: tuple[Revision, ...]) -> None:
                print(f"plan: {len(plan) or 'nothing'} to undo", file=sys.stderr)
                for rev in plan:
                    print(f"  {rev.id}  {rev.message}{marker(rev)}", file=sys.stderr)
                confirm(target, yes, "roll back", need_yes=True)

            options.on_plan = ask
        with on_signals(options.stop):
            done = commands.rollback(target, count, to, options)
        summarize("rolled back", target, done)


@task(help={**COMMON, "only": ONE, "lock_wait": RUN["lock_wait"]})
def reset(
    c: Context,
    env: str | None = None,
    only: str | None = None,
    lock_wait: str | None = None,
    debug: bool = False,
) -> None:
    """Drop every table and migrate from scratch (never on a protected environment)."""
    with reported(c, debug):
        from db.reset import reset as reset_database

        why = "reset drops every table and never runs there"
        target = environment(c, env, banner=True, refuse_protected=why, only=only)
        options = run_options(lock_wait)
        with on_signals(options.stop):
            steps = reset_database(target, options)
        summarize("reset and migrated", target, steps)


@task(
    help={
        **COMMON,
        "file": "the backup to restore (default: the newest in var/backups)",
        "yes": YES,
        "only": ONE,
        "allow_env_mismatch": "restore a backup that another env name (or fleet target) made",
        "lock_wait": "seconds to wait while another connection (the app) keeps the file "
        "locked (default 60)",
    }
)
def restore(
    c: Context,
    env: str | None = None,
    file: str | None = None,
    yes: bool = False,
    only: str | None = None,
    allow_env_mismatch: bool = False,
    lock_wait: str | None = None,
    debug: bool = False,
) -> None:
    """Put a SQLite backup from var/backups back in place of the database."""
    with reported(c, debug):
        from db import backups
        from db.locks import LOCK_WAIT
        from db.stop import Stop

        file = filled("--file", file, "name a backup, or leave --file out for the newest")
        target = environment(c, env, only=only)
        if target.protected:
            confirm(target, yes, "restore a backup over", need_yes=True)
        announce(target)
        chosen = None if file is None else Path(file).resolve()
        waits = LOCK_WAIT if lock_wait is None else seconds("--lock-wait", lock_wait)
        stop = Stop()
        with on_signals(stop):
            used, kept = backups.restore(
                target, target.url(), chosen, allow_env_mismatch, stop.check, waits
            )
    if kept is not None:
        print(f"  kept the database it replaced as {target.relative(kept)}", file=sys.stderr)
    print(f"{target.name}: restored {target.relative(used)}", file=sys.stderr)


@task(
    help={
        **COMMON,
        "revision": "the revision whose interrupted non-transactional run you have checked",
        "applied": "its changes are all in the database: record it as applied",
        "rolled_back": "none of its changes are left: record it as not applied, to run again",
        "yes": YES,
        "lock_wait": RUN["lock_wait"],
        "only": ONE,
    }
)
def resolve(
    c: Context,
    revision: str,
    env: str | None = None,
    applied: bool = False,
    rolled_back: bool = False,
    yes: bool = False,
    lock_wait: str | None = None,
    only: str | None = None,
    debug: bool = False,
) -> None:
    """Record how an interrupted non-transactional revision ended: --applied or --rolled-back."""
    with reported(c, debug):
        from db import records
        from db.errors import UsageError

        if applied == rolled_back:
            which = "not both" if applied else "one of them"
            raise UsageError(
                f"say how the revision ended: pass --applied or --rolled-back, {which}"
            )
        revision = named("REVISION", revision)
        target = environment(c, env, banner=True, only=only)
        if target.protected:
            confirm(target, yes, f"record how {revision} ended on", need_yes=False)
        at = records.resolve(target, revision, applied, run_options(lock_wait))
    how = "applied" if applied else "rolled back"
    print(f"{target.name}: recorded {revision} as {how}; the database is at {at}", file=sys.stderr)


@task(
    help={
        **COMMON,
        "revision": "the revision the database already is at (an id, a prefix, or head)",
        "force": "record it even though the schema differs from what the revision produces",
        "yes": YES,
        "lock_wait": RUN["lock_wait"],
        "allow_env_mismatch": RUN["allow_env_mismatch"],
        **FLEET,
        "keep_going": FLEET_KEEP_GOING,
    }
)
def stamp(
    c: Context,
    revision: str,
    env: str | None = None,
    force: bool = False,
    yes: bool = False,
    lock_wait: str | None = None,
    allow_env_mismatch: bool = False,
    only: str | None = None,
    jobs: str | None = None,
    keep_going: bool = False,
    debug: bool = False,
) -> None:
    """Record REV as applied without running it: adopt a database made some other way."""
    with reported(c, debug):
        from db import records

        revision = named("REVISION", revision)
        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        options = run_options(lock_wait, None, allow_env_mismatch)
        if is_fleet(target):
            flags: TaskArgs = {**fleet_args(options), "revision": revision, "force": force}
            plan = fleet_plan("stamp", flags, jobs, keep_going)
            run_fleet(target, plan, only or "", options, yes=yes)
            return
        if target.protected:
            confirm(target, yes, f"record {revision} as applied on", need_yes=False)
        done = records.stamp(target, revision, force, options)
    for gap in done.differences:
        print(f"  differs (--force): {gap}", file=sys.stderr)
    print(f"{target.label}: {done.what}", file=sys.stderr)


@task(
    help={
        **COMMON,
        "revision": "the applied revision whose edited file you accept",
        "lock_wait": RUN["lock_wait"],
        "yes": YES,
        "only": ONE,
    }
)
def accept_changes(
    c: Context,
    revision: str,
    env: str | None = None,
    yes: bool = False,
    lock_wait: str | None = None,
    only: str | None = None,
    debug: bool = False,
) -> None:
    """Record the new checksum of an applied revision's deliberately edited file."""
    with reported(c, debug):
        from db import records

        revision = named("REVISION", revision)
        target = environment(c, env, banner=True, only=only)
        if target.protected:
            confirm(target, yes, f"accept the edited file of {revision} on", need_yes=False)
        done = records.accept_changes(target, revision, run_options(lock_wait))
    if done.changed:
        print(f"{target.name}: accepted {done.revision} as it is now", file=sys.stderr)
    else:
        print(f"{target.name}: {done.revision} is as recorded: nothing to accept", file=sys.stderr)


@task(
    help={
        **COMMON,
        "message": 'what the revision does, e.g. "add coupons"',
        "empty": "write an empty revision to fill in by hand (no database needed)",
        "only": ONE,
    }
)
def makemigration(
    c: Context,
    message: str,
    env: str | None = None,
    empty: bool = False,
    only: str | None = None,
    debug: bool = False,
) -> None:
    """Write a new revision autogenerated from db/models.py against the env's database."""
    with reported(c, debug):
        from db.authoring import make_migration

        target = environment(c, env, banner=not empty, only=only)
        written = make_migration(target, message, empty=empty)
    if written is None:
        print(
            "no changes: the models match the database, so no revision was written", file=sys.stderr
        )
    else:
        print(f"wrote {written.relative_to(ROOT)}", file=sys.stderr)


@task(
    name="offline-sql",
    help={
        **COMMON,
        "env": "environment whose dialect to use (default: dev); no secrets needed",
        "from": "revision the database is already at (default: an empty database)",
        "to": "revision to reach (default: head)",
        "output": "write the SQL to this file (on a fleet: to this folder, a file per target)",
        "only": FLEET["only"],
    },
)
def offline_sql(
    c: Context,
    env: str | None = None,
    from_: str | None = None,
    to: str = "head",
    output: str | None = None,
    only: str | None = None,
    debug: bool = False,
) -> None:
    """Print the SQL of a range of revisions, without connecting to any database."""
    with reported(c, debug):
        from db import authoring, fleet_runs

        to = named("--to", to)
        from_ = None if from_ is None else named("--from", from_)
        output = filled("--output", output, "give a file (a folder, on a fleet)")
        target = environment(c, env, fleet_ok=True, only=only)
        if is_fleet(target):
            scripts = fleet_runs.offline_sql(target, only or "", from_, to)
            if output:
                for name, path in fleet_runs.write_sql(Path(output).resolve(), scripts).items():
                    print(f"wrote the SQL for {target.name} {name} to {path}", file=sys.stderr)
            else:
                sys.stdout.write("".join(f"-- target: {n}\n{sql}" for n, sql in scripts.items()))
            return
        sql = authoring.offline_sql(target, from_, to)
        if output:
            authoring.write_sql(Path(output), sql)
    if output:
        print(f"wrote the SQL for {target.name} to {output}", file=sys.stderr)
    else:
        sys.stdout.write(sql)


@task(
    help={
        **COMMON,
        **FLEET,
        "json": "print the status as JSON (fields in the README)",
        "check": "exit with code 5 when revisions are pending, for deploy scripts",
    }
)
def status(
    c: Context,
    env: str | None = None,
    json_: bool = False,
    check: bool = False,
    only: str | None = None,
    jobs: str | None = None,
    debug: bool = False,
) -> None:
    """Show the current revision, the head, and the pending revisions in order."""
    with reported(c, debug):
        from db import commands

        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        if is_fleet(target):
            plan = fleet_plan("status", None, jobs, keep_going=True)
            outcomes = run_fleet(target, plan, only or "", run_options(), json_=json_)
            if check and any(o.pending or o.failed for o in outcomes):
                raise Exit(f"{target.name}: targets behind head", code=check_failed())
            return
        found = commands.status(target, run_options())
    if json_:
        print_json({"environment": target.name, **asdict(found), "up_to_date": not found.pending})
    else:
        print(f"current: {labels(found.current) or 'base (no revision applied)'}")
        print(f"head:    {labels(found.heads) or 'none (no revisions yet)'}")
        if len(found.heads) > 1:
            print(f"         {len(found.heads)} heads: run `invoke merge` to join them")
        print(f"pending: {len(found.pending) or 'none'}")
        for rev in found.pending:
            print(f"  {rev.id}  {rev.message}{marker(rev)}")
    if check and found.pending:
        raise Exit(f"{target.name}: {len(found.pending)} revision(s) pending", code=check_failed())


@task(help={**COMMON, **FLEET, "json": "print the history as JSON (fields in the README)"})
def history(
    c: Context,
    env: str | None = None,
    json_: bool = False,
    only: str | None = None,
    jobs: str | None = None,
    debug: bool = False,
) -> None:
    """List every revision, newest first: applied ones with when and by whom."""
    with reported(c, debug):
        from db import commands, fleet_runs

        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        if is_fleet(target):
            plan = fleet_plan("history", None, jobs, keep_going=True)
            outcomes = run_fleet(target, plan, only or "", run_options(), quiet=json_)
            rows = fleet_runs.history(target, outcomes)
            if json_:
                print_json([{**asdict(rev), "applied_on": on} for rev, on in rows])
                return
            for rev, on in rows:
                print(f"{rev.id}  applied on {len(on)}/{len(outcomes)}  {rev.message}")
            return
        entries = commands.history(target)
    if json_:
        print_json([asdict(entry) for entry in entries])
        return
    for entry in entries:
        mark = "applied" if entry.applied else "pending"
        head = "  (head)" if entry.is_head else ""
        when = ""
        if entry.applied_at is not None:
            when = f"  [{entry.applied_at:%Y-%m-%d %H:%M:%S %z} by {entry.applied_by}]"
        print(f"{entry.revision.id}  {mark}  {entry.revision.message}{head}{when}")


@task(
    help={
        "env": "a PostgreSQL environment whose dialect to lint for (default: prod)",
        "all": "lint every revision, not just those pending on the env's database",
        "debug": COMMON["debug"],
        "only": ONE,
    }
)
def lint(
    c: Context, env: str = "prod", all_: bool = False, only: str | None = None, debug: bool = False
) -> None:
    """Lint the PostgreSQL SQL of the pending (or --all) revisions with squawk."""
    with reported(c, debug):
        from db import commands, lint

        target = environment(c, env, banner=not all_, only=only)
        pending = None if all_ else commands.status(target, run_options()).pending
        revisions = None if pending is None else [rev.id for rev in pending]
        findings = lint.lint(target, revisions)
    print_findings(findings)
    if findings:
        raise Exit(
            f"{len(findings)} finding(s); excuse one with -- squawk-ignore RULE",
            code=check_failed(),
        )
    print("no findings", file=sys.stderr)


@task(help={**COMMON, **FLEET})
def check(
    c: Context,
    env: str | None = None,
    only: str | None = None,
    jobs: str | None = None,
    debug: bool = False,
) -> None:
    """Fail when models and database differ, there are several heads, or applied files changed."""
    with reported(c, debug):
        from db import review

        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        if is_fleet(target):
            outcomes = run_fleet(
                target, fleet_plan("check", None, jobs, True), only or "", run_options()
            )
            if any(o.state == "problems" for o in outcomes):
                raise Exit("check failed on some targets", code=check_failed())
            return
        problems = review.check(target)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    if problems:
        raise Exit(f"check failed: {len(problems)} problem(s)", code=check_failed())
    print("check passed: one head, files unchanged, models match the database", file=sys.stderr)


@task(
    help={
        "message": 'the merge revision\'s message (default "merge heads")',
        "debug": COMMON["debug"],
    }
)
def merge(c: Context, message: str = "merge heads", debug: bool = False) -> None:
    """Write a revision that joins the heads into one."""
    with reported(c, debug):
        from db import authoring

        written = authoring.merge(environment(c, None), message)
    print(f"wrote {written.relative_to(ROOT)}", file=sys.stderr)


@task(help={**COMMON, **FLEET})
def seed(
    c: Context,
    env: str | None = None,
    only: str | None = None,
    jobs: str | None = None,
    debug: bool = False,
) -> None:
    """Fill the database with a small sample shop (idempotent; never on protected envs)."""
    with reported(c, debug):
        from db import seed

        why = "seed data is for development databases"
        target = environment(c, env, banner=True, refuse_protected=why, fleet_ok=True, only=only)
        if is_fleet(target):
            run_fleet(target, fleet_plan("seed", None, jobs, False), only or "", run_options())
            return
        added = seed.seed(target)
    print(f"{target.label}: {seed.described(added)}", file=sys.stderr)


@task
def envs(c: Context) -> None:
    """List the known environments with their dialect and masked URL (exit 2 if one of
    them cannot be loaded)."""
    from db import fleet
    from db.environments import known_environments, load_environment
    from db.errors import DbError
    from db.urls import mask

    broken = 0
    for name in known_environments(ROOT):
        try:
            loaded = load_environment(ROOT, name, os.environ)
            url = loaded.url(need_secrets=False)
            marks = [("a fleet", fleet.is_fleet(loaded)), ("protected", loaded.protected)]
            said = ", ".join(mark for mark, holds in marks if holds)
            said = f"  ({said})" if said else ""
            print(f"{name:<10} {url.get_backend_name():<11} {mask(url)}{said}")
        except DbError as exc:
            print(f"{name:<10} {'?':<11} error: {exc}")
            broken += 1
    if broken:  # a CI step that runs `invoke envs` to check the files fails on them
        raise Exit(f"error: {broken} environment(s) cannot be loaded: see above", code=2)


# --- the command-line edge -------------------------------------------------------------


def environment(
    c: Context,
    name: str | None,
    *,
    banner: bool = False,
    refuse_protected: str = "",
    only: str | None = None,
    fleet_ok: bool = False,
) -> Environment:
    """Load the named environment (or invoke's configured default) and announce it.

    ``refuse_protected`` (why) refuses a protected environment before its secrets are needed.
    A fleet stays whole where the task runs on fleets (``fleet_ok``); elsewhere ``only`` must
    name one of its targets. ``only`` on one database is refused.
    """
    from db import fleet
    from db.environments import known_environments, load_environment
    from db.errors import GuardRefused, UsageError

    every = "name targets or globs (--only='beta*,gamma'), or leave it out for every target"
    filled("--only", only and only.replace(",", " "), every)  # "," is empty too
    known = ", ".join(known_environments(ROOT))
    filled("--env", name, f"name one of {known}, or leave --env out")
    loaded = load_environment(ROOT, c.config.db.env if name is None else name, os.environ)
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    if refuse_protected and loaded.protected:
        raise GuardRefused(f"{loaded.name} is protected: {refuse_protected}")
    if not fleet.is_fleet(loaded):
        if only:  # a mistaken --env must not run on the whole database
            raise UsageError(f"{loaded.name} is one database, not a fleet: --only does not apply")
    elif not fleet_ok:
        loaded = fleet.one(loaded, only or "")
    if banner:
        announce(loaded)
    return loaded


def is_fleet(env: Environment) -> bool:
    from db import fleet

    return fleet.is_fleet(env) and not env.target


def fleet_args(options: RunOptions) -> TaskArgs:
    """What every target's run takes from the flags."""
    from db.fleet_runs import TaskArgs

    return TaskArgs(
        lock_wait=options.lock_wait,
        wait=options.wait,
        allow_env_mismatch=options.allow_env_mismatch,
    )


def fleet_plan(
    task_name: str,
    args: TaskArgs | None,
    jobs: str | None,
    keep_going: bool,
    canary: str | None = None,
) -> Plan:
    """The fleet run the flags ask for; ``jobs`` 0 means the default for the fleet."""
    from db.fleet_runs import Plan, TaskArgs

    count = whole("--jobs", jobs, default=0, least=0)
    return Plan(task_name, args or TaskArgs(), count, keep_going, whole("--canary", canary, 0, 0))


# what a protected fleet asks before a run that changes its targets (migrate shows a plan)
PROTECTED_ASKS = {
    "rollback": ("roll back every chosen target of", True),
    "stamp": ("record {revision} as applied on", False),
}


def run_fleet(
    env: Environment,
    plan: Plan,
    only: str,
    options: RunOptions,
    *,
    json_: bool = False,
    quiet: bool = False,
    yes: bool = False,
) -> list[Outcome]:
    """Run a task on every chosen target of a fleet: a line per target, then a summary; a
    protected fleet's migrate shows its plan and asks once. Exits non-zero if targets failed."""
    from dataclasses import replace
    from datetime import datetime, timezone

    from db import fleet, fleet_runs
    from db.errors import ConfigError

    chosen = fleet.targets(env, only)
    fleet_runs.check(env, plan, chosen)  # what would fail every target alike fails here, once
    hosts = {fleet.host(fleet.environment(env, t)) for t in chosen}
    plan = replace(plan, jobs=plan.jobs or fleet_runs.default_jobs(len(chosen), len(hosts)))
    if env.protected and plan.task == "migrate":
        chosen = confirm_fleet(env, chosen, plan, yes)
        if not chosen:
            print(f"{env.name}: nothing to do, every target is already there", file=sys.stderr)
            return []
    elif env.protected and plan.task in PROTECTED_ASKS:
        action, need_yes = PROTECTED_ASKS[plan.task]
        confirm(env, yes, action.format(**plan.args), need_yes=need_yes)
    out = sys.stdout if plan.task == "status" else sys.stderr
    board = Board(len(chosen), quiet=quiet or json_, out=out)
    started = datetime.now(timezone.utc)
    with on_signals(options.stop):
        outcomes = fleet_runs.run(
            env, os.environ, chosen, plan, board.done, board.start, options.stop
        )
    board.close()
    code = fleet_runs.exit_code(outcomes, options.stop.signum)
    report = fleet_runs.report(env, plan, outcomes, started, code)
    print_summary(env, outcomes)
    if plan.task in fleet_runs.CHANGING:
        try:
            kept = fleet_runs.write_report(env, report)
            if kept is not None:  # RUNS_KEEP=0 keeps none
                print(f"report: {env.relative(kept)}", file=sys.stderr)
        except ConfigError as exc:  # a full disk: the run happened all the same
            print(f"warning: {exc}; the run itself is as printed above", file=sys.stderr)
    if json_:
        print_json(report)
    if code:
        raise Exit(not_there(plan, outcomes), code=code)
    return outcomes


def not_there(plan: Plan, outcomes: list[Outcome]) -> str:
    """A fleet run's last line when some targets did not get there: how many, and how to
    retry them. A rollback retries them by name: run again, it would take the rest further;
    and, when it went back several steps, to a revision: one stopped part way would count
    its steps again from where it stopped."""
    from collections import Counter

    from db import fleet_runs

    states = Counter(o.state for o in outcomes if o.failed)
    counts = ", ".join(f"{states[s]} {s}" for s in ("failed", "stopped", "skipped") if states[s])
    line = f"error: {counts} of {counted(len(outcomes), 'target')}"
    if plan.task == "rollback":
        names = ",".join(o.target for o in outcomes if o.failed)
        several = not plan.args.get("to") and plan.args.get("steps", 1) > 1
        return f"{line}; retry only them with --only={names}" + (" --to=REV" if several else "")
    if plan.task == "migrate":
        return line + "; rerun to retry them (targets already there are skipped)"
    return line + ("; rerun to retry them" if plan.task in fleet_runs.CHANGING else "")


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def confirm_fleet(env: Environment, chosen: list[Target], plan: Plan, yes: bool) -> list[Target]:
    """A protected fleet's plan, targets by pending revisions in short form, confirmed once;
    returns the targets that are behind (none: nothing to confirm)."""
    from collections import defaultdict
    from dataclasses import replace

    from db import fleet_runs
    from db.fleet_runs import TaskArgs

    status = replace(plan, task="status", args=TaskArgs(), keep_going=True, canary=0)
    read = fleet_runs.run(env, os.environ, chosen, status)
    groups: dict[str, list[str]] = defaultdict(list)
    for outcome in read:
        what = f"unreadable: {outcome.detail}" if outcome.failed else in_short(outcome.pending)
        groups[what].append(outcome.target)
    print(f"plan for {len(chosen)} targets:", file=sys.stderr)
    for what, names in groups.items():
        print(f"  {len(names)} target(s): {what}  [{short(names)}]", file=sys.stderr)
    behind = {o.target for o in read if o.pending or o.failed}
    if behind:
        confirm(env, yes, f"migrate {len(behind)} target(s) of", need_yes=False)
    return [t for t in chosen if t.name in behind]


def in_short(pending: tuple[str, ...]) -> str:
    """Revisions to apply, in a plan's short form: a few by name, many as a range."""
    if len(pending) > 3:
        return f"{len(pending)} revisions, {pending[0]} to {pending[-1]}"
    return ", ".join(pending) or "nothing (at head)"


def short(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


class Board:
    """What a fleet run shows: a line per target event, and on a terminal a progress line."""

    def __init__(self, total: int, *, quiet: bool, out: TextIO) -> None:
        self.total, self.quiet, self.out = total, quiet, out
        self.finished = self.running = self.failed = 0
        self.live = not quiet and sys.stderr.isatty()
        self.width = len(str(total))

    def start(self, _target: Target) -> None:
        self.running += 1
        self._progress()

    def done(self, outcome: Outcome) -> None:
        from db.fleet_runs import RETRIED_LAST

        self.running -= outcome.state != "skipped"  # a skipped target never started
        if outcome.state not in RETRIED_LAST:
            self.finished += 1
            self.failed += outcome.failed
        if not self.quiet:
            self._clear()
            count = f"{self.finished:>{self.width}}/{self.total}"
            lines = [f"[{count} {outcome.target}] {event(outcome)}"]
            lines += [f"  {note}" for note in outcome.notes]  # as one database's run shows them
            print("\n".join(lines), file=self.out, flush=True)
        self._progress()

    def _progress(self) -> None:
        if self.live:
            text = (
                f"{self.finished}/{self.total} done, {self.running} running, {self.failed} failed"
            )
            print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)

    def _clear(self) -> None:
        if self.live:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._clear()


def event(outcome: Outcome) -> str:
    """One target's event, in words."""
    where = outcome.where
    detail = f" ({outcome.detail})" if outcome.detail else ""
    return {
        "migrated": f"migrated: {outcome.detail}",
        "up to date": f"already at {where}{detail}",
        "rolled back": f"rolled back {outcome.detail}; now at {where}",
        "unchanged": f"nothing to roll back, at {where}",
        "stamped": outcome.detail,
        "seeded": outcome.detail,
        "read": f"at {where}, {len(outcome.pending) or 'nothing'} pending",
        "passed": "check passed",
        "problems": f"check failed: {outcome.detail}",
        "locked": f"locked by another run: {outcome.detail}",
        "busy": outcome.detail,
        "failed": f"failed: {outcome.detail}",
        "stopped": f"stopped: {outcome.detail}",
        "skipped": f"skipped ({outcome.detail})",
    }.get(outcome.state, outcome.state)


def print_summary(env: Environment, outcomes: list[Outcome]) -> None:
    """The counts and the version skew, then a row per state: its targets, and each failed
    target with its one-line reason."""
    from collections import Counter, defaultdict

    states = Counter(o.state for o in outcomes)
    versions = Counter(o.where for o in outcomes if o.where is not None)
    skew = ", ".join(f"{count} at {rev}" for rev, count in versions.most_common())
    summary = ", ".join(f"{count} {state}" for state, count in states.items())
    skew = f" ({skew})" if skew else ""  # none when no target's revision was read
    print(f"{env.name}: {counted(len(outcomes), 'target')}: {summary}{skew}", file=sys.stderr)
    names: dict[str, list[str]] = defaultdict(list)
    for o in outcomes:
        if o.state in ("failed", "stopped", "problems"):
            print(f"  {o.state:<11} {o.target}: {o.detail}", file=sys.stderr)
        else:
            names[o.state].append(o.target)
    for state, targets in names.items():
        print(f"  {state:<11} {short(targets)}", file=sys.stderr)


def check_failed() -> int:
    """The exit code of a check that found something (pending revisions, problems, lint)."""
    from db.errors import CheckFailed

    return CheckFailed.exit_code


def announce(env: Environment) -> None:
    from db.urls import mask

    print(f"[{env.label}] {mask(env.url())}", file=sys.stderr)


@contextmanager
def reported(c: Context, debug: bool) -> Iterator[None]:
    """Turn the library's expected errors into a short message and their exit code.

    A task's body runs in it from its first line (its imports take a while): SIGINT or
    SIGTERM there, outside a run (which stops at a safe point instead), ends the task with
    ``interrupted (SIGTERM)`` and 143, not invoke's silent exit 1 or a bare kill.
    """
    from db.errors import DbError, Interrupted

    def terminated(_signum: int, _frame: object) -> None:
        raise Terminated

    gc.freeze()  # what is imported so far lives until exit: no collection scans it again
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:  # a library's warning, as one line of ours (never a raw UserWarning)
                for warned in caught:
                    print(f"warning: {warned.message}", file=sys.stderr)
    except DbError as exc:
        if debug or c.config.db.debug:
            raise
        text = str(exc) if isinstance(exc, Interrupted) else f"error: {exc}"
        raise Exit(text, code=exc.exit_code) from None
    except (KeyboardInterrupt, Terminated) as exc:  # a task that reads, or a second signal
        if debug or c.config.db.debug:
            raise
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        raise Exit(f"interrupted ({signum.name})", code=128 + signum) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        # and what the task made: the collections that end the interpreter would scan it
        # all (freed, a no-op fleet run ended 0.1 s after its last line; frozen, 0.01 s)
        gc.freeze()


class Terminated(BaseException):
    """SIGTERM outside a run, raised as Ctrl-C raises KeyboardInterrupt."""


@contextmanager
def on_signals(stop: Stop) -> Iterator[None]:
    """SIGINT and SIGTERM stop the run at the next safe point instead of killing it.

    A second signal of the same kind acts as it would have without this handler.
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: object) -> None:
        signal.signal(signum, previous[signum])
        stop.request(signum)

    for kind in (signal.SIGINT, signal.SIGTERM):
        previous[kind] = signal.signal(kind, handler)
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


def confirm(env: Environment, yes: bool, action: str, *, need_yes: bool) -> None:
    """Ask for the environment's name on a protected environment; refuse if it isn't typed."""
    from db.errors import GuardRefused

    interactive = sys.stdin is not None and sys.stdin.isatty()
    if need_yes and not yes:
        raise GuardRefused(f"{env.name} is protected: to {action} it, pass --yes")
    if yes and (not need_yes or not interactive):
        return
    if not interactive:
        raise GuardRefused(
            f"{env.name} is protected and there is no terminal to confirm on: "
            "pass --yes to go ahead"
        )
    print(f"{env.name} is protected. Type its name to {action}: ", end="", file=sys.stderr)
    stop = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C ends the prompt
    try:
        typed = sys.stdin.readline().strip()
    except KeyboardInterrupt:
        typed = ""
    finally:
        signal.signal(signal.SIGINT, stop)
    if typed != env.name:
        raise GuardRefused("the name did not match; nothing was changed")


def show_plan(env: Environment, plan: tuple[Revision, ...], findings: list[Finding] | None) -> None:
    """The pending revisions, and on PostgreSQL what squawk says of them."""
    print(f"plan: {len(plan) or 'nothing'} to apply", file=sys.stderr)
    for rev in plan:
        print(f"  {rev.id}  {rev.message}{marker(rev)}", file=sys.stderr)
    if plan and findings is not None:
        planned = {rev.id for rev in plan}
        mine = [found for found in findings if found.revision in planned]
        print(f"lint: {len(mine) or 'no'} finding(s)", file=sys.stderr)
        print_findings(mine, file=sys.stderr)


def print_findings(findings: list[Finding], file: TextIO = sys.stdout) -> None:
    for found in findings:
        print(f"{found.revision}: {found.rule}: {found.message}", file=file)
        print(f"    {found.statement}", file=file)


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=lambda value: value.isoformat()))


def run_options(
    lock_wait: str | None = None, wait: str | None = None, allow_mismatch: bool = False
) -> RunOptions:
    """The library's options from the flags; a flag not given keeps the library's default."""
    from db.runner import RunOptions

    options = RunOptions(
        allow_env_mismatch=allow_mismatch,
        on_start=print_start,
        on_step=print_step,
        on_note=lambda text: print(f"  {text}", file=sys.stderr),
    )
    if lock_wait is not None:
        options.lock_wait = seconds("--lock-wait", lock_wait)
    if wait is not None:
        options.wait = seconds("--wait", wait)
    return options


def whole(flag: str, text: str | None, default: int, least: int) -> int:
    """A whole-number flag (declared as text: invoke's own int conversion fails with a
    traceback); one not given keeps ``default``, an empty one (``--canary=$N``, N unset) is
    refused rather than read as the default."""
    from db.errors import UsageError

    try:
        value = default if text is None else int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise UsageError(f"{flag} takes a whole number, {least} or more, not {text!r}")
    return value


def filled(flag: str, value: str | None, instead: str) -> str | None:
    """A text flag, None when not given. Given empty (``--env=$DEPLOY_ENV`` with the variable
    unset) it is refused, saying what to give ``instead``, never read as the default."""
    from db.errors import UsageError

    if value is not None and not value.strip():
        raise UsageError(f"{flag} is empty: {instead}")
    return value


def named(flag: str, revision: str) -> str:
    """A revision given on the command line: not empty (``--to=$REV``, REV unset), not a
    step of 0 (``+0``), which Alembic words as "didn't produce 0 migrations", and not
    malformed (``@``, which fails inside Alembic)."""
    from db.errors import UsageError
    from db.revision_ids import malformed

    filled(flag, revision, "give a revision id, a prefix, or head")
    if re.fullmatch(r"(?:.+@)?\w*[+-]0+", revision.strip()):
        raise UsageError(f"{flag}={revision.strip()} moves nowhere: give a step of 1 or more")
    problem = malformed(revision.strip())
    if problem is not None:
        raise UsageError(f"{flag}: {problem}")
    return revision.strip()


def seconds(flag: str, text: str) -> float:
    from db.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):
        raise UsageError(f"{flag} takes a number of seconds, 0 or more, not {text!r}")
    return value


def print_start(step: RevisionStep) -> None:
    verb = "applying" if step.is_upgrade else "reverting"
    print(f"  {verb} {step.revision.revision}  {step.revision.doc}...", file=sys.stderr)


def print_step(step: Step) -> None:
    verb = "applied" if step.direction == "up" else "reverted"
    print(f"  {verb} {step.revision}  {step.message}  ({step.seconds:.3f}s)", file=sys.stderr)


def summarize(verb: str, env: Environment, steps: list[Step]) -> None:
    if not steps:
        print(f"{env.name}: nothing to do, the database is already there", file=sys.stderr)
        return
    total = sum(step.seconds for step in steps)
    count = f"{len(steps)} revision{'s' if len(steps) != 1 else ''}"
    print(f"{env.name}: {verb} {count} in {total:.3f}s", file=sys.stderr)


def labels(revisions: tuple[Revision, ...]) -> str:
    return ", ".join(f"{rev.id} ({rev.message})" for rev in revisions)


def marker(rev: Revision) -> str:
    return "" if rev.transactional else "  [non-transactional: autocommit_block]"


ns = Collection(
    migrate,
    check,
    lint,
    merge,
    seed,
    rollback,
    reset,
    restore,
    resolve,
    stamp,
    accept_changes,
    makemigration,
    offline_sql,
    status,
    history,
    envs,
)
ns.configure({"db": {"env": "dev", "debug": False}})
