"""The command line's edge: the environment a task names, its flags read, and the
library's errors and signals turned into a short message and an exit code."""

from __future__ import annotations

import errno
import gc
import io
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke.context import Context
from invoke.exceptions import Exit

from cli.output import marker, print_start, print_step, show_plan

if TYPE_CHECKING:
    from db.environments import Environment
    from db.progress import Revision
    from db.restore import Chosen
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


def confirm(env: Environment, yes: bool, action: str, *, need_yes: bool) -> None:
    """Ask for the environment's name on a protected environment; refuse if it isn't typed."""
    from db.errors import GuardRefused

    interactive = sys.stdin is not None and sys.stdin.isatty()
    if need_yes and not yes:
        raise GuardRefused(f"{env.name} is protected: to {action} it, pass --yes")
    if yes and (not need_yes or not interactive):
        return
    if not interactive:
        raise GuardRefused(
            f"{env.name} is protected and there is no terminal to confirm on: "
            "pass --yes to go ahead"
        )
    typed = _answer(f"{env.name} is protected. Type its name to {action}: ")
    if typed is None:
        raise GuardRefused("no name was typed (end of input); nothing was changed")
    if typed != env.name:
        raise GuardRefused("the name did not match; nothing was changed")


class _Signalled(Exception):
    pass


def _answer(prompt: str) -> str | None:
    """The line typed at ``prompt``; None at the end of input. SIGINT or SIGTERM ends the
    wait: a run's own handlers only take note of a signal, and reading would go on (under
    the migration lock) until a name was typed. The prompt shows once they are in place."""
    from db.errors import Interrupted

    def handler(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    before = {kind: signal.signal(kind, handler) for kind in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
    except _Signalled as exc:
        print(file=sys.stderr)  # the prompt's line ends here
        raise Interrupted("interrupted at the prompt: nothing was changed", exc.args[0]) from None
    finally:
        for kind, previous in before.items():
            signal.signal(kind, previous)
    return line.strip() if line else None


def confirm_migrate(env: Environment, yes: bool) -> Callable[[tuple[Revision, ...]], None]:
    """What a protected migrate does with its plan, inside the run and under the lock: show
    it, with what squawk says of it on PostgreSQL, and ask for the typed name."""
    from db import lint

    # offline, so before the run: env.py cannot nest; the plan shows its own part
    findings = lint.lint(env) if lint.applies(env) else None

    def ask(plan: tuple[Revision, ...]) -> None:
        show_plan(env, plan, findings)
        if plan:
            confirm(env, yes, "migrate", need_yes=False)

    return ask


def confirm_rollback(env: Environment, yes: bool) -> Callable[[tuple[Revision, ...]], None]:
    """What a protected rollback does with its plan: show it, and ask (``--yes`` needed).
    Nothing to undo asks nothing, as a migrate with nothing to apply does."""

    def ask(plan: tuple[Revision, ...]) -> None:
        print(f"plan: {len(plan) or 'nothing'} to undo", file=sys.stderr)
        for rev in plan:
            print(f"  {rev.id}  {rev.message}{marker(rev)}", file=sys.stderr)
        if plan:
            confirm(env, yes, "roll back", need_yes=True)

    return ask


def confirm_restore(env: Environment, chosen: Chosen, yes: bool) -> None:
    """What a protected restore does before it starts: show which backup goes back, and over
    what, and ask (``--yes`` needed, as for a rollback)."""
    from db.restore import replaced

    backup, live = env.relative(chosen.path), replaced(env.url())
    print(f"plan: restore {backup} (at {chosen.at}) over {live}", file=sys.stderr)
    confirm(env, yes, "restore that backup over", need_yes=True)


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


def whole(flag: str, text: str | None, default: int, least: int) -> int:
    """A whole-number flag (declared as text: invoke's own int conversion fails with a
    traceback); one not given keeps ``default``, an empty one (``--canary=$N``, N unset) is
    refused rather than read as the default."""
    from db.errors import UsageError

    try:
        value = default if text is None else int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise UsageError(f"{flag} takes a whole number, {least} or more, not {text!r}")
    return value


def not_dry(c: Context) -> None:
    """Refuse invoke's ``--dry`` (or ``run.dry`` in its config) in a task that changes
    something: it is for shell commands, which these tasks never run, so the task would
    have made its changes for real (``invoke --dry migrate --env=prod`` migrated prod)."""
    from db.errors import UsageError

    if c.config.run.dry:
        raise UsageError(
            "--dry is invoke's, for shell commands, and this task runs none: it would have "
            "made its changes for real, so it did nothing; `invoke status` shows what is "
            "pending, and `invoke offline-sql` its SQL"
        )


def filled(flag: str, value: str | None, instead: str) -> str | None:
    """A text flag, None when not given. Given empty (``--env=$DEPLOY_ENV`` with the variable
    unset) it is refused, saying what to give ``instead``, never read as the default."""
    from db.errors import UsageError

    if value is not None and not value.strip():
        raise UsageError(f"{flag} is empty: {instead}")
    return value


def named(flag: str, revision: str) -> str:
    """A revision given on the command line: not empty (``--to=$REV``, REV unset), not a
    step of 0 (``+0``), which Alembic words as "didn't produce 0 migrations", and not
    malformed (``@``, which fails inside Alembic)."""
    from db.errors import UsageError
    from db.revision_ids import malformed

    filled(flag, revision, "give a revision id, a prefix, or head")
    if re.fullmatch(r"(?:.+@)?\w*[+-]0+", revision.strip()):
        raise UsageError(f"{flag}={revision.strip()} moves nowhere: give a step of 1 or more")
    problem = malformed(revision.strip())
    if problem is not None:
        raise UsageError(f"{flag}: {problem}")
    return revision.strip()


def seconds(flag: str, text: str) -> float:
    from db.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):
        raise UsageError(f"{flag} takes a number of seconds, 0 or more, not {text!r}")
    return value
