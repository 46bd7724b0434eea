"""What a failed run says: where the database is now (read back on a new connection),
which of the run's revisions it kept, and what to do."""

from __future__ import annotations

import re
from errno import EHOSTUNREACH, ENETUNREACH, ETIMEDOUT
from pathlib import Path
from typing import TYPE_CHECKING

from alembic.ddl.base import ColumnComment
from alembic.runtime.migration import RevisionStep
from alembic.script import ScriptDirectory
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    ObjectNotExecutableError,
    PendingRollbackError,
    ResourceClosedError,
    UnsupportedCompilationError,
)
from sqlalchemy.types import TypeEngine

from db.autogen import missing_type
from db.backups import repair
from db.errors import (
    DbError,
    Halted,
    Interrupted,
    LockLost,
    LockTimeout,
    MigrationFailed,
    cause_of,
    first_line,
    resolve_hint,
    unfinished_run,
)
from db.offline import COLON
from db.progress import Progress, Step, message_of
from db.revision_files import MODELS, models_imported
from db.versions import applied_revisions, current_heads

if TYPE_CHECKING:
    from db.runner import Run

_FOLLOW_UPS = (PendingRollbackError, ResourceClosedError, InterfaceError)
_CONNECTION_LOST = "the connection, and with it the migration lock,"
_SEVERAL_STATEMENTS = (
    "cannot insert multiple commands into a prepared statement",
    "You can only execute one statement at a time",
)
_MODELS_HINT = (
    f"the revision imports {MODELS}, which describe the tables as the newest revision leaves "
    "them, not as this one finds them: give it its own `sa.table(...)` of the columns it needs"
)
_IN_A_BLOCK = "a revision runs such a statement in `with op.get_context().autocommit_block():`"


def what_to_do(exc: DBAPIError, flags: str, role: str | None) -> str:
    """What to do when a run failed before its first revision, or a read failed: for want
    of a privilege (SQLSTATE 42501), on a read-only server (25006), with no schema to create
    in (3F000), on a corrupt or locked SQLite file; or "". ``flags``: the task's --env (and
    --only)."""
    state, said = getattr(exc.orig, "sqlstate", None), first_line(exc)
    if state == "25006":  # read_only_sql_transaction
        return _READ_ONLY
    if state == "3F000":  # invalid_schema_name: no schema on the search_path exists
        return (
            "no schema on the role's search_path exists (public was dropped?): create it "
            "(CREATE SCHEMA public), or name one with SCHEMA in the env file"
        )
    if "file is not a database" in said or "database disk image is malformed" in said:
        return f"the SQLite file is corrupt: {repair(flags)}"
    if state == "55P03":  # lock_not_available: a read that LOCK_TIMEOUT ended
        return (
            "another session holds a lock on its tables (a long transaction, a DBA's LOCK "
            "TABLE?): run it again once that session is done, or raise LOCK_TIMEOUT"
        )
    if "database is locked" in said:  # past the busy wait, CONNECT_TIMEOUT, for a writer
        return (
            "another connection keeps the SQLite file locked (the app writing a large "
            "transaction, or a migration?): run it again when it is done"
        )
    if state != "42501":
        return ""
    role = role or "the migrating role"
    if " for schema " not in said:
        return f"grant {role} that privilege, or migrate as the database's owner"
    schema = said.rsplit(" ", 1)[-1]
    return (
        f"the version table and the audit trail need CREATE on it: GRANT CREATE ON SCHEMA "
        f"{schema} TO {role} (PostgreSQL 15 and later give it in public only to the "
        "database's owner), or migrate as the owner"
    )


_READ_ONLY = (
    "the server takes only reads there: it is a standby (point the URL at the primary), or "
    "default_transaction_read_only is on for the database or the role (ALTER ... SET "
    "default_transaction_read_only = off)"
)


