"""The one error type the library raises, and its few named kinds."""

from __future__ import annotations


class DbError(Exception):
    """An expected failure, with a message that says what happened and what to do."""


class ConfigError(DbError):
    """An environment is unknown, or its file is missing, unreadable or incomplete."""


class ConnectError(DbError):
    """The database server could not be reached, or it refused the login."""


class RevisionError(DbError):
    """A revision is unknown or ambiguous, or the history is not in a usable state."""


class MigrationFailed(DbError):
    """A revision raised while running; the database stays at the last good revision."""
