"""A task on a fleet, as the command line shows it: the plan a protected fleet confirms, a
line per target, a progress line on a terminal, the summary and the exit code."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TextIO

from invoke.exceptions import Exit

from cli.edge import DEBUG, on_signals
from cli.flags import whole
from cli.output import counted, print_json, short
from cli.prompts import confirm

if TYPE_CHECKING:
    from db.authoring import OfflineSql
    from db.environments import Environment
    from db.fleet import Target
    from db.fleet_runs import Outcome, Plan, TaskArgs
    from db.runner import RunOptions
    from db.stop import Stop


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
    args = TaskArgs(**(args or {}), debug=DEBUG.get())
    return Plan(task_name, args, count, keep_going, whole("--canary", canary, 0, 0))


# what a protected fleet asks before a run that changes its targets, where it shows no plan
PROTECTED_ASKS = {
    "stamp": ("record {revision} as applied on", False),
    "accept-changes": ("accept the edited file of {revision} on", False),
}
# where it does: the read that makes the plan, what it asks to do, whether that needs --yes
# (a rollback, as on one database), and what a target with nothing to do is reported as
PLANS = {
    "migrate": ("pending", "migrate", False, "up to date"),
    "rollback": ("undoing", "roll back", True, "unchanged"),
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
    show: Callable[[list[Outcome]], None] | None = None,
) -> list[Outcome]:
    """Run a task on every chosen target of a fleet: a line per target, then a summary; a
    protected fleet's migrate or rollback shows its plan and asks once. ``show`` prints
    what the task makes of the outcomes (a fleet's history), those of targets that failed
    too. Exits non-zero if targets failed."""
    from dataclasses import replace
    from datetime import datetime, timezone

    from db import fleet, fleet_runs

    chosen = fleet.targets(env, only)
    targets = {target.name: target for target in chosen}
    fleet_runs.check(env, plan, chosen)  # what would fail every target alike fails here, once
    hosts = {fleet.host(fleet.environment(env, t)) for t in chosen}
    plan = replace(plan, jobs=plan.jobs or fleet_runs.default_jobs(len(chosen), len(hosts)))
    order = {target.name: index for index, target in enumerate(chosen)}
    # the targets a protected fleet's plan found with nothing to do, or could not read
    done: list[Outcome] = []
    if env.protected and plan.task in PLANS:
        chosen, done, plan = confirm_fleet(env, chosen, plan, yes, options.stop)
    elif env.protected and plan.task in PROTECTED_ASKS:
        action, need_yes = PROTECTED_ASKS[plan.task]
        confirm(env, yes, action.format(**plan.args), need_yes=need_yes)
    out = sys.stdout if plan.task == "status" else sys.stderr
    board = Board(len(chosen) + len(done), quiet=quiet or json_, out=out)
    started = datetime.now(timezone.utc)
    for outcome in done:
        board.done(outcome)
    with on_signals(options.stop):
        ran = (
            fleet_runs.run(env, os.environ, chosen, plan, board.done, board.start, options.stop)
            if chosen
            else []
        )
    board.close()
    outcomes = sorted(done + ran, key=lambda outcome: order[outcome.target])
    code = fleet_runs.exit_code(outcomes, options.stop.signum)
    report = fleet_runs.report(env, plan, outcomes, started, code)
    print_summary(env, outcomes, targets)
    if plan.task in fleet_runs.CHANGING:
        keep_report(env, report)
    if json_:
        print_json(report)
    if show is not None:
        show(outcomes)
    if code:
        raise Exit(not_there(plan, outcomes), code=code)
    return outcomes


def keep_report(env: Environment, report: dict[str, Any]) -> None:
    """Write a run's report to var/runs/, and say where; one that cannot be written (a full
    disk) is a warning: the run happened all the same."""
    from db import fleet_runs
    from db.errors import ConfigError

    try:
        kept = fleet_runs.write_report(env, report)
    except ConfigError as exc:
        print(f"warning: {exc}; the run itself is as printed above", file=sys.stderr)
        return
    if kept is not None:  # RUNS_KEEP=0 keeps none
        print(f"report: {env.relative(kept)}", file=sys.stderr)


def no_report(env: Environment, json_: bool) -> None:
    """``--json`` prints a fleet run's report: on one database it is refused, since
    printing nothing where JSON was asked for would pass for a report."""
    from db.errors import UsageError

    if json_:
        raise UsageError(
            f"--json prints a fleet run's report, and {env.name} is one database: "
            f"`invoke status {env.flags} --json` says where it is"
        )


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


def confirm_fleet(
    env: Environment, chosen: list[Target], plan: Plan, yes: bool, stop: Stop
) -> tuple[list[Target], list[Outcome], Plan]:
    """A protected fleet's plan (what a migrate would apply to each target, or a rollback
    undo), the targets grouped in short form, confirmed once; returns the targets it
    concerns (none: nothing to confirm), the outcomes of the others (nothing to do, or
    not read), and the plan that runs: each target's run does only what was confirmed for
    it. A signal while the targets are read (a server slow to answer) ends it at once,
    before the question."""
    from dataclasses import replace

    from db import fleet_runs

    task, verb, need_yes, nothing = PLANS[plan.task]
    reading = replace(plan, task=task, keep_going=True, canary=0)
    with on_signals(stop):  # the workers are told, and give up what they are reading
        read = fleet_runs.run(env, os.environ, chosen, reading, stop=stop)
    stop.check()
    print(f"plan for {len(chosen)} targets:", file=sys.stderr)
    for what, names in plan_groups(env, plan, chosen, read).items():
        print(f"  {len(names)} target(s): {what}  [{short(names)}]", file=sys.stderr)
    # a target already there has nothing to do; one not read has no plan to confirm
    concerned = {o.target: o for o in read if o.state != "there" and not o.failed}
    if any(o.state in ("behind", "to undo") for o in concerned.values()):  # else all refused
        confirm(env, yes, f"{verb} {len(concerned)} target(s) of", need_yes=need_yes)
    done = [replace(o, state=nothing, pending=()) for o in read if o.state == "there"]
    done += [
        replace(o, detail=f"not run, as its plan was not read: {o.detail}")
        for o in read
        if o.failed
    ]
    # what each target's run may do: what its plan showed (nothing where it showed a refusal)
    confirmed = {
        name: o.pending if o.state in ("behind", "to undo") else () for name, o in concerned.items()
    }
    confirmed_plan = replace(plan, args={**plan.args, "confirmed": confirmed})
    return [t for t in chosen if t.name in concerned], done, confirmed_plan


def plan_groups(
    env: Environment, plan: Plan, chosen: list[Target], read: list[Outcome]
) -> dict[str, list[str]]:
    """The names of the targets, by what a protected fleet's plan says of them. A target
    the run would refuse is run all the same, to fail as it would unprotected."""
    from collections import defaultdict

    to = plan.args.get("to") or "head"
    groups: dict[str, list[str]] = defaultdict(list)
    for target, outcome in zip(chosen, read, strict=True):
        if outcome.failed:  # a server that is down: one line for its targets, not one each
            what = f"unreadable: {as_the_fleets(env, target, outcome.detail)}"
        elif outcome.state == "unfinished":  # its run takes the lock, and the guard refuses it
            what = "a non-transactional run never finished: refused until resolved"
        elif outcome.state == "past":
            what = f"past {to}: refused, migrate only goes forward"
        elif outcome.state == "refused":  # one line for those refused alike, not one each
            what = f"refused: {as_the_fleets(env, target, outcome.detail)}"
        elif plan.task == "rollback":
            what = f"undo {in_short(outcome.pending)}" if outcome.pending else "nothing to undo"
        else:
            what = in_short(outcome.pending, to)
        groups[what].append(outcome.target)
    return groups


def as_the_fleets(env: Environment, target: Target, said: str) -> str:
    """What was said of a target, written with ``{target}`` for its name, so that targets
    that failed (or would be refused) alike read alike: its URL as the fleet's, its label
    (``shops.{target}``) and the ``--only={target}`` of a command that names it. A target
    with a URL of its own (from its line of TARGETS_FILE, or its catalog row) keeps that
    URL: it is on another server."""
    from db import fleet
    from db.errors import DbError
    from db.urls import mask

    if not target.url:
        with suppress(DbError):  # a secret not set: the URL said as it is
            said = said.replace(mask(fleet.environment(env, target).url()), mask(env.url()))
    for named in (f"{env.name}.", "--only="):  # the name whole, not shops.alpha2's alpha
        said = re.sub(rf"{re.escape(named + target.name)}(?![\w.-])", named + "{target}", said)
    return said


def in_short(pending: tuple[str, ...], to: str = "head") -> str:
    """Revisions to apply, in a plan's short form: a few by name, many as a range."""
    if len(pending) > 3:
        return f"{len(pending)} revisions, {pending[0]} to {pending[-1]}"
    return ", ".join(pending) or f"nothing (at {to})"


