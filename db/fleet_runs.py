"""A run over a fleet: its plan, what became of each target, the exit code, the report.

Each target is an ordinary environment of its own (:mod:`db.fleet`), run through the
one-database path with all its promises (its own lock, per-revision atomicity, audit rows,
checksums, guards). Alembic keeps its state in module globals, so targets run in worker
processes (:mod:`db.pool`), never in threads of one interpreter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from db.environments import Environment
from db.errors import ConfigError
from db.files import dated, write_whole
from db.fleet import Target, environment, host, targets

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

    from db.authoring import OfflineSql
    from db.stop import Stop

RUNS_DIR = Path("var") / "runs"
_STAMP, _STAMP_SHAPE = "%Y%m%dT%H%M%S.%fZ", r"\d{8}T\d{6}\.\d{6}Z"  # a report's time, its shape


# the tasks that write a run report
CHANGING = ("migrate", "rollback", "stamp", "accept-changes", "seed")


# a target's run came back without an outcome: locked by another run, or its server had no
# free connection; it is tried again once the other targets are done
RETRIED_LAST = ("locked", "busy")


@dataclass(frozen=True)
class Outcome:
    """What became of one target."""

    target: str
    # migrated, up to date, rolled back, stamped, seeded, at head, behind or unfinished (what
    # a read found; a plan's read: behind or to undo, there, past, refused, unfinished),
    # passed, problems, locked or busy (retried at the end), failed, stopped (after a
    # revision: another failed), skipped
    state: str
    detail: str = ""  # the revisions applied, or the one-line reason
    current: tuple[str, ...] | None = None  # its revision(s), () at base; None: not known
    heads: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()  # revision ids still to apply, oldest first
    applied: tuple[str, ...] = ()  # every revision applied (history)
    exit_code: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()  # what its run noted on the way: a backup, a warning
    trace: str = ""  # a failed target's traceback, when the run was asked for it (--debug)

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
    revision: str  # stamp, accept-changes
    force: bool  # stamp
    lock_wait: float
    wait: float | None
    allow_env_mismatch: bool
    retry: bool  # set by the pool: False on the last try, which waits for the lock
    was_locked: bool  # set by the pool: an earlier try found it behind, and locked by another
    # a protected fleet's migrate or rollback: each target's revisions, as its plan showed
    # them (none for a target with nothing to do, or that its plan refused)
    confirmed: dict[str, tuple[str, ...]]
    debug: bool  # keep a failed target's traceback in its outcome


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
    alike: revision files that do not load (every task but seed reads them), several heads
    for a migrate to head, a revision (``--to``, or the one to stamp or accept) that the
    files do not have, a bad ``RUNS_KEEP``."""
    from db import guards
    from db.records import stamp_target
    from db.revision_ids import by_id, known_revision, one_way

    if plan.task in CHANGING:  # a bad setting, said now rather than after the run
        env.count("RUNS_KEEP", 100)
    if plan.task in ("migrate", "rollback") and plan.args.get("to"):
        one_way(plan.args.get("to") or "", up=plan.task == "migrate", flags=env.flags)
    if plan.task == "seed":  # the one task that reads no revision file
        return
    script = _scripts(env, chosen[0])
    if plan.task == "stamp":
        stamp_target(script, plan.args.get("revision", ""), env.flags)
    elif plan.task == "accept-changes":
        by_id(script, plan.args.get("revision", ""), env.flags, plan.task)
    elif plan.task == "migrate" and plan.args.get("to") == "head":
        guards.single_head(script, to_flag=True)
    elif plan.args.get("to"):
        known_revision(script, plan.args.get("to") or "", env.flags)


def history(env: Environment, outcomes: list[Outcome]) -> list[tuple[Any, list[str]]]:
    """Every revision, newest first, with the targets it is applied on."""
    from db.progress import Revision

    if not outcomes:
        return []
    script = _scripts(env, Target(outcomes[0].target))
    return [
        (Revision.of(rev), [o.target for o in outcomes if rev.revision in o.applied])
        for rev in script.walk_revisions()
    ]


def _scripts(env: Environment, target: Target) -> ScriptDirectory:
    """The revision files, the same for every target; loaded through a target's own
    settings, since the fleet's have none of their own (``SCHEMA={target}``, say)."""
    from db.runner import load_scripts, make_config

    return load_scripts(make_config(environment(env, target), offline=True))


def offline_sql(env: Environment, only: str, start: str | None, to: str) -> dict[str, OfflineSql]:
    """Each chosen target's SQL: its own, since its audit rows name it (and its schema, or its
    own URL's dialect, may differ). A --from or --to the files do not have is refused once,
    as the fleet's (its history is the fleet's, not its first target's)."""
    from db.authoring import offline_sql as render
    from db.revision_ids import known_revision

    chosen = targets(env, only)
    script = _scripts(env, chosen[0])
    for given in (start, to):
        if given is not None:
            known_revision(script, given, env.flags)
    return {t.name: render(environment(env, t), start, to) for t in chosen}


