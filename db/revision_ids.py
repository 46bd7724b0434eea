"""Revisions as a user names them (``--to=``, ``stamp REV``): checked against the files,
and Alembic's errors about them said plainly."""

from __future__ import annotations

import re

from alembic.script import Script, ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError

from db.errors import RevisionError

_RELATIVE = re.compile(r"Relative revision ([+-]\d+) didn't produce (\d+) migrations")
_RELATIVE_ID = re.compile(r"(?:.+@)?\w*[+-]\d+")  # +2, -1, ae1027a6acf+2, branch@-1
# steps counted from the database's own revision, which go one way only
_BACK, _FORWARD = re.compile(r"(?:[^@]+@)?-\d+"), re.compile(r"(?:[^@]+@)?\+\d+")
_STEPS = re.compile(r"[+-]\d+$")  # REV+2, -1: the steps after a revision (or alone)
SHORTEST_PREFIX = 4  # Alembic takes any prefix that is unique today; a shorter one may not be


def known_revision(script: ScriptDirectory, revision: str, flags: str) -> None:
    """Refuse a revision the files do not have, and a ``BRANCH@REV`` whose branch they do
    not have: Alembic reads ``typo@base`` as base (a rollback of everything), and ``@`` or
    ``REV@`` fail inside it. Steps relative to a database's own revision (``+N``, ``-N``,
    ``REV@-N``) depend on that database, so they are left to its run."""
    problem = malformed(revision) or too_short(script, revision)
    if problem is not None:
        raise RevisionError(f"{problem}; see `invoke history {flags}`")
    branch, at, _rest = revision.partition("@")
    try:
        if at:
            script.get_revisions(branch)
        if not relative(revision):
            script.get_revisions(revision)
    except CommandError as exc:
        raise revision_error(exc, flags) from exc


def relative(revision: str) -> bool:
    """Whether ``revision`` counts steps (``+2``, ``head-1``, ``ae1027a6acf+2``)."""
    return _RELATIVE_ID.fullmatch(revision) is not None


def by_id(script: ScriptDirectory, revision: str, flags: str, task: str) -> Script | None:
    """The one revision a task that records (``stamp``, ``accept-changes``) is given, by id,
    prefix or ``head``; None for base. Steps (``head-1``) are refused in words: Alembic
    says "No such revision or branch 'head-1'"."""
    known_revision(script, revision, flags)
    try:
        return script.get_revision(revision)
    except CommandError as exc:
        if relative(revision):
            raise RevisionError(
                f"{task} takes a revision named by its id, not by steps ({revision}): name "
                f"the revision itself; see `invoke history {flags}`"
            ) from None
        raise revision_error(exc, flags) from exc


def one_way(to: str, *, up: bool, flags: str) -> None:
    """Refuse steps from the database's revision that go the other way (``migrate --to=-1``,
    ``rollback --to=+1``): Alembic finds they "didn't produce" their migrations, which read
    as if there were no revisions there."""
    if up and _BACK.fullmatch(to):
        raise RevisionError(
            f"--to={to} goes back from the database's revision, and migrate only goes "
            f"forward: `invoke rollback {flags} --to={to}` goes back"
        )
    if not up and _FORWARD.fullmatch(to):
        raise RevisionError(
            f"--to={to} goes forward from the database's revision, and rollback only goes "
            f"back: `invoke migrate {flags} --to={to}` goes forward"
        )


def malformed(revision: str) -> str | None:
    """What is wrong with the shape of a revision as given (an empty side of ``@``, which
    fails inside Alembic), or None."""
    branch, at, rest = revision.partition("@")
    if at and not (branch and rest):
        return (
            f"{revision!r} is no revision: write BRANCH@REV, with a branch label (or a "
            "revision) before the @ and a revision after it"
        )
    return None


def too_short(script: ScriptDirectory, revision: str) -> str | None:
    """A revision named by a prefix of its id shorter than 4 characters, or None. Alembic
    takes any prefix that one revision has: ``--to=1`` (meant as ``--steps=1``) would
    roll back to whichever revision's id starts with 1, and ``--to=f3a`` comes to mean
    another revision, or none, as revisions are added. (head, heads, base: 4 or more.)"""
    parts = (_STEPS.sub("", part) for part in revision.split("@"))
    short = [given for given in parts if 0 < len(given) < SHORTEST_PREFIX]
    if not short:
        return None
    names = set()  # a whole id, or a branch label, may be short: "001", "v1"
    for rev in script.walk_revisions():
        names.add(rev.revision)
        names.update(rev.branch_labels)
    unknown = [given for given in short if given not in names]
    if not unknown:
        return None
    return (
        f"{unknown[0]!r} is no revision id or branch label, and too short to be a prefix of "
        f"one: give at least {SHORTEST_PREFIX} characters of a revision's id"
    )


def revision_error(exc: CommandError, flags: str) -> RevisionError:
    """Alembic's message, with the precise cause it sometimes hides, and where to look."""
    cause = exc.__cause__ if isinstance(exc.__cause__, ResolutionError) else exc
    relative = _RELATIVE.search(str(cause))
    if relative:
        steps, sign = int(relative.group(2)), relative.group(1)[0]
        where = "after" if sign == "+" else "before"
        fewer = "no revision comes" if steps == 1 else f"fewer than {steps} revisions come"
        return RevisionError(
            f"{fewer} {where} the database's current one, so {relative.group(1)} leads "
            f"nowhere; see `invoke status {flags}`"
        )
    if str(cause) == "Walked too far":  # a downgrade target past the ends of the history
        return RevisionError(f"{PAST_THE_ENDS}; see `invoke history {flags}`")
    named = _UNKNOWN.fullmatch(str(cause))
    if named and named.group(1).lower() in ("head", "heads", "base"):  # git's HEAD, say
        return RevisionError(f"{cause}: write {named.group(1).lower()}, in lower case")
    return RevisionError(f"{cause}; see `invoke history {flags}`")


_UNKNOWN = re.compile(r"No such revision or branch '(.*)'")


PAST_THE_ENDS = "that leads past the ends of the revision history, where there is no revision"