class Board:
    """What a fleet run shows: a line per target event, and on a terminal a progress line."""

    def __init__(self, total: int, *, quiet: bool, out: TextIO) -> None:
        self.total, self.quiet, self.out = total, quiet, out
        self.finished = self.failed = 0
        self.running: set[str] = set()  # a target reported done without a start never ran
        self.live = not quiet and sys.stderr.isatty()
        self.width = len(str(total))

    def start(self, target: Target) -> None:
        self.running.add(target.name)
        self._progress()

    def done(self, outcome: Outcome) -> None:
        from db.fleet_runs import RETRIED_LAST

        self.running.discard(outcome.target)
        if outcome.state not in RETRIED_LAST:
            self.finished += 1
            self.failed += outcome.failed
        if outcome.trace:  # --debug: as on one database, the traceback before the message
            self._clear()
            print(outcome.trace, end="", file=sys.stderr, flush=True)
        if not self.quiet:
            self._clear()
            count = f"{self.finished:>{self.width}}/{self.total}"
            print(f"[{count} {outcome.target}] {event(outcome)}", file=self.out, flush=True)
            for note in outcome.notes:  # as one database's run says them: on stderr, no data
                print(f"  {note}", file=sys.stderr, flush=True)
        self._progress()

    def _progress(self) -> None:
        if self.live:
            text = (
                f"{self.finished}/{self.total} done, {len(self.running)} running, "
                f"{self.failed} failed"
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
        "accepted": outcome.detail,
        "as recorded": f"{outcome.detail}: nothing to accept",
        "not applied": outcome.detail,
        "seeded": outcome.detail,
        "at head": f"at {where}, nothing pending",
        "behind": f"at {where}, {len(outcome.pending)} pending",
        "unfinished": f"at {where}; {outcome.detail}",
        "passed": "check passed",
        "problems": f"check failed: {outcome.detail}",
        "locked": outcome.detail,
        "busy": outcome.detail,
        "failed": f"failed: {outcome.detail}",
        "stopped": f"stopped: {outcome.detail}",
        "skipped": f"skipped ({outcome.detail})",
    }.get(outcome.state, outcome.state)


