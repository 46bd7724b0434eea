"""Checks made before a run changes anything: ids, applied files, and which env this is."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection

from db import audit
from db.environments import Environment
from db.errors import GuardRefused, RevisionError, Unresolved, resolve_hint, unfinished_run
from db.versions import VERSION_TABLE, has_revision

_REVISION_ID = re.compile(r"\w+", re.ASCII)


def valid_ids(ids: Iterable[str]) -> None:
    """Revision ids are letters, digits and underscores before they go near SQL."""
    for rev in ids:
        if not _REVISION_ID.fullmatch(rev):
            raise RevisionError(
                f"revision id {rev!r} may only hold ASCII letters, digits and underscores"
            )


def same_environment(log: list[audit.Entry], env: Environment, allow: bool) -> bool:
    """Refuse a database last migrated under another environment name (Rails' guard), or,
    on a fleet, as another target (two shops' URLs swapped in a catalog).

    Returns True when ``allow`` overrode a mismatch, so the caller can re-stamp the name.
    """
    if not log:
        return False
    last = log[-1]
    other_target = bool(last.target and env.target and last.target != env.target)
    if last.environment == env.name and not other_target:
        return False
    if allow:
        return True
    if other_target:
        raise GuardRefused(
            f"this database was last migrated as {last.environment}.{last.target}, not "
            f"{env.label}: check that the target's URL (TARGETS_FILE, the catalog) names its "
            "own database, or pass --allow-env-mismatch if it really is this target's"
        )
    raise GuardRefused(
        f"this database was last migrated as {last.environment!r}, not {env.name!r}: check "
        f"that environments/{env.name}.env points at the right server, or pass "
        "--allow-env-mismatch if it really is the same database under a new name"
    )


def unchanged_files(
    log: list[audit.Entry],
    script: ScriptDirectory,
    env: Environment,
    warn: Callable[[str], None],
) -> None:
    """Compare applied revisions' recorded checksums with their files.

    A change is an error on protected environments and a warning elsewhere.
    """
    for problem in changed_files(log, script, env):
        if env.protected:
            raise GuardRefused(f"{problem}; nothing was run")
        warn(f"warning: {problem}")


def changed_files(log: list[audit.Entry], script: ScriptDirectory, env: Environment) -> list[str]:
    """One message per applied revision whose code changed or whose file went missing."""
    found = (_problem(script, env, rev, sums) for rev, sums in audit.applied_checksums(log).items())
    return [problem for problem in found if problem is not None]


def unrecorded(
    log: list[audit.Entry], script: ScriptDirectory, current: tuple[str, ...]
) -> list[str]:
    """Applied revisions (by the version table) that the audit trail has no checksum for,
    oldest first: applied by plain Alembic, or the trail was dropped or emptied since."""
    recorded = {rev for rev, sums in audit.applied_checksums(log).items() if sums[0] is not None}
    applied = script.revision_map.iterate_revisions(current, "base")
    return [rev.revision for rev in applied if rev.revision not in recorded][::-1]


def _problem(
    script: ScriptDirectory, env: Environment, rev: str, sums: tuple[str | None, str | None]
) -> str | None:
    try:
        found = script.get_revision(rev)
    except CommandError:
        found = None
    if found is None:
        return (
            f"revision {rev} is applied, but its file is missing from "
            f"{_relative(script.versions, env)}: restore it from version control"
        )
    if audit.unchanged(found.path, *sums):
        return None
    recorded, current = sums[0] or "", audit.checksum(found.path)
    # on a fleet, for every target at once: each applied the one file, and one that took it
    # as it is now has nothing to accept (and the plan shows one line for them all)
    return (
        f"{_relative(found.path, env)} changed after revision {rev} was applied "
        f"(sha256 {recorded[:12]} then, {current[:12]} now): restore it, or record the change "
        f"with `invoke accept-changes --env={env.name} {rev}`"
    )


def _relative(path: str, env: Environment) -> str:
    return env.relative(Path(path).resolve())


def several_heads(script: ScriptDirectory) -> str | None:
    """The one wording of "there are several heads", or None when there is one."""
    heads = script.get_heads()
    if len(heads) < 2:
        return None
    return f"the revisions have {len(heads)} heads ({', '.join(sorted(heads))})"


def single_head(script: ScriptDirectory, *, to_flag: bool = False) -> None:
    """Refuse several heads; ``to_flag``: the task can be pointed at one with --to."""
    problem = several_heads(script)
    if problem:
        either = ", or pass --to=REV for one of them" if to_flag else ""
        raise RevisionError(f"{problem}: merge them with `invoke merge`{either}")


def reached(script: ScriptDirectory, to: str, current: tuple[str, ...], env: Environment) -> None:
    """With nothing to apply, refuse a --to=REV the database is past: migrate does not go
    back, and "nothing to do" would say the database is at REV when it is not."""
    if to in ("head", "heads"):
        return
    try:
        found = script.get_revision(to)
    except CommandError:  # relative (+1, -1, REV@-1): Alembic planned it, or refused
        return
    if (found.revision in current) if found is not None else not current:
        return
    raise RevisionError(
        f"the {env.label} database is at {', '.join(current)}, past {to}: migrate only goes "
        f"forward; `invoke rollback {env.flags} --to={to}` goes back to it"
    )


def not_ahead(script: ScriptDirectory, to: str, current: tuple[str, ...], env: Environment) -> None:
    """Refuse a rollback --to=REV the database has not reached: rollback does not go
    forward, and Alembic's "not a valid downgrade target" does not say why."""
    try:
        found = script.get_revision(to)
    except CommandError:  # relative or unknown: Alembic plans it, or says so
        return
    at = ", ".join(current) or "base (nothing applied)"
    others = [head for head in current if found is not None and head != found.revision]
    if found is not None and found.revision in current and others:  # Alembic: nothing to do
        raise RevisionError(
            f"the {env.label} database is at {at}: {to} is one of its heads already, so "
            "rolling back to it undoes nothing; undo the other branch by itself: "
            f"`invoke rollback {env.flags} --to={others[0]}@-1` undoes its last revision"
        )
    if found is None or found.revision in current:
        return
    below = {rev.revision for rev in script.iterate_revisions(found.revision, "base")}
    if all(head in below for head in current):  # every head on the way to it: it is ahead
        raise RevisionError(
            f"the {env.label} database is at {at}, before {to}: rollback only goes back; "
            f"`invoke migrate {env.flags} --to={to}` goes forward to it"
        )
    applied = {rev.revision for rev in script.iterate_revisions(current, "base")}
    if found.revision not in applied:  # on a branch the database does not have
        raise RevisionError(
            f"the {env.label} database is at {at}, and {to} is on another branch, which it "
            f"has not applied: rollback only goes back; `invoke migrate {env.flags} --to={to}` "
            "applies it"
        )


def known_revisions(script: ScriptDirectory, current: tuple[str, ...], env: Environment) -> None:
    """Refuse a database whose version table names a revision the files do not have, or
    two revisions of which one comes after the other (a row added by hand): Alembic then
    failed inside its planning ("overlaps with other requested revisions")."""
    valid_ids(current)
    for rev in current:
        if not has_revision(script, rev):
            again = "" if env.protected else f"; or start it again: `invoke reset {env.flags}`"
            raise RevisionError(
                f"the {env.label} database is at revision {rev}, which is not in "
                f"{Path(script.versions).relative_to(env.root)}: check out the code that "
                "matches this database, or restore that revision's file (squashed into a new "
                f"one? `invoke stamp {env.flags} NEW` records it){again}"
            )
    for newer in current if len(current) > 1 else ():  # one revision: nothing to overlap
        before = {rev.revision for rev in script.iterate_revisions(newer, "base")} - {newer}
        for older in (rev for rev in current if rev in before):
            raise RevisionError(
                f"the {env.label} database's version table ({VERSION_TABLE}) holds both {older} "
                f"and {newer}, which comes after it: one of the two rows is wrong (added by "
                f"hand?); if the database is at {newer}, delete the row of {older}"
            )


def as_confirmed(confirmed: tuple[str, ...], planned: tuple[str, ...]) -> None:
    """Refuse to run a plan other than the one confirmed (asked before the lock was taken,
    while another run changed the database). What is left of it, after another run did
    the rest (or all of it), is no other plan: it runs only what was confirmed, to where
    the plan said."""
    if planned != confirmed[len(confirmed) - len(planned) :]:
        then, now = (", ".join(ids) or "nothing" for ids in (confirmed, planned))
        raise GuardRefused(
            "the plan changed while it was being confirmed (another run changed the "
            f"database meanwhile: the plan was {then}, and is now {now}): nothing was "
            "changed; run the task again to see the new plan"
        )


def all_finished(log: list[audit.Entry], env: Environment, connection: Connection) -> None:
    """Refuse to run past a non-transactional revision that started and never finished."""
    for entry in audit.unfinished(log):
        statement = audit.last_statement(connection, entry) or "none"
        upgrade = entry.direction == "run-up"
        raise Unresolved(
            f"{never_finished(entry)} (last statement started: {statement}); nothing was run: "
            f"check what it did, then record it with "
            f"{resolve_hint(env.flags, entry.revision, upgrade)}"
        )


def never_finished(entry: audit.Entry) -> str:
    """A non-transactional run that started and never finished (nor was resolved), in words."""
    upgrade = entry.direction == "run-up"
    return (
        f"{unfinished_run(f'revision {entry.revision}', upgrade)} started its "
        f"non-transactional part at {entry.started_at:%Y-%m-%d %H:%M:%S %Z} and never finished"
    )
