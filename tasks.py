"""Database tasks: migrate, roll back and inspect the shop database per environment.

Only the tasks live here, each with its flags and help; the command line's edge (the
environment a task names, its flags read, prompts, printing, errors turned into exits) is
the ``cli`` package, and the work is done by the ``db`` package, imported inside each task
so that ``invoke --list`` stays fast.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit

from cli.edge import (
    ROOT,
    announce,
    check_failed,
    environment,
    is_fleet,
    on_signals,
    quiet_when_the_reader_leaves,
    reported,
    run_options,
)
from cli.flags import filled, named, not_dry, seconds, task, whole
from cli.fleet import fleet_args, fleet_plan, no_report, print_fleet_sql, run_fleet
from cli.output import (
    counted,
    note_if_empty,
    print_findings,
    print_history,
    print_json,
    print_status,
    summarize,
)
from cli.prompts import confirm, confirm_migrate, confirm_restore, confirm_rollback

if TYPE_CHECKING:
    from db.fleet_runs import Outcome, TaskArgs

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
quiet_when_the_reader_leaves()

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
REPORT = "on a fleet: print the run's report as JSON (also kept in var/runs/)"


@task(
    help={
        **COMMON,
        **RUN,
        **FLEET,
        "to": "revision to reach: head, an id, a prefix, or +N",
        "yes": YES,
        "keep_going": FLEET_KEEP_GOING,
        "canary": "on a fleet: migrate this many targets that are behind first, the rest only "
        "if they all succeed",
        "json": REPORT,
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
        not_dry(c)
        from db import commands

        to = named("--to", to)
        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        options = run_options(lock_wait, wait, allow_env_mismatch)
        plan = fleet_plan("migrate", {**fleet_args(options), "to": to}, jobs, keep_going, canary)
        if is_fleet(target):
            run_fleet(target, plan, only or "", options, json_=json_, yes=yes)
            return
        no_report(target, json_)
        if target.protected:  # confirmed under the lock (SQLite: just before)
            options.on_plan = confirm_migrate(target, yes)
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
        "json": REPORT,
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
    json_: bool = False,
    debug: bool = False,
) -> None:
    """Downgrade the database by --steps revisions, or to --to=REV (every target of a fleet)."""
    with reported(c, debug):
        not_dry(c)
        from db import commands
        from db.errors import UsageError

        if steps is not None and to is not None:  # which one was meant? neither is guessed
            raise UsageError("--steps and --to do not go together: give one of them")
        count = whole("--steps", steps, default=1, least=1)
        to = None if to is None else named("--to", to)
        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        options = run_options(lock_wait, wait, allow_env_mismatch)
        flags: TaskArgs = {**fleet_args(options), "steps": count, "to": to}
        plan = fleet_plan("rollback", flags, jobs, keep_going)
        if is_fleet(target):
            run_fleet(target, plan, only or "", options, json_=json_, yes=yes)
            return
        no_report(target, json_)
        if target.protected:  # confirmed under the lock (SQLite: just before)
            options.on_plan = confirm_rollback(target, yes)
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
        not_dry(c)
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
        not_dry(c)
        from db import restore as restoring
        from db.locks import LOCK_WAIT
        from db.stop import Stop

        file = filled("--file", file, "name a backup, or leave --file out for the newest")
        target = environment(c, env, only=only)
        if target.protected and not yes:  # said before a password is asked for (prod's)
            confirm(target, yes, "restore a backup over", need_yes=True)
        waits = LOCK_WAIT if lock_wait is None else seconds("--lock-wait", lock_wait)
        announce(target)
        named = None if file is None else Path(file).resolve()
        chosen = restoring.choose(target, target.url(), named, allow_env_mismatch)
        if target.protected:  # the very file that is restored, shown before it is asked
            confirm_restore(target, chosen, yes)
        stop = Stop()
        with on_signals(stop):
            kept = restoring.restore(target, target.url(), chosen.path, stop.check, waits)
    if kept is not None:
        print(f"  kept the database it replaced as {target.relative(kept)}", file=sys.stderr)
    print(f"{target.label}: restored {target.relative(chosen.path)}", file=sys.stderr)


@task(
    help={
        **COMMON,
        "revision": "the revision whose interrupted non-transactional run you have checked",
        "applied": "the run's changes are all in the database: record the upgrade as applied "
        "(the downgrade as finished)",
        "rolled_back": "none of the run's changes are left: record it as not made, to run again",
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
        not_dry(c)
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
        done = records.resolve(target, revision, applied, run_options(lock_wait))
    print(f"{target.label}: {done.described}; the database is at {done.at}", file=sys.stderr)


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
        "json": REPORT,
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
    json_: bool = False,
    debug: bool = False,
) -> None:
    """Record REV as applied without running it: adopt a database made some other way."""
    with reported(c, debug):
        not_dry(c)
        from db import records

        revision = named("REVISION", revision)
        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        options = run_options(lock_wait, None, allow_env_mismatch)
        flags: TaskArgs = {**fleet_args(options), "revision": revision, "force": force}
        plan = fleet_plan("stamp", flags, jobs, keep_going)
        if is_fleet(target):
            run_fleet(target, plan, only or "", options, json_=json_, yes=yes)
            return
        no_report(target, json_)
        if target.protected:
            confirm(target, yes, f"record {revision} as applied on", need_yes=False)
        with on_signals(options.stop):  # its scratch migration stops as a migrate does
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
        **FLEET,
        "keep_going": FLEET_KEEP_GOING,
        "json": REPORT,
    }
)
def accept_changes(
    c: Context,
    revision: str,
    env: str | None = None,
    yes: bool = False,
    lock_wait: str | None = None,
    only: str | None = None,
    jobs: str | None = None,
    keep_going: bool = False,
    json_: bool = False,
    debug: bool = False,
) -> None:
    """Record the new checksum of an applied revision's deliberately edited file."""
    with reported(c, debug):
        not_dry(c)
        from db import records

        revision = named("REVISION", revision)
        target = environment(c, env, banner=True, fleet_ok=True, only=only)
        options = run_options(lock_wait)
        flags: TaskArgs = {**fleet_args(options), "revision": revision}
        plan = fleet_plan("accept-changes", flags, jobs, keep_going)
        if is_fleet(target):
            run_fleet(target, plan, only or "", options, json_=json_, yes=yes)
            return
        no_report(target, json_)
        if target.protected:
            confirm(target, yes, f"accept the edited file of {revision} on", need_yes=False)
        done = records.accept_changes(target, revision, options)
    if done.first:
        said = f"recorded the checksum of {done.revision} as it is now (the trail had none)"
        print(f"{target.label}: {said}", file=sys.stderr)
    elif done.changed:
        print(f"{target.label}: accepted {done.revision} as it is now", file=sys.stderr)
    else:
        print(f"{target.label}: {done.revision} is as recorded: nothing to accept", file=sys.stderr)


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
        not_dry(c)
        from db.authoring import make_migration

        target = environment(c, env, banner=not empty, only=only)
        written = make_migration(target, message, empty=empty)
    if written.path is None:
        none = (
            "none that autogenerate writes" if written.by_hand else "the models match the database"
        )
        print(f"no changes: {none}, so no revision was written", file=sys.stderr)
    else:
        print(f"wrote {written.path.relative_to(ROOT)}", file=sys.stderr)
    for what in written.risks:  # autogenerate's drafts lose data, or fail, without a word
        print(f"warning: the revision {what}", file=sys.stderr)
    for what in written.by_hand:
        print(f"warning: {what}", file=sys.stderr)


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
            print_fleet_sql(target, scripts, output)
            note_if_empty(next(iter(scripts.values())), from_, to)  # one range for all
            return
        sql = authoring.offline_sql(target, from_, to)
        if output:
            authoring.write_sql(Path(output), sql.text)
    if output:
        print(f"wrote the SQL for {target.name} to {output}", file=sys.stderr)
    else:
        sys.stdout.write(sql.text)
    note_if_empty(sql, from_, to)


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
        plan = fleet_plan("status", None, jobs, keep_going=True)
        if is_fleet(target):
            outcomes = run_fleet(target, plan, only or "", run_options(), json_=json_)
            if check and any(o.pending or o.failed or o.state == "unfinished" for o in outcomes):
                raise Exit(f"{target.name}: targets behind head", code=check_failed())
            return
        found = commands.status(target, run_options())
    if json_:
        print_json({"environment": target.name, **asdict(found), "up_to_date": found.up_to_date})
    else:
        print_status(found)
    if check and found.pending:
        raise Exit(f"{target.name}: {len(found.pending)} revision(s) pending", code=check_failed())
    if check and found.unfinished:
        never = f"{len(found.unfinished)} non-transactional run(s) never finished"
        raise Exit(f"{target.name}: {never}: resolve them (see above)", code=check_failed())


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
        plan = fleet_plan("history", None, jobs, keep_going=True)
        if is_fleet(target):

            def show(outcomes: list[Outcome]) -> None:  # of the targets read, if some failed
                read = sum(not o.failed for o in outcomes)
                if not read:  # "applied on 0/0" would say nothing
                    return
                rows = fleet_runs.history(target, outcomes)
                if json_:
                    print_json([{**asdict(rev), "applied_on": on} for rev, on in rows])
                else:
                    for rev, on in rows:
                        print(f"{rev.id}  applied on {len(on)}/{read}  {rev.message}")

            run_fleet(target, plan, only or "", run_options(), quiet=json_, show=show)
            return
        entries = commands.history(target)
    if json_:
        print_json([asdict(entry) for entry in entries])
    else:
        print_history(entries)


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
        lint.postgresql_only(target)  # before the pending revisions are read from it
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
        plan = fleet_plan("check", None, jobs, keep_going=True)
        if is_fleet(target):
            outcomes = run_fleet(target, plan, only or "", run_options())
            failing = sum(o.state == "problems" for o in outcomes)
            if failing:
                of = counted(len(outcomes), "target")
                raise Exit(f"check failed on {failing} of {of}", code=check_failed())
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
        not_dry(c)
        from db import authoring

        written = authoring.merge(environment(c, None), message)
    print(f"wrote {written.relative_to(ROOT)}", file=sys.stderr)