def write_sql(folder: Path, scripts: Mapping[str, str]) -> dict[str, Path]:
    """Write each target's SQL to ``folder/NAME.sql``; returns the paths."""
    from db.authoring import write_sql

    if folder.exists() and not folder.is_dir():  # a file, or a stream (/dev/stdout)
        raise ConfigError(
            f"{folder} is no folder: on a fleet, --output names a folder (a file per "
            "target); without it, every target's SQL is printed"
        )
    written = {name: folder / f"{name}.sql" for name in scripts}
    for name, path in written.items():
        write_sql(path, scripts[name])
    return written


def other_sql(folder: Path, written: Mapping[str, Path]) -> list[str]:
    """The ``.sql`` files in ``folder`` that a run did not write (an earlier run's), by name:
    a script that applies ``folder/*.sql`` would apply them too."""
    ours = set(written.values())
    return sorted(path.name for path in folder.glob("*.sql") if path not in ours)


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
    left_out = ("applied", "exit_code", "detail", "trace")
    row = {k: v for k, v in asdict(o).items() if k not in left_out}
    row.update(
        up_to_date=not o.failed and not o.pending and o.state != "unfinished",
        detail=o.detail if not o.failed else "",
        error=o.detail if o.failed else None,
    )
    return {key: list(v) if isinstance(v, tuple) else v for key, v in row.items()}


def write_report(env: Environment, data: Mapping[str, Any]) -> Path | None:
    """Keep a run's report in ``var/runs``, and the newest ``RUNS_KEEP`` (default 100) of
    the environment's; returns its path, or None when ``RUNS_KEEP=0`` keeps none."""
    keep = env.count("RUNS_KEEP", 100)
    stamp = datetime.now(timezone.utc).strftime(_STAMP)
    path = env.root / RUNS_DIR / f"{env.name}-{stamp}.json"
    if keep:
        try:
            write_whole(path, json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            why = exc.strerror
            raise ConfigError(f"cannot write the run's report to {RUNS_DIR}: {why}") from None
    for old in dated(path.parent, env.name, _STAMP_SHAPE, "json", _written)[keep:]:
        old.unlink(missing_ok=True)
    return path if keep else None


def _written(stamp: str) -> datetime:
    return datetime.strptime(stamp, _STAMP).replace(tzinfo=timezone.utc)


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
    ``canary``: see :func:`_canaries_first`. A target whose lock another run holds is
    retried once the others are done. Outcomes come back in the order of ``chosen``. A
    requested ``stop`` (a signal) starts no more targets; the running ones stop as one run
    would.
    """
    from db.pool import Pool

    if plan.canary:

        def go(targets: list[Target], how: Plan, quiet: bool = False) -> list[Outcome]:
            hooks = (None, None) if quiet else (on_done, on_start)
            return run(env, environ, targets, how, *hooks, stop) if targets else []

        return _canaries_first(go, chosen, plan, on_done, stop)
    hosts = {t.name: host(environment(env, t)) for t in chosen}
    cap = env.count("MAX_CONNECTIONS_PER_HOST", 0) or plan.jobs
    # no more workers than can run at once: each is a process forked up front (--jobs=2000
    # on two targets forked 2000 of them)
    useful = min(plan.jobs, len(chosen), cap * len(set(hosts.values())))
    plan = replace(plan, jobs=max(1, useful))
    with Pool(env, environ, plan, hosts, cap, stop, first=chosen[0] if chosen else None) as pool:
        return pool.run(chosen, on_done, on_start)


def _canaries_first(
    go: Callable[[list[Target], Plan, bool], list[Outcome]],
    chosen: list[Target],
    plan: Plan,
    on_done: Callable[[Outcome], None] | None,
    stop: Stop | None,
) -> list[Outcome]:
    """The first ``plan.canary`` targets that have revisions to apply go first (``go`` runs
    a plan on targets, quietly or not), and the rest only if every one of them succeeded.
    Which ones is read first, without their locks: a target already there (after an earlier
    run, or ``--only``) would prove nothing."""
    once = replace(plan, canary=0)
    read = go(chosen, replace(once, task="pending", keep_going=True), True)
    behind = {o.target for o in read if o.state == "behind"}
    there = {o.target: replace(o, state="up to date") for o in read if o.state == "there"}
    canaries = [t for t in chosen if t.name in behind][: plan.canary]
    rest = [t for t in chosen if t not in canaries]
    first = go(canaries, once, False)
    if any(o.failed for o in first) or (stop is not None and stop.requested):
        why = "interrupted" if stop is not None and stop.requested else "a canary failed"
        then = [there.get(t.name) or Outcome(t.name, "skipped", why) for t in rest]
        for outcome in then:
            if on_done is not None:
                on_done(outcome)
    else:
        then = go(rest, once, False)
    order = {target.name: index for index, target in enumerate(chosen)}
    return sorted(first + then, key=lambda outcome: order[outcome.target])
