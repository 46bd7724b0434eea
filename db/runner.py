"""The one place that builds Alembic's Config, and runs env.py with clear errors.

A run's state reaches env.py as one typed :class:`Run` in ``config.attributes["run"]``.
After a run that changed something fails, the database's revision is read back on a new
connection, so the message says where the database really is.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    PendingRollbackError,
    ResourceClosedError,
)

from db import revision_files
from db.engines import with_connection
from db.environments import CONNECT_TIMEOUT, ENV_DIR, Environment
from db.errors import (
    BrokenRevisions,
    ConfigError,
    DbError,
    Halted,
    Interrupted,
    LockLost,
    MigrationFailed,
    RevisionError,
    cause_of,
    first_line,
)
from db.locks import LOCK_WAIT
from db.progress import Progress, Revision, Step
from db.stop import Stop
from db.urls import mask

VERSION_TABLE = "alembic_version"
VERSION_ID_MAX = 32  # characters: Alembic's alembic_version.version_num is a VARCHAR(32)
_RELATIVE = re.compile(r"Relative revision ([+-]\d+) didn't produce (\d+) migrations")
_RELATIVE_ID = re.compile(r"(?:.+@)?\w*[+-]\d+")  # +2, -1, ae1027a6acf+2, branch@-1
_FOLLOW_UPS = (PendingRollbackError, ResourceClosedError, InterfaceError)
_CONNECTION_LOST = "the connection, and with it the migration lock,"
# what a revision's code may raise: SystemExit too (a helper that calls sys.exit), which
# would end the task, or a whole fleet, without a word on where the database is; never
# KeyboardInterrupt (a second Ctrl-C ends the task at once)
REVISION_ERRORS = (Exception, SystemExit)
__all__ = ["Progress", "Run", "RunOptions", "Step", "Stop", "make_config", "run_env"]


@dataclass
class RunOptions:
    """What the caller asks of one run, beyond the environment's own settings."""

    lock_wait: float = LOCK_WAIT  # seconds to wait for another run's migration lock
    allow_env_mismatch: bool = False
    backup: bool = True  # back the database up before a change, as the env file says
    wait: float | None = None  # seconds to retry the first connection; None: CONNECT_WAIT
    on_plan: Callable[[tuple[Revision, ...]], None] | None = None  # may refuse by raising
    on_start: Callable[[RevisionStep], None] | None = None
    on_step: Callable[[Step], None] | None = None
    on_note: Callable[[str], None] | None = None
    # a changing run: called with the revision(s) read before the lock; False ends the run
    # there, without the lock (a fleet's target with nothing to do)
    before_lock: Callable[[tuple[str, ...]], bool] | None = None
    stop: Stop = field(default_factory=Stop)

    def note(self, text: str | None) -> None:
        if self.on_note is not None and text:
            self.on_note(text)


@dataclass
class Run:
    """Everything env.py needs for one run: ``config.attributes["run"]``."""

    environment: str
    url: URL
    flags: str = ""  # --env=NAME (and --only=TARGET), for the commands messages suggest
    schema: str | None = None  # SCHEMA: where the tables, version table and audit trail live
    env_file: str = ""  # where the URL came from, for messages
    connect_timeout: float = CONNECT_TIMEOUT
    wait: float = 0.0
    lock: bool = False  # take the migration lock: only runs that change the database
    creates: bool = True  # may make a SQLite file not there yet (plain Alembic: it may)
    lock_wait: float = LOCK_WAIT
    session_settings: dict[str, str] = field(default_factory=dict)
    note: Callable[[str], None] = field(default=lambda _text: None)
    models: bool = False  # import db.models: only autogenerate and check compare against them
    stop: Stop = field(default_factory=Stop)
    before_lock: Callable[[tuple[str, ...]], bool] | None = None  # see RunOptions
    progress: Progress | None = None  # set by run_env for runs that apply steps

    @property
    def lock_name(self) -> str:
        """What the migration lock is keyed by, with the database: the version table."""
        return f"{self.schema}.{VERSION_TABLE}" if self.schema else VERSION_TABLE


