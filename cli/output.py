"""What the tasks print: revisions applied and planned, lint findings, JSON."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep

    from db.authoring import OfflineSql
    from db.commands import HistoryEntry, Status
    from db.environments import Environment
    from db.lint import Finding
    from db.progress import Revision
    from db.runner import Step


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


def print_findings(findings: list[Finding], file: TextIO | None = None) -> None:
    """Each finding, to ``file`` (stdout, as it is when called, by default)."""
    for found in findings:
        print(f"{found.revision}: {found.rule}: {found.message}", file=file)
        print(f"    {found.statement}", file=file)


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=lambda value: value.isoformat()))


def print_start(step: RevisionStep) -> None:
    from db.progress import message_of  # loaded by then: a revision is starting

    verb = "applying" if step.is_upgrade else "reverting"
    print(f"  {verb} {step.revision.revision}  {message_of(step.revision)}...", file=sys.stderr)


def print_step(step: Step) -> None:
    verb = "applied" if step.direction == "up" else "reverted"
    print(f"  {verb} {step.revision}  {step.message}  ({step.seconds:.3f}s)", file=sys.stderr)


def summarize(verb: str, env: Environment, steps: list[Step]) -> None:
    if not steps:
        print(f"{env.label}: nothing to do, the database is already there", file=sys.stderr)
        return
    total = sum(step.seconds for step in steps)
    count = f"{len(steps)} revision{'s' if len(steps) != 1 else ''}"
    print(f"{env.label}: {verb} {count} in {total:.3f}s", file=sys.stderr)


def labels(revisions: tuple[Revision, ...]) -> str:
    return ", ".join(f"{rev.id} ({rev.message})" for rev in revisions)


def marker(rev: Revision) -> str:
    return "" if rev.transactional else "  [non-transactional: autocommit_block]"


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def short(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def print_status(found: Status) -> None:
    """One database's revision, its head(s), and what is pending, in order."""
    print(f"current: {labels(found.current) or 'base (no revision applied)'}")
    print(f"head:    {labels(found.heads) or 'none (no revisions yet)'}")
    if len(found.heads) > 1:
        print(f"         {len(found.heads)} heads: run `invoke merge` to join them")
    print(f"pending: {len(found.pending) or 'none'}")
    for rev in found.pending:
        print(f"  {rev.id}  {rev.message}{marker(rev)}")
    for run in found.unfinished:  # migrate and rollback refuse until it is resolved
        print(f"unfinished: {run.said}")


def print_history(entries: list[HistoryEntry]) -> None:
    """Every revision, newest first: applied ones with when and by whom."""
    for entry in entries:
        mark = "applied" if entry.applied else "pending"
        head = "  (head)" if entry.is_head else ""
        when = ""
        if entry.applied_at is not None:
            when = f"  [{entry.applied_at:%Y-%m-%d %H:%M:%S %z} by {entry.applied_by}]"
        elif entry.applied:  # by plain Alembic, or the trail was emptied since
            when = "  [when and by whom: not recorded]"
        print(f"{entry.revision.id}  {mark}  {entry.revision.message}{head}{when}")


def note_if_empty(sql: OfflineSql, start: str | None, to: str) -> None:
    """Say so when offline SQL applies no revision (``--from`` at ``--to`` already): a file
    that only sets the session up would read as the next deploy's once it was applied."""
    if not sql.revisions:
        print(
            f"note: no revision lies between --from={start or 'base'} and --to={to}: the SQL "
            "only sets up the session and the audit table, and applies nothing",
            file=sys.stderr,
        )