@task(help={**COMMON, **FLEET, "json": REPORT})
def seed(
    c: Context,
    env: str | None = None,
    only: str | None = None,
    jobs: str | None = None,
    json_: bool = False,
    debug: bool = False,
) -> None:
    """Fill the database with a small sample shop (idempotent; never on protected envs)."""
    with reported(c, debug):
        not_dry(c)
        from db import seed

        why = "seed data is for development databases"
        target = environment(
            c, env, banner=True, refuse_protected=why, fleet_ok=True, only=only, app=True
        )
        plan = fleet_plan("seed", None, jobs, keep_going=False)
        if is_fleet(target):
            run_fleet(target, plan, only or "", run_options(), json_=json_)
            return
        no_report(target, json_)
        added = seed.seed(target)
    print(f"{target.label}: {seed.described(added)}", file=sys.stderr)


@task
def envs(c: Context) -> None:
    """List the known environments with their dialect and masked URL.

    Exit 2 if one of them cannot be loaded.
    """
    from db import fleet
    from db.environments import SECRET_KEYS, known_environments, load_environment
    from db.errors import DbError
    from db.urls import mask

    broken, names = 0, known_environments(ROOT)
    if not names:  # not a silent empty list: where they go, and what one holds
        print("no environments: add environments/NAME.env with DATABASE_URL=...", file=sys.stderr)
    for name in names:
        try:
            loaded = load_environment(ROOT, name, os.environ)
            unset = loaded.unset_secrets  # a secret's variable: set where the tasks run
            marks = [("a fleet", fleet.is_fleet(loaded)), ("protected", loaded.protected)]
            parts = [", ".join(mark for mark, holds in marks if holds)]
            parts += [f"{', '.join(sorted(set(unset.values())))} not set"] if unset else []
            said = f"  ({'; '.join(filter(None, parts))})" if any(parts) else ""
            whole = next((k for k in SECRET_KEYS if k in unset and not loaded.get(k)), None)
            if whole in ("DATABASE_URL", "MIGRATION_URL"):  # the URL is all one variable
                print(f"{name:<10} {'?':<11} ${{{unset[whole]}}}{said}")
                continue
            url = loaded.url(need_secrets=False)
            print(f"{name:<10} {url.get_backend_name():<11} {mask(url)}{said}")
        except DbError as exc:
            print(f"{name:<10} {'?':<11} error: {exc}")
            broken += 1
    if broken:  # a CI step that runs `invoke envs` to check the files fails on them
        raise Exit(f"error: {broken} environment(s) cannot be loaded: see above", code=2)


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