def print_summary(env: Environment, outcomes: list[Outcome], targets: dict[str, Target]) -> None:
    """The counts and the version skew, then a row per state: its targets, and each failed
    target with its one-line reason; targets that failed alike share one row, the reason
    written as of the fleet (``shops.{target}``), so that a revision failing on 900 shops
    takes one row, not 900 (each still has its own event line, and its report entry)."""
    from collections import Counter, defaultdict

    states = Counter(o.state for o in outcomes)
    versions = Counter(o.where for o in outcomes if o.where is not None)
    skew = ", ".join(f"{count} at {rev}" for rev, count in versions.most_common())
    summary = ", ".join(f"{count} {state}" for state, count in states.items())
    skew = f" ({skew})" if skew else ""  # none when no target's revision was read
    print(f"{env.name}: {counted(len(outcomes), 'target')}: {summary}{skew}", file=sys.stderr)
    told: dict[tuple[str, str], list[Outcome]] = defaultdict(list)  # a reason, and to whom
    names: dict[str, list[str]] = defaultdict(list)
    for o in outcomes:
        if o.state in ("failed", "stopped", "problems", "unfinished"):
            told[o.state, as_the_fleets(env, targets[o.target], o.detail)].append(o)
        else:
            names[o.state].append(o.target)
    for (state, alike), them in told.items():
        who, why = short([o.target for o in them]), alike if len(them) > 1 else them[0].detail
        print(f"  {state:<11} {who}: {why}", file=sys.stderr)
    for state, listed in names.items():
        print(f"  {state:<11} {short(listed)}", file=sys.stderr)


def print_fleet_sql(env: Environment, scripts: dict[str, OfflineSql], output: str | None) -> None:
    """Each target's offline SQL: printed after a ``-- target: NAME`` line, or written to
    ``output/NAME.sql``, with a warning of any other ``.sql`` file there (an earlier run's,
    which a script applying ``output/*.sql`` would run too)."""
    from pathlib import Path

    from db import fleet_runs

    if not output:
        sys.stdout.write("".join(f"-- target: {n}\n{sql.text}" for n, sql in scripts.items()))
        return
    folder = Path(output).absolute()  # as given: /dev/stdout is no folder, not a pipe's name
    written = fleet_runs.write_sql(folder, {name: sql.text for name, sql in scripts.items()})
    for name, path in written.items():
        print(f"wrote the SQL for {env.name} {name} to {path}", file=sys.stderr)
    if others := fleet_runs.other_sql(folder, written):
        print(
            f"warning: {output} also holds {', '.join(others)}, which this run did not write "
            "(an earlier run's): apply only the files listed above",
            file=sys.stderr,
        )