def failure(exc: BaseException, progress: Progress, run: Run, script: ScriptDirectory) -> DbError:
    """What happened, and where the database is now, read back on a new connection."""
    step, heads = progress.running, None
    try:
        heads = read_heads(run)
    except Exception as read_error:
        at = f"its revision could not be read back ({describe(read_error)})"
        ran = step is not None or progress.applied or progress.lost()
        if not ran and run.stop.requested:  # a signal while it connected: that is all it did
            text = NONE_RUN
        else:
            text = "; ".join(
                [at, *_running(step, progress, run, None)] + ([] if ran else [NONE_RUN])
            )
    else:
        text = "; ".join(_outcome(heads, step, progress, run, applied_revisions(script, heads)))
    error = _failure(first_error(exc), progress, run, text, at_base=heads == ())
    error.at = heads
    return error


NONE_RUN = "no revision was run"


def _failure(
    exc: BaseException, progress: Progress, run: Run, text: str, at_base: bool = False
) -> DbError:
    """The error for what stopped the run; ``text`` says where the database is now, and
    ``at_base`` whether that is no revision at all."""
    step = progress.running
    if run.stop.signum is not None:
        return Interrupted(f"interrupted: {text}", run.stop.signum)
    if isinstance(exc, Halted):
        return Halted(f"{exc}: {text}")
    if isinstance(exc, LockTimeout):  # SQLite's readers kept the run from committing
        return LockTimeout(f"{exc}\n{text}; retry when they are done, or raise --lock-wait")
    cause = _hinted(exc)
    if step is None:
        return MigrationFailed(f"the run failed after its last revision: {cause}\n{text}")
    doing = f"{'upgrade' if step.is_upgrade else 'downgrade'} of revision {step.revision.revision}"
    doing += f" ({message_of(step.revision)})"
    if isinstance(exc, LockLost) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        lost = "the migration lock" if isinstance(exc, LockLost) else _CONNECTION_LOST
        cause = _went_silent(exc, run) or cause
        return LockLost(f"lost {lost} during the {doing}: {cause}\n{text}; run the task again")
    if at_base and "already exists" in cause:  # a database made by migrations is not one
        adopt = f"`invoke stamp {run.flags} REV`"
        text += f"; a database made without migrations is adopted with {adopt}"
    outside = not_the_revision(exc, run)
    if outside is not None:  # nothing to fix in the revision: a limit or the disk ended it
        said, fix = outside
        return MigrationFailed(f"{doing} failed: {said}\n{text}; {fix}")
    if isinstance(exc, NotImplementedError) and not step.is_upgrade:  # undone on purpose
        return MigrationFailed(
            f"{doing} failed: {cause}\n{text}; {step.revision.revision} cannot be undone (its "
            "downgrade says so): to go back before it, restore a backup taken before it ran"
        )
    if isinstance(exc, DBAPIError) and _imports_models(step):  # a column the models have
        cause += f" ({_MODELS_HINT})"
    elif _unseen(exc, run):
        cause += f" ({_SHARED_HINT})"
    return MigrationFailed(f"{doing} failed: {cause}\n{text}; fix it and run the task again")


# type, function or operator class does not exist (42704, 42883)
_UNDEFINED = ("42704", "42883")
_SHARED_HINT = (
    "with SCHEMA, the search path holds that schema alone: if an extension installed in "
    "another schema (public?) has it, name that schema in SHARED_SCHEMAS in the env file"
)


def _unseen(exc: BaseException, run: Run) -> bool:
    """What an extension has may be missing only from the search path that SCHEMA made."""
    state = getattr(cause_of(exc), "sqlstate", None)
    return state in _UNDEFINED and run.schema is not None and not run.shared_schemas


def _imports_models(step: RevisionStep) -> bool:
    return bool(step.revision.path) and models_imported(Path(step.revision.path)) is not None


def _went_silent(exc: BaseException, run: Run) -> str | None:
    """Why the connection was lost, if the network went silent for NETWORK_TIMEOUT: the
    socket's keepalive or TCP_USER_TIMEOUT gave up (ETIMEDOUT, or the host's unreachable
    that the kernel saw meanwhile), where the driver says only that the connection closed."""
    cause: BaseException | None = cause_of(exc)
    while cause is not None and not _silent(cause):
        cause = cause.__cause__
    if cause is None:
        return None
    return (
        f"the server stopped answering for {run.network_timeout:g}s (NETWORK_TIMEOUT): "
        "the network or the server's host is down"
    )


