"""Revisions as a user names them (``--to=``, ``stamp REV``): checked against the files,
and Alembic's errors about them said plainly."""

from __future__ import annotations

import re

from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError

from db.errors import RevisionError

_RELATIVE = re.compile(r"Relative revision ([+-]\d+) didn't produce (\d+) migrations")
_RELATIVE_ID = re.compile(r"(?:.+@)?\w*[+-]\d+")  # +2, -1, ae1027a6acf+2, branch@-1
# steps counted from the database's own revision, which go one way only
_BACK, _FORWARD = re.compile(r"(?:[^@]+@)?-\d+"), re.compile(r"(?:[^@]+@)?\+\d+")


def known_revision(script: ScriptDirectory, revision: str, flags: str) -> None:
    """Refuse a revision the files do not have, and a ``BRANCH@REV`` whose branch they do
    not have: Alembic reads ``typo@base`` as base (a rollback of everything), and ``@`` or
    ``REV@`` fail inside it. Steps relative to a database's own revision (``+N``, ``-N``,
    ``REV@-N``) depend on that database, so they are left to its run."""
    problem = malformed(revision)
    if problem is not None:
        raise RevisionError(f"{problem}; see `invoke history {flags}`")
    branch, at, _rest = revision.partition("@")
    try:
        if at:
            script.get_revisions(branch)
        if not _RELATIVE_ID.fullmatch(revision):
            script.get_revisions(revision)
    except CommandError as exc:
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


def revision_error(exc: CommandError, flags: str) -> RevisionError:
    """Alembic's message, with the precise cause it sometimes hides, and where to look."""
    cause = exc.__cause__ if isinstance(exc.__cause__, ResolutionError) else exc
    relative = _RELATIVE.search(str(cause))
    if relative:
        steps, sign = relative.group(2), relative.group(1)[0]
        where = "after" if sign == "+" else "before"
        return RevisionError(
            f"there are not {steps} revision(s) {where} the database's current one, so "
            f"{relative.group(1)} leads nowhere; see `invoke status {flags}`"
        )
    if str(cause) == "Walked too far":  # a downgrade target past the ends of the history
        return RevisionError(f"{PAST_THE_ENDS}; see `invoke history {flags}`")
    return RevisionError(f"{cause}; see `invoke history {flags}`")


PAST_THE_ENDS = "that leads past the ends of the revision history, where there is no revision"
