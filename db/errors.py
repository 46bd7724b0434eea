"""The one error type the library raises, its few named kinds, and their exit codes."""

from __future__ import annotations


class DbError(Exception):
    """An expected failure, with a message that says what happened and what to do."""

    exit_code = 1  # a database error: connecting, a revision, or a failing migration


class ConfigError(DbError):
    """An environment is unknown, or its file is missing, unreadable or incomplete."""

    exit_code = 2


class ConnectError(DbError):
    """The database server could not be reached, or it refused the login."""


class RevisionError(DbError):
    """A revision is unknown or ambiguous, or the history is not in a usable state."""


class MigrationFailed(DbError):
    """A revision raised while running; the database stays at the last good revision."""


class LockTimeout(DbError):
    """Another run held the migration lock for longer than we were willing to wait."""

    exit_code = 3


class GuardRefused(DbError):
    """A safety guard said no: a protected environment, a changed file, a mismatched env."""

    exit_code = 4


class CheckFailed(DbError):
    """A check found something to fix: pending revisions, drift, several heads."""

    exit_code = 5