def make_config(
    env: Environment,
    options: RunOptions | None = None,
    *,
    offline: bool = False,
    lock: bool = False,
    models: bool = False,
    output: io.StringIO | None = None,
    creates: bool | None = None,
) -> Config:
    """Alembic's Config for ``env``; the URL goes in the Run, never through ConfigParser.

    ``offline`` needs no secrets: only the dialect matters for printing SQL. ``creates``:
    whether the run may make a SQLite file not there yet (default: if it takes the lock).
    """
    options = options or RunOptions()
    quiet = Namespace(quiet=True)  # progress is the caller's to report
    config = Config(str(env.root / "alembic.ini"), output_buffer=output, cmd_opts=quiet)
    url = env.url(need_secrets=not offline)
    config.attributes["run"] = Run(
        environment=env.name,
        url=url,
        flags=env.flags,
        schema=env.schema,
        env_file=f"{ENV_DIR}/{env.name}.env",
        connect_timeout=env.connect_timeout,
        wait=options.wait if options.wait is not None else env.number("CONNECT_WAIT", 0),
        lock=lock,
        creates=lock if creates is None else creates,  # a run that only reads makes none
        lock_wait=options.lock_wait,
        session_settings=session_settings(env),
        note=options.note,
        models=models,
        stop=options.stop,
        before_lock=options.before_lock,
    )
    return config


def run_of(config: Config) -> Run:
    run: Run = config.attributes["run"]
    return run


def session_settings(env: Environment) -> dict[str, str]:
    """PostgreSQL settings for migration sessions, so a migration fails fast, not stalls."""
    return {
        "application_name": env.get("APPLICATION_NAME") or "migrations",
        "lock_timeout": env.duration("LOCK_TIMEOUT", "5s"),
        "statement_timeout": env.duration("STATEMENT_TIMEOUT", "15min"),
        # end a killed run's query within a second, instead of when it finishes
        "client_connection_check_interval": env.duration("CLIENT_CHECK_INTERVAL", "1s"),
        # a server's idle timeouts must not end a migration session between revisions
        "idle_session_timeout": "0",
        "idle_in_transaction_session_timeout": "0",
    }


_LOADED: dict[tuple[object, ...], ScriptDirectory] = {}


def load_scripts(config: Config) -> ScriptDirectory:
    """The revision files, all loaded now, so a broken one is reported clearly up front.

    A process that runs many targets (a fleet's worker) reads the files once: they are
    read again only when one of them is added, removed or changed.
    """
    versions = _versions(config)
    files = sorted(versions.glob("*.py")) if versions.is_dir() else []
    key = (str(versions), *((f.name, *_stamp(f)) for f in files))
    if key not in _LOADED:
        _LOADED.clear()  # one tree per process: a changed file replaces the old copy
        _LOADED[key] = _checked(_script_directory(config), config)
    return _LOADED[key]


def _script_directory(config: Config) -> ScriptDirectory:
    """Alembic's view of the revision files, from alembic.ini; a missing or broken ini
    is a clear error, not Alembic's "No 'script_location' key found"."""
    try:
        return ScriptDirectory.from_config(config)
    except CommandError as exc:
        ini = config.config_file_name or "alembic.ini"
        missing = "is missing" if not Path(ini).is_file() else "is broken"
        said = str(exc).rstrip(".")
        raise ConfigError(f"{ini} {missing} ({said}): restore it from the repository") from None


_FOLDERS: dict[tuple[object, ...], Path] = {}


def _versions(config: Config) -> Path:
    """The folder of revision files that alembic.ini names, read again only when the file
    changes (parsing it costs more than the rest of a cached ``load_scripts``)."""
    ini = Path(config.config_file_name or "")
    if not ini.is_file():
        return Path(_script_directory(config).versions)
    key = (str(ini), *_stamp(ini))
    if key not in _FOLDERS:
        _FOLDERS.clear()
        _FOLDERS[key] = Path(_script_directory(config).versions)
    return _FOLDERS[key]


@functools.cache
def configure_logging(ini: str) -> None:
    """Logging as alembic.ini sets it up, once per process: a fleet's worker enters env.py
    for target after target."""
    fileConfig(ini, disable_existing_loggers=False)


def _stamp(path: Path) -> tuple[int, int]:
    found = path.stat()
    return found.st_mtime_ns, found.st_size