def _silent(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (ETIMEDOUT, EHOSTUNREACH, ENETUNREACH)


def _hinted(exc: BaseException) -> str:
    """A revision's failure in the driver's words, with the way out where they hide it."""
    cause = describe(exc)
    if getattr(cause_of(exc), "sqlstate", None) == "25001":  # cannot run inside a transaction
        return f"{cause} ({_IN_A_BLOCK})"
    if any(said in cause for said in _SEVERAL_STATEMENTS):  # asyncpg's words, and SQLite's
        return f"{cause} (give each statement its own op.execute())"
    if "A value is required for bind parameter" in cause:  # a colon in op.execute's SQL
        return f"{cause} ({COLON})"
    if isinstance(exc, ObjectNotExecutableError) and isinstance(exc.target, str):
        return f"{cause} (SQLAlchemy 2 executes no plain string: wrap it in `sa.text(...)`)"
    in_place = _in_place(str(getattr(exc, "statement", None) or ""))
    if "syntax error" in cause and in_place is not None:
        return f"{cause} ({in_place})"
    unmade = _unmade(exc)
    if unmade is not None and unmade.element_type is ColumnComment:  # op.alter_column's
        return _batched("keep a comment", "alter_column(..., comment=...)")
    if unmade is not None and isinstance(unmade.element_type, TypeEngine):
        name, lacks, way = missing_type(unmade)  # SQLAlchemy's words name its compiler
        where = _IN_TABLE.match(str(exc))
        column = f"column {where[1]}.{where[2]}" if where else "a column"
        return f"{column} is of type {name}, which {lacks} does not have: {way} (in the models too)"
    return cause


# what Alembic's operations outside a batch block ask of SQLite, which it cannot do
_ALTER_COLUMN = re.compile(r"\s*ALTER TABLE (\S+) ALTER COLUMN", re.IGNORECASE)
_COMMENT = re.compile(r"\s*COMMENT ON (TABLE|COLUMN) ([^\s.]+)", re.IGNORECASE)


def _in_place(statement: str) -> str | None:
    """Why SQLite refused an operation written outside a batch block, and the batch form."""
    altered, commented = _ALTER_COLUMN.match(statement), _COMMENT.match(statement)
    if altered is not None:
        return _batched("alter a column in place", "alter_column(...)", altered[1])
    if commented is not None and commented[1].upper() == "COLUMN":
        return _batched("keep a comment", "alter_column(..., comment=...)", commented[2])
    if commented is not None:
        return _batched("keep a comment", "create_table_comment(...)", commented[2])
    return None


def _batched(cannot: str, call: str, table: str = "...") -> str:
    named = table if table == "..." else f'"{table.strip(QUOTE)}"'
    return (
        f"SQLite cannot {cannot}: write it in a batch block, as drafts are (on SQLite it "
        f"copies the table): with op.batch_alter_table({named}) as batch_op: batch_op.{call}"
    )


QUOTE = '"'


_IN_TABLE = re.compile(r"\(in table '([^']+)', column '([^']+)'\)")  # SQLAlchemy's CREATE TABLE


def _unmade(exc: BaseException | None) -> UnsupportedCompilationError | None:
    """What the dialect cannot write (a column type, a comment), under what says where."""
    while exc is not None and not isinstance(exc, UnsupportedCompilationError):
        exc = exc.__cause__
    return exc


def not_the_revision(exc: BaseException, run: Run) -> tuple[str, str] | None:
    """A statement the session's LOCK_TIMEOUT or STATEMENT_TIMEOUT ended, a full disk, or
    a network gone silent: what happened, and what to do (the revision itself may be fine)."""
    state, said = getattr(cause_of(exc), "sqlstate", None), first_line(exc)
    settings = run.session_settings
    silent = _went_silent(exc, run)
    if silent is not None:
        return (silent, "run the task again once the server answers")
    if state == "53100" or "database or disk is full" in said:  # PostgreSQL's, SQLite's
        return (f"the disk is full ({describe(exc)})", "free some space and run the task again")
    if state == "55P03":  # lock_not_available
        return (
            f"it waited {settings.get('lock_timeout')} (LOCK_TIMEOUT) for a lock that another "
            f"session holds ({said})",
            "run the task again once that session (a long transaction?) is done, or raise "
            "LOCK_TIMEOUT",
        )
    if state == "57014" and "statement timeout" in said:
        return (
            f"a statement ran longer than {settings.get('statement_timeout')} "
            f"(STATEMENT_TIMEOUT) ({said})",
            "raise STATEMENT_TIMEOUT in the env file, or make the revision do less at once",
        )
    return None


def _outcome(
    heads: tuple[str, ...],
    step: RevisionStep | None,
    progress: Progress,
    run: Run,
    applied: set[str],
) -> list[str]:
    """Where the database is, which of this run's steps it kept, and which it lost."""
    running = step.revision.revision if step is not None else None
    done = [s for s in progress.applied + progress.lost() if s.revision != running]
    kept = [_named(s) for s in done if _kept(s, applied)]
    undone = [_named(s) for s in done if not _kept(s, applied)]
    parts = [f"the database is at {', '.join(heads) or 'base'}"]
    if kept:
        parts[0] += f"; this run kept {', '.join(kept)}"
    elif not done and step is None:
        parts[0] += f"; {NONE_RUN}"
    if undone:
        parts.append(f"{', '.join(undone)} of this run did not commit either")
    return parts + _running(step, progress, run, applied)


def _running(
    step: RevisionStep | None, progress: Progress, run: Run, applied: set[str] | None
) -> list[str]:
    """What became of the revision that was running (unknown if ``applied`` is None)."""
    if step is None:
        return []
    rev = step.revision.revision
    if progress.in_block:
        return [
            f"{unfinished_run(rev, step.is_upgrade)} stopped in its non-transactional part "
            f"(last statement started: {progress.last_statement or 'none'}), so part of it "
            f"may be in the database: check, then run "
            f"{resolve_hint(run.flags, rev, step.is_upgrade)}"
        ]
    what = rev if step.is_upgrade else f"the downgrade of {rev}"
    if applied is None and progress.committing:  # the answer to its COMMIT never came
        return [
            f"whether {what} committed is not known: `invoke status {run.flags}` tells, once "
            "the server answers"
        ]
    if applied is None:
        return [f"{what} did not commit"]
    committed = _kept(Step(rev, "", _direction(step), 0), applied)
    if committed and progress.in_code:  # it failed in its own code, before its commit
        return [
            f"{what} was rolled back, though the database now has it: something else did it "
            "since (another run, once this one lost its lock?)"
        ]
    return [f"{what} was {'committed' if committed else 'rolled back'}"]


def first_error(exc: BaseException) -> BaseException:
    """The error that started a failure, not one raised while cleaning up after it (an
    unusable transaction, a closed connection)."""
    while isinstance(exc, _FOLLOW_UPS) and isinstance(exc.__context__, Exception):
        exc = exc.__context__
    return exc


def read_heads(run: Run) -> tuple[str, ...]:
    """The revision(s) in the version table, on a new connection, after a failure."""
    # a server that is restarting answers again within seconds; a signal wants out at once
    if run.stop.requested:
        timeout = min(run.connect_timeout, 2)
        return current_heads(run.url, timeout, run.schema, network_timeout=run.network_timeout)
    return current_heads(
        run.url, run.connect_timeout, run.schema, wait=5, network_timeout=run.network_timeout
    )


def _named(step: Step) -> str:
    """A step as the messages name it: its revision, or the downgrade of it (a rollback that
    "kept p02" would read as p02 still applied)."""
    return step.revision if step.direction == "up" else f"the downgrade of {step.revision}"


def _kept(step: Step, applied: set[str]) -> bool:
    """Whether a step's change is in the database whose applied revisions are ``applied``."""
    return (step.revision in applied) == (step.direction == "up")


def _direction(step: RevisionStep) -> str:
    return "up" if step.is_upgrade else "down"


def describe(exc: BaseException) -> str:
    """The first line of a failure, as the database or the revision said it, named by its
    class (the driver's own where SQLAlchemy's is the bare ``Error``: DeadlockDetectedError)."""
    cause = cause_of(exc)
    if type(cause).__name__ == "Error" and cause.__cause__ is not None:
        cause = cause.__cause__
    name, text = type(cause).__name__, first_line(exc)
    if isinstance(cause, DbError):  # the library's own words need no class name
        return text
    return name if text == name else f"{name}: {text}"
