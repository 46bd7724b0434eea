"""The command line's edge: the environment a task names, what it prints first, and the
library's errors and signals turned into a short message and an exit code."""

from __future__ import annotations

import errno
import gc
import io
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke.context import Context
from invoke.exceptions import Exit

from cli.flags import filled, seconds
from cli.output import print_start, print_step

if TYPE_CHECKING:
    from db.environments import Environment
    from db.runner import RunOptions
    from db.stop import Stop

ROOT = Path(__file__).resolve().parent.parent  # the project: environments/, alembic.ini
# whether the running task shows tracebacks (--debug, INVOKE_DB_DEBUG=1): a fleet's targets
# run in workers, which keep a failure's traceback for the parent to show only if so
DEBUG: ContextVar[bool] = ContextVar("DEBUG", default=False)


def quiet_when_the_reader_leaves() -> None:
    """``invoke history | head``: once stdout's reader has gone, end without a traceback,
    as Unix tools do (exit 141, as SIGPIPE would). Python ignores SIGPIPE, so that a
    server's closed socket raises an error instead of killing a run; a closed pipe raises
    BrokenPipeError. ``invoke offline-sql > upgrade.sql`` on a full disk, a stdout closed
    before the task started (``>&-``), or one whose encoding cannot hold the output: one
    line, exit 2 (the files the tasks write themselves say which file they could not write)."""
    hook = sys.excepthook
    if sys.stdout is None:  # started with it closed (>&-): print() would drop the data unsaid
        sys.stdout = _ClosedStdout()

    def cut_short(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if issubclass(kind, BrokenPipeError) and _stdout_reader_gone():
            sys.stderr.flush()
            os._exit(128 + signal.SIGPIPE)
        why = _unwritable(value)
        if why is not None:
            print(f"error: cannot write the output: {why}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(2)  # not through Python's exit, which would write stdout's rest again
        broken = None if _debugging() else _unreadable_settings(value)
        if broken is not None:
            print(f"error: {broken}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(2)
        hook(kind, value, traceback)

    sys.excepthook = cut_short


class StdoutClosed(OSError):
    """A task's output, written where stdout was closed before the task started."""


class _ClosedStdout(io.TextIOBase):
    """stdout for a process started without one: Python sets ``sys.stdout`` to None, and
    print() then drops what it is given, so ``invoke status >&-`` said nothing and exited
    0. Writing raises instead (flushing, at exit, has nothing to do)."""

    def write(self, text: str) -> int:
        raise StdoutClosed(errno.EBADF, "stdout is closed (the task was started with >&-?)")


def _unwritable(error: BaseException) -> str | None:
    """Why stdout could not take the task's output, in words; None for any other error (or,
    unless stdout was closed, when the user asked for tracebacks). A full disk, where an
    error names no file (the files the tasks write name theirs); or a character stdout's
    encoding cannot hold (a revision's message, in a latin-1 locale): never replaced, since
    the output may be SQL, whose text must stay what it is."""
    if isinstance(error, StdoutClosed):
        return error.strerror
    if _debugging():
        return None
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(error, OSError) and error.errno in full and error.filename is None:
        return error.strerror
    if isinstance(error, UnicodeEncodeError) and _stdout_encodes_as(error.encoding):
        held = error.object[error.start : error.end]
        return (
            f"it holds {held!r}, which stdout's encoding ({error.encoding}) cannot: set "
            "PYTHONIOENCODING=utf-8 (or a UTF-8 locale) and run it again"
        )
    return None


def _debugging() -> bool:
    """Whether the command line asks for tracebacks, before or after a task reads it."""
    return "--debug" in sys.argv or bool(os.environ.get("INVOKE_DB_DEBUG"))


def _unreadable_settings(error: BaseException) -> str | None:
    """Why invoke could not read its own settings (``invoke.yaml``, read after this module
    and before any task), in words; None for any other error."""
    mark = getattr(error, "problem_mark", None)  # YAML that does not parse, and where
    if mark is not None and "yaml" in type(error).__module__.split("."):
        mark = getattr(error, "context_mark", None) or mark  # where the broken part starts
        where = Path(mark.name)
        shown = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        return (
            f"{shown}, line {mark.line + 1}: {getattr(error, 'problem', None) or error}: "
            "invoke cannot read its settings there; fix that YAML"
        )
    if type(error).__name__ == "AmbiguousMergeError":  # db: 5, where db: holds settings
        return (
            f"invoke's settings do not fit together ({error}): in invoke.yaml (or "
            "~/.invoke.yaml), each of db: and tasks: holds settings, such as db: {env: dev}"
        )
    return None


def _stdout_encodes_as(encoding: str) -> bool:
    """Whether ``encoding`` is stdout's (the one an encoding error there would name)."""
    import codecs

    try:
        return codecs.lookup(encoding).name == codecs.lookup(sys.stdout.encoding).name
    except (LookupError, AttributeError, TypeError):
        return False


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (not some socket's broken pipe)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout to ask
        return False


def environment(
    c: Context,
    name: str | None,
    *,
    banner: bool = False,
    refuse_protected: str = "",
    only: str | None = None,
    fleet_ok: bool = False,
    app: bool = False,
) -> Environment:
    """Load the named environment (or invoke's configured default) and announce it: the
    URL migrations use, or with ``app`` the app's (seed writes through the app's engine).

    ``refuse_protected`` (why) refuses a protected environment before its secrets are needed.
    A fleet stays whole where the task runs on fleets (``fleet_ok``); elsewhere ``only`` must
    name one of its targets. ``only`` on one database is refused.
    """
    from db import fleet
    from db.environments import known_environments, load_environment
    from db.errors import GuardRefused, UsageError

    every = "name targets or globs (--only='beta*,gamma'), or leave it out for every target"
    filled("--only", only and only.replace(",", " "), every)  # "," is empty too
    known = ", ".join(known_environments(ROOT))
    filled("--env", name, f"name one of {known}, or leave --env out")
    if name is None:  # INVOKE_DB_ENV= (a deploy's variable left empty) is no name either
        configured = str(c.config.db.env or "")
        if not configured.strip():
            raise UsageError(
                f"the default environment (INVOKE_DB_ENV, or db.env in invoke's "
                f"configuration) is empty: give --env, set it to one of {known}, or unset it"
            )
    loaded = load_environment(ROOT, c.config.db.env if name is None else name, os.environ)
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    if refuse_protected and loaded.protected:
        raise GuardRefused(f"{loaded.name} is protected: {refuse_protected}")
    if not fleet.is_fleet(loaded):
        if only:  # a mistaken --env must not run on the whole database
            raise UsageError(f"{loaded.name} is one database, not a fleet: --only does not apply")
    elif not fleet_ok:
        loaded = fleet.one(loaded, only or "")
    if banner:
        announce(loaded, app)
    return loaded


def is_fleet(env: Environment) -> bool:
    from db import fleet

    return fleet.is_fleet(env) and not env.target


def check_failed() -> int:
    """The exit code of a check that found something (pending revisions, problems, lint)."""
    from db.errors import CheckFailed

    return CheckFailed.exit_code


def announce(env: Environment, app: bool = False) -> None:
    from db.urls import mask

    print(f"[{env.label}] {mask(env.url(app=app))}", file=sys.stderr)


@contextmanager
def reported(c: Context, debug: bool) -> Iterator[None]:
    """Turn the library's expected errors into a short message and their exit code.

    A task's body runs in it from its first line (its imports take a while): SIGINT or
    SIGTERM there, outside a run (which stops at a safe point instead), ends the task with
    ``interrupted (SIGTERM)`` and 143, not invoke's silent exit 1 or a bare kill. With
    ``--debug`` the traceback comes first, and the message and exit code are the same.
    """
    from db.errors import DbError, Interrupted

    def terminated(_signum: int, _frame: object) -> None:
        raise Terminated

    gc.freeze()  # what is imported so far lives until exit: no collection scans it again
    previous = signal.signal(signal.SIGTERM, terminated)
    debugging = DEBUG.set(bool(debug or c.config.db.debug))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:  # a library's warning, as one line of ours (never a raw UserWarning)
                for warned in caught:
                    print(f"warning: {warned.message}", file=sys.stderr)
    except DbError as exc:
        if debug or c.config.db.debug:
            _print_traceback()
        text = str(exc) if isinstance(exc, Interrupted) else f"error: {exc}"
        raise Exit(text, code=exc.exit_code) from None
    except (KeyboardInterrupt, Terminated) as exc:  # a task that reads, or a second signal
        if debug or c.config.db.debug:  # invoke itself would end it with 1 and not a word
            _print_traceback()
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        raise Exit(f"interrupted ({signum.name})", code=128 + signum) from None
    finally:
        DEBUG.reset(debugging)
        signal.signal(signal.SIGTERM, previous)
        # and what the task made: the collections that end the interpreter would scan it
        # all (freed, a no-op fleet run ended 0.1 s after its last line; frozen, 0.01 s)
        gc.freeze()


def _print_traceback() -> None:
    import traceback  # only when asked for

    traceback.print_exc()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a run, raised as Ctrl-C raises KeyboardInterrupt, and one: asyncio
    lets only that (and SystemExit) out of a callback or a task it was raised in, where it
    would log any other exception and go on waiting (a read, for CONNECT_TIMEOUT)."""


@contextmanager
def on_signals(stop: Stop) -> Iterator[None]:
    """SIGINT and SIGTERM stop the run at the next safe point instead of killing it, and
    say so: a revision's own Python code (a long data step) does not stop before it returns.

    A second signal of the same kind acts as it would have without this handler.
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: object) -> None:
        signal.signal(signum, previous[signum])
        stop.request(signum)
        name = signal.Signals(signum).name
        notice = f"  stopping at the next safe point ({name} again stops at once)\n"
        with suppress(OSError):  # past Python's buffer (no reentrant print); a reader gone
            os.write(2, notice.encode())

    for kind in (signal.SIGINT, signal.SIGTERM):
        previous[kind] = signal.signal(kind, handler)
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


def run_options(
    lock_wait: str | None = None, wait: str | None = None, allow_mismatch: bool = False
) -> RunOptions:
    """The library's options from the flags; a flag not given keeps the library's default."""
    from db.runner import RunOptions

    options = RunOptions(
        allow_env_mismatch=allow_mismatch,
        on_start=print_start,
        on_step=print_step,
        on_note=lambda text: print(f"  {text}", file=sys.stderr),
    )
    if lock_wait is not None:
        options.lock_wait = seconds("--lock-wait", lock_wait)
    if wait is not None:
        options.wait = seconds("--wait", wait)
    return options