def _checked(script: ScriptDirectory, config: Config) -> ScriptDirectory:
    versions, root = Path(script.versions), Path(config.config_file_name or ".").parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            script.revision_map.heads  # noqa: B018 (loads every file)
        except REVISION_ERRORS as exc:
            where = revision_files.problem(versions, root)
            if where is None:
                where = revision_files.culprit(exc, versions, root) or "the revision files"
                where += f" cannot be loaded: {describe(exc)}"
            raise BrokenRevisions(where) from exc
    nameless = any(not rev.revision for rev in script.walk_revisions())  # Alembic takes ""
    if caught or nameless:
        said = caught[0].message if caught else "a file's `revision =` is empty"
        raise BrokenRevisions(
            revision_files.problem(versions, root) or f"the revision files: {said}"
        )
    for rev in script.walk_revisions():
        _utf8(rev, root)
        if len(rev.revision) > VERSION_ID_MAX:
            file = Path(rev.path).relative_to(root) if rev.path else rev.revision
            raise BrokenRevisions(
                f"{file}: revision id {rev.revision!r} is {len(rev.revision)} characters, and "
                f"the version table holds {VERSION_ID_MAX} (PostgreSQL would refuse it after "
                "the revision ran; SQLite would not, so dev would pass): shorten it, in "
                "`revision =`, in its file name and in the down_revision that names it"
            )
    return script


def _utf8(rev: Script, root: Path) -> None:
    """A revision file is UTF-8 text (Python may load one that is not, if the odd bytes
    are in a comment, but its checksum and plan would then fail to read it)."""
    if not rev.path:
        return
    try:
        Path(rev.path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BrokenRevisions(
            f"{Path(rev.path).relative_to(root)} is not UTF-8 text (byte {exc.start}): save "
            "it as UTF-8"
        ) from None


def run_env(
    config: Config,
    script: ScriptDirectory,
    fn: Callable[..., Any],
    progress: Progress | None = None,
    **kw: Any,
) -> None:
    """Run env.py with ``fn`` deciding the steps; turn expected failures into DbError."""
    run = run_of(config)
    run.progress = progress
    try:
        with EnvironmentContext(config, script, fn=fn, **kw):
            script.run_env()
    except REVISION_ERRORS as exc:
        ran = progress is not None and (progress.running is not None or progress.applied)
        stopped = run.stop.requested or isinstance(exc, Halted)
        if progress is not None and (ran or stopped):  # say where the database is
            if not kw.get("as_sql"):
                raise failure(exc, progress, run, script) from exc
            if progress.running is not None and not isinstance(exc, DbError):
                rev = progress.running.revision.revision
                raise MigrationFailed(
                    f"revision {rev} cannot be rendered as SQL offline: {describe(exc)}"
                ) from exc
        if isinstance(exc, DbError):
            raise
        if isinstance(exc, CommandError):
            raise revision_error(exc, run.flags) from exc
        if isinstance(exc, DBAPIError):
            text = f"database error on {mask(run.url)}: {describe(exc)}"
            advice = what_to_do(exc, run.flags, run.url.username)
            if progress is not None:  # a changing run, stopped before its first revision
                text += f"\n{_NONE_RUN}" + (f"; {advice}" if advice else "")
            elif advice:
                text += f"\n{advice}"
            raise DbError(text) from exc
        raise


def what_to_do(exc: DBAPIError, flags: str, role: str | None) -> str:
    """What to do when a run failed before its first revision, or a read failed: for want
    of a privilege (SQLSTATE 42501), on a read-only server (25006), with no schema to create
    in (3F000), on a corrupt SQLite file; or "". ``flags``: the task's --env (and --only)."""
    state, said = getattr(exc.orig, "sqlstate", None), first_line(exc)
    if state == "25006":  # read_only_sql_transaction
        return _READ_ONLY
    if state == "3F000":  # invalid_schema_name: no schema on the search_path exists
        return (
            "no schema on the role's search_path exists (public was dropped?): create it "
            "(CREATE SCHEMA public), or name one with SCHEMA in the env file"
        )
    if "file is not a database" in said or "database disk image is malformed" in said:
        return f"the SQLite file is corrupt: put a good backup back with `invoke restore {flags}`"
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
        text = "; ".join([at, *_running(step, progress, run, None)] + ([] if ran else [_NONE_RUN]))
    else:
        text = "; ".join(_outcome(heads, step, progress, run, _applied(script, heads)))
    error = _failure(first_error(exc), progress, run, text)
    error.at = heads
    return error


_NONE_RUN = "no revision was run"


def _failure(exc: BaseException, progress: Progress, run: Run, text: str) -> DbError:
    """The error for what stopped the run; ``text`` says where the database is now."""
    step = progress.running
    if run.stop.signum is not None:
        return Interrupted(f"interrupted: {text}", run.stop.signum)
    if isinstance(exc, Halted):
        return Halted(f"{exc}: {text}")
    cause = describe(exc)
    if step is None:
        return MigrationFailed(f"the run failed after its last revision: {cause}\n{text}")
    doing = f"{'upgrade' if step.is_upgrade else 'downgrade'} of revision {step.revision.revision}"
    doing += f" ({step.revision.doc})"
    if isinstance(exc, LockLost) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        lost = "the migration lock" if isinstance(exc, LockLost) else _CONNECTION_LOST
        return LockLost(f"lost {lost} during the {doing}: {cause}\n{text}; run the task again")
    if not progress.applied and "already exists" in cause:
        adopt = f"`invoke stamp {run.flags} REV`"
        text += f"; a database made without migrations is adopted with {adopt}"
    outside = not_the_revision(exc, run)
    if outside is not None:  # nothing to fix in the revision: a limit or the disk ended it
        said, fix = outside
        return MigrationFailed(f"{doing} failed: {said}\n{text}; {fix}")
    return MigrationFailed(f"{doing} failed: {cause}\n{text}; fix it and run the task again")


def not_the_revision(exc: BaseException, run: Run) -> tuple[str, str] | None:
    """A statement the session's LOCK_TIMEOUT or STATEMENT_TIMEOUT ended, or a full disk:
    what happened, and what to do (the revision itself may be fine)."""
    state, said = getattr(cause_of(exc), "sqlstate", None), first_line(exc)
    settings = run.session_settings
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
    kept = [s.revision for s in done if _kept(s, applied)]
    undone = [s.revision for s in done if not _kept(s, applied)]
    parts = [f"the database is at {', '.join(heads) or 'base'}"]
    if kept:
        parts[0] += f"; this run kept {', '.join(kept)}"
    elif not done and step is None:
        parts[0] += f"; {_NONE_RUN}"
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
            f"{rev} stopped in its non-transactional part (last statement started: "
            f"{progress.last_statement or 'none'}), so part of it may be in the database: "
            f"check, then run `invoke resolve {run.flags} {rev} --applied` "
            "(or --rolled-back)"
        ]
    if applied is None:
        return []
    committed = _kept(Step(rev, "", _direction(step), 0), applied)
    what = rev if step.is_upgrade else f"the downgrade of {rev}"
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
        return current_heads(run.url, min(run.connect_timeout, 2), run.schema)
    return current_heads(run.url, run.connect_timeout, run.schema, wait=5)


