"""The one place that builds Alembic's Config, and runs env.py with clear errors.

A run's state reaches env.py as one typed :class:`Run` in ``config.attributes["run"]``.
After a run that changed something fails, :mod:`db.failures` reads the database's
revision back on a new connection, so the message says where the database really is.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import sys
import traceback
import warnings
from argparse import Namespace
from collections.abc import Callable, Sequence
from configparser import ConfigParser
from dataclasses import dataclass, field
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import RevisionStep
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import CompileError, DBAPIError

from db import revision_files
from db.engines import keepalive
from db.environments import CONNECT_TIMEOUT, ENV_DIR, NETWORK_TIMEOUT, Environment
from db.errors import (
    BrokenModels,
    BrokenRevisions,
    ConfigError,
    DbError,
    Halted,
    MigrationFailed,
    first_line,
)
from db.failures import NONE_RUN, describe, failure, not_the_revision, what_to_do
from db.locks import LOCK_WAIT
from db.offline import unrenderable
from db.progress import Progress, Revision, Step
from db.revision_ids import revision_error
from db.stop import Stop
from db.urls import mask
from db.versions import VERSION_ID_MAX, VERSION_TABLE

# What a revision's code may raise is anything: a BaseException too, SystemExit (a helper
# that calls sys.exit) or asyncio's CancelledError (async code in a data step), would end the
# task, or a whole fleet, without a word on where the database is. Only KeyboardInterrupt
# is let through, before these are caught: a second Ctrl-C ends the task at once.
__all__ = ["Progress", "Run", "RunOptions", "Step", "Stop", "make_config", "run_env"]


@dataclass
class RunOptions:
    """What the caller asks of one run, beyond the environment's own settings."""

    lock_wait: float = LOCK_WAIT  # seconds to wait for another run's migration lock
    allow_env_mismatch: bool = False
    backup: bool = True  # back the database up before a change, as the env file says
    wait: float | None = None  # seconds to retry the first connection; None: CONNECT_WAIT
    on_plan: Callable[[tuple[Revision, ...]], None] | None = None  # may refuse by raising
    # the revisions a person confirmed before the run (a protected fleet's plan, read
    # without the lock): under the lock the run refuses to run any other
    confirmed: tuple[str, ...] | None = None
    on_start: Callable[[RevisionStep], None] | None = None
    on_step: Callable[[Step], None] | None = None
    on_note: Callable[[str], None] | None = None
    # a changing run: called with the revision(s) read before the lock, and the connection
    # that read them; False ends the run there, without the lock (a fleet's target with
    # nothing to do)
    before_lock: Callable[[tuple[str, ...], Connection], bool] | None = None
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
    shared_schemas: tuple[str, ...] = ()  # SHARED_SCHEMAS: on the search path after it
    env_file: str = ""  # where the URL came from, for messages
    connect_timeout: float = CONNECT_TIMEOUT
    network_timeout: float = NETWORK_TIMEOUT
    wait: float = 0.0
    busy_advice: str = ""  # how to make the run wait for a free connection, for messages
    lock: bool = False  # take the migration lock: only runs that change the database
    creates: bool = True  # may make a SQLite file not there yet (plain Alembic: it may)
    lock_wait: float = LOCK_WAIT
    session_settings: dict[str, str] = field(default_factory=dict)
    note: Callable[[str], None] = field(default=lambda _text: None)
    models: bool = False  # import db.models: only autogenerate and check compare against them
    stop: Stop = field(default_factory=Stop)
    before_lock: Callable[[tuple[str, ...], Connection], bool] | None = None  # see RunOptions
    progress: Progress | None = None  # set by run_env for runs that apply steps

    @property
    def search_path(self) -> tuple[str, ...]:
        """Each connection's search path on PostgreSQL: () leaves the server's. A run that
        compares with the models reads its schema alone: on the path, the shared schemas'
        tables would read as the tenant's (and be drafted as dropped)."""
        if not self.schema:
            return ()
        return (self.schema,) if self.models else (self.schema, *self.shared_schemas)

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
    config = _Config(str(env.root / "alembic.ini"), output_buffer=output, cmd_opts=quiet)
    url = env.url(need_secrets=not offline)
    env_file = f"{ENV_DIR}/{env.name}.env"
    config.attributes["run"] = Run(
        environment=env.name,
        url=url,
        flags=env.flags,
        schema=env.schema,
        shared_schemas=env.search_path[1:],
        env_file=env_file,
        connect_timeout=env.connect_timeout,
        network_timeout=env.network_timeout,
        wait=options.wait if options.wait is not None else env.number("CONNECT_WAIT", 0),
        busy_advice=f"let the run wait for one: CONNECT_WAIT=SECONDS in {env_file} (or "
        "--wait=SECONDS, on migrate and rollback)",
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


class _Config(Config):
    """Alembic's Config, for a project in a folder whose name holds a ``%`` (``50% off``):
    Alembic gives configparser the folder as ``%(here)s`` unescaped, and every option that
    names it failed ("'%' must be followed by '%' or '('")."""

    @functools.cached_property
    def file_config(self) -> ConfigParser:
        parser = super().file_config
        here = parser.defaults().get("here", "")
        if "%" in here:
            parser.set(parser.default_section, "here", here.replace("%", "%%"))
        return parser


def run_of(config: Config) -> Run:
    run: Run = config.attributes["run"]
    return run


def session_settings(env: Environment) -> dict[str, str]:
    """PostgreSQL settings for migration sessions, so a migration fails fast, not stalls."""
    settings = {
        "application_name": env.get("APPLICATION_NAME") or "migrations",
        "lock_timeout": env.duration("LOCK_TIMEOUT", "5s"),
        "statement_timeout": env.duration("STATEMENT_TIMEOUT", "15min"),
        # end a killed run's query within a second, instead of when it finishes
        "client_connection_check_interval": env.duration("CLIENT_CHECK_INTERVAL", "1s"),
        # a server's idle timeouts must not end a migration session between revisions
        "idle_session_timeout": "0",
        "idle_in_transaction_session_timeout": "0",
        # a naive time is UTC, as the app has it: a revision that makes a timestamp column
        # timestamptz, or takes a date of now(), gives the same on a server set to Moscow
        "TimeZone": "UTC",
    }
    if env.network_timeout > 0:  # so the server ends the session of a run whose host is gone,
        # rolling its revision back and freeing its locks, as the task gives the server up
        idle, interval, count = keepalive(env.network_timeout)
        settings.update(
            tcp_keepalives_idle=f"{idle}s",
            tcp_keepalives_interval=f"{interval}s",
            tcp_keepalives_count=str(count),
            tcp_user_timeout=f"{int(env.network_timeout * 1000)}ms",
        )
    return settings


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
        with revisions_print_to_stderr():  # importing them runs their top level
            _LOADED[key] = _checked(_script_directory(config), config)
    return _LOADED[key]


def revisions_print_to_stderr() -> contextlib.AbstractContextManager[object]:
    """What revision files (and env.py) print goes to stderr, where the user sees it:
    stdout carries a task's own output, such as JSON or offline SQL."""
    return contextlib.redirect_stdout(sys.stderr)


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
    """Logging as alembic.ini sets it up, once per process (a fleet's worker enters env.py
    for target after target), and only where nothing has set logging up yet: fileConfig
    replaces the root logger's handlers and level, so an app that migrates as it starts
    lost its own logging after (as ``logging.basicConfig`` does, this leaves it alone)."""
    if logging.getLogger().handlers:
        return
    try:
        fileConfig(ini, disable_existing_loggers=False)
    except Exception as exc:  # a section left out or misspelled: KeyError, ValueError...
        said = f"{type(exc).__name__}: {first_line(exc)}"
        raise ConfigError(
            f"{ini} has broken logging sections ({said}): restore [loggers], [handlers] and "
            "[formatters] from the repository"
        ) from exc


def _stamp(path: Path) -> tuple[int, int]:
    found = path.stat()
    return found.st_mtime_ns, found.st_size


def _checked(script: ScriptDirectory, config: Config) -> ScriptDirectory:
    versions, root = Path(script.versions), Path(config.config_file_name or ".").parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            script.revision_map.heads  # noqa: B018 (loads every file)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            where = revision_files.problem(versions, root)
            if where is None:
                where = revision_files.culprit(exc, versions, root) or "the revision files"
                where += f" cannot be loaded: {describe(exc)}"
            raise BrokenRevisions(where) from exc
    below = revision_files.nested(versions, root)
    if below is not None:
        raise BrokenRevisions(below)
    nameless = any(not rev.revision for rev in script.walk_revisions())  # Alembic takes ""
    if caught or nameless:
        said = caught[0].message if caught else "a file's `revision =` is empty"
        raise BrokenRevisions(
            revision_files.problem(versions, root) or f"the revision files: {said}"
        )
    loaded = list(script.walk_revisions())
    parents = {rev.revision: _ids(rev.down_revision) for rev in loaded}
    needs = {rev.revision: _ids(rev.dependencies) for rev in loaded}
    files = {rev.revision: Path(rev.path) for rev in loaded}
    if (loop := revision_files.circle(parents, files, root, needs)) is not None:
        raise BrokenRevisions(loop)
    for rev in loaded:
        _utf8(rev, root)
        missing = [
            fn for fn in ("upgrade", "downgrade") if not callable(getattr(rev.module, fn, None))
        ]
        if missing:  # Alembic finds out only when it plans that direction, with a traceback
            raise BrokenRevisions(
                f"{_file(rev, root)} has no {missing[0]}() function: add one (a downgrade that "
                "cannot undo the revision raises NotImplementedError, saying why)"
            )
        if len(rev.revision) > VERSION_ID_MAX:
            file = _file(rev, root)
            raise BrokenRevisions(
                f"{file}: revision id {rev.revision!r} is {len(rev.revision)} characters, and "
                f"the version table holds {VERSION_ID_MAX} (PostgreSQL would refuse it after "
                "the revision ran; SQLite would not, so dev would pass): shorten it, in "
                "`revision =`, in its file name and in the down_revision that names it"
            )
    return script


def _ids(down: str | Sequence[str] | None) -> tuple[str, ...]:
    """A revision's ``down_revision`` as a tuple of ids."""
    return () if down is None else (down,) if isinstance(down, str) else tuple(down)


def _file(rev: Script, root: Path) -> str:
    """A revision's file, named from the project (or whole, if it lies elsewhere)."""
    if not rev.path:
        return rev.revision
    path = Path(rev.path)
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _utf8(rev: Script, root: Path) -> None:
    """A loaded revision file is UTF-8 text too."""
    if rev.path and (wrong := revision_files.not_utf8(Path(rev.path), root)) is not None:
        raise BrokenRevisions(wrong)


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
    env_py, root = Path(script.env_py_location), Path(config.config_file_name or ".").parent
    if not env_py.is_file():  # Alembic would run a stale compiled copy from __pycache__
        where = env_py.relative_to(root) if env_py.is_relative_to(root) else env_py
        raise ConfigError(f"{where} is missing: restore it from the repository")
    try:
        with EnvironmentContext(config, script, fn=fn, **kw), revisions_print_to_stderr():
            script.run_env()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        ran = progress is not None and (progress.running is not None or progress.applied)
        stopped = run.stop.requested or isinstance(exc, Halted)
        if progress is not None and (ran or stopped):  # say where the database is
            if not kw.get("as_sql"):
                raise failure(exc, progress, run, script) from exc
            # a refusal of Alembic's (a table copy on PostgreSQL) knows no revision either
            named = not isinstance(exc, DbError) or isinstance(exc, MigrationFailed)
            if progress.running is not None and named:
                rev = progress.running.revision.revision
                said = unrenderable(rev, exc, describe(exc), run.flags)
                raise MigrationFailed(said) from exc
        if isinstance(exc, DbError):
            raise
        if isinstance(exc, CommandError):
            raise revision_error(exc, run.flags) from exc
        if isinstance(exc, DBAPIError):
            said, advice = not_the_revision(exc, run) or (
                describe(exc),
                what_to_do(exc, run.flags, run.url.username),
            )
            text = f"database error on {mask(run.url)}: {said}"
            if progress is not None:  # a changing run, stopped before its first revision
                text += f"\n{NONE_RUN}" + (f"; {advice}" if advice else "")
            elif advice:
                text += f"\n{advice}"
            raise DbError(text) from exc
        if isinstance(exc, CompileError) and run.models:  # comparing
            raise BrokenModels.unwritable(exc) from exc
        broken = _broken_env_py(exc, env_py, root)
        if broken is not None:
            raise broken from exc
        raise


def _broken_env_py(exc: BaseException, env_py: Path, root: Path) -> ConfigError | None:
    """The error for env.py's own code failing (an edit that broke it: not Python, a name
    it imports that is gone), naming its line; None when the failure came from elsewhere."""
    if isinstance(exc, SyntaxError):
        if Path(exc.filename or "").resolve() != env_py.resolve():
            return None
        line, said = exc.lineno, exc.msg  # without its "(file, line)"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        if not frames or Path(frames[-1].filename).resolve() != env_py.resolve():
            return None
        line, said = frames[-1].lineno, first_line(exc)
    where = env_py.relative_to(root) if env_py.is_relative_to(root) else env_py
    return ConfigError(
        f"{where}, line {line}, failed: {type(exc).__name__}: {said}; fix it, or restore it "
        "from the repository (--debug shows the traceback)"
    )
