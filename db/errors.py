"""The one error type the library raises, its few named kinds, and their exit codes."""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.exc import DBAPIError


def cause_of(exc: BaseException) -> BaseException:
    """What the driver or the revision raised, under SQLAlchemy's wrapper if there is one."""
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def first_line(exc: BaseException) -> str:
    """The first line of a failure's message (the rest is the driver's detail), or its type.
    SQLAlchemy 2.0 starts an asyncpg error's message with its class, which is left out."""
    lines = str(cause_of(exc)).strip().splitlines()
    return _DRIVER_CLASS.sub("", lines[0]) if lines else type(cause_of(exc)).__name__


_DRIVER_CLASS = re.compile(r"^<class '[\w.]+'>: ")  # "<class 'asyncpg.exceptions.X'>: "


class DbError(Exception):
    """An expected failure, with a message that says what happened and what to do."""

    exit_code = 1  # a database error: connecting, a revision, or a failing migration
    at: tuple[str, ...] | None = None  # the revision(s) read back after a failed run, if read


@contextmanager
def refused_at(current: tuple[str, ...]) -> Iterator[None]:
    """A DbError raised inside, before anything changed (a guard, a plan refused), says
    that the database is still at ``current``: a fleet counts the target there."""
    try:
        yield
    except DbError as exc:
        if exc.at is None:
            exc.at = current
        raise


class ConfigError(DbError):
    """An environment is unknown, or its file is missing, unreadable or incomplete."""

    exit_code = 2


class UsageError(ConfigError):
    """A task was given flags that do not go together, or a value it cannot use."""


class BrokenRevisions(ConfigError):
    """The revision files cannot make a history: a duplicate id, a missing parent, a bad file."""


class BrokenModels(ConfigError):
    """db/models.py cannot be imported (makemigration, check and seed need it)."""

    @classmethod
    def of(cls, exc: Exception) -> BrokenModels:
        """The error for ``exc``, raised importing the models, naming the line it came from."""
        frames = traceback.extract_tb(exc.__traceback__)
        lines = [f.lineno for f in frames if Path(f.filename).parts[-2:] == ("db", "models.py")]
        line = exc.lineno if isinstance(exc, SyntaxError) else (lines or [None])[-1]
        where = f", line {line}" if line else ""
        said = exc.msg if isinstance(exc, SyntaxError) else first_line(exc)  # no "(file, line)"
        return cls(
            f"db/models.py{where} cannot be imported: {type(exc).__name__}: {said}; "
            "fix it (makemigration, check and seed use the models)"
        )

    @classmethod
    def unwritable(cls, exc: Exception) -> BrokenModels:
        """The error for an expression of the models that SQLAlchemy cannot write as SQL
        to compare it, or to draft it (``func.to_tsvector("english", ...)``'s REGCONFIG)."""
        return cls(
            f"db/models.py has an expression that cannot be written as SQL here "
            f"({type(exc).__name__}: {first_line(exc)}): give it as sa.text(...) in the "
            "models, e.g. an index on sa.text(\"to_tsvector('english', name)\")"
        )


class ConnectError(DbError):
    """The database server could not be reached, or it refused the login."""

    busy = False  # the server had no free connection (too many clients): worth a later try


class RevisionError(DbError):
    """A revision is unknown or ambiguous, or the history is not in a usable state."""


class NotApplied(RevisionError):
    """The revision a task records something of is not applied to the database."""


class MigrationFailed(DbError):
    """A revision raised while running; the database stays at the last good revision."""


class OwnTransaction(MigrationFailed):
    """A revision ran COMMIT, ROLLBACK or BEGIN itself (or called its connection's
    ``commit()`` or ``rollback()``, or its transaction's), which would end its transaction
    part way; refused before it ran (a rollback, once the revision's code has), so the
    revision rolls back whole."""


class LockTimeout(DbError):
    """Another run held the migration lock for longer than we were willing to wait."""

    exit_code = 3


class LockLost(DbError):
    """The run lost its connection, and with it the migration lock, part way through."""

    exit_code = 3


class Interrupted(DbError):
    """SIGINT or SIGTERM stopped the run between revisions; exits 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Halted(DbError):
    """A fleet stopped this target before its next revision because another target failed;
    the revision that was running finished first."""

    exit_code = 6


class GuardRefused(DbError):
    """A safety guard said no: a protected environment, a changed file, a mismatched env."""

    exit_code = 4


class Unresolved(GuardRefused):
    """A non-transactional revision started and never finished: someone must say how it ended."""


def unfinished_run(revision: str, upgrade: bool) -> str:
    """The run of a non-transactional revision that did not finish, in words."""
    return revision if upgrade else f"the downgrade of {revision}"


def resolve_hint(flags: str, revision: str, upgrade: bool) -> str:
    """The ``invoke resolve`` that records how an unfinished run ended. For a downgrade,
    --applied is the one that leaves the revision not applied: said, not left to guess."""
    command = f"`invoke resolve {flags} {revision} --applied`"
    if upgrade:
        return f"{command} (or --rolled-back)"
    return f"{command} if all of its downgrade is in the database (or --rolled-back if none is)"


class CheckFailed(DbError):
    """A check found something to fix: pending revisions, drift, several heads."""

    exit_code = 5


class FleetFailed(DbError):
    """Some targets of a fleet failed (or were skipped after a failure); the rest got there."""

    exit_code = 6