def current_heads(
    url: URL, connect_timeout: float, schema: str | None = None, wait: float = 0
) -> tuple[str, ...]:
    """The revision(s) in a database's version table, read without env.py or the lock."""

    def read(connection: Connection) -> tuple[str, ...]:
        return version_of(connection, schema)

    return with_connection(url, read, connect_timeout=connect_timeout, wait=wait, schema=schema)


def version_of(connection: Connection, schema: str | None = None) -> tuple[str, ...]:
    """The revision(s) in the version table, read on ``connection``."""
    opts = {"version_table": VERSION_TABLE, "version_table_schema": schema}
    return tuple(MigrationContext.configure(connection, opts=opts).get_current_heads())


def _applied(script: ScriptDirectory, heads: tuple[str, ...]) -> set[str]:
    return {rev.revision for rev in script.revision_map.iterate_revisions(heads, "base")}


def _kept(step: Step, applied: set[str]) -> bool:
    """Whether a step's change is in the database whose applied revisions are ``applied``."""
    return (step.revision in applied) == (step.direction == "up")


def _direction(step: RevisionStep) -> str:
    return "up" if step.is_upgrade else "down"


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


def describe(exc: BaseException) -> str:
    """The first line of a failure, as the database or the revision said it, named by its
    class (the driver's own where SQLAlchemy's is the bare ``Error``: DeadlockDetectedError)."""
    cause = cause_of(exc)
    if type(cause).__name__ == "Error" and cause.__cause__ is not None:
        cause = cause.__cause__
    name, text = type(cause).__name__, first_line(exc)
    return name if text == name else f"{name}: {text}"
