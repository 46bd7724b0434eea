"""The tasks' flags: which have a letter, and how their values are read.

A letter means one flag, in every task. invoke gives each flag the first letter of its
name that its task has left free, so a letter meant different flags in different tasks:
``-o`` was ``--only`` in ``migrate`` and ``--output`` in ``offline-sql``, ``-s``
``--json`` in ``migrate`` and ``--steps`` in ``rollback``. Here only the flags of
``SHORT`` get a letter; any other is typed in full.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from invoke.context import Context
from invoke.tasks import Task
from invoke.tasks import task as invoke_task

SHORT = {
    "env": "e",
    "to": "t",
    "steps": "s",
    "yes": "y",
    "output": "o",
    "jobs": "j",
    "keep_going": "k",
    "debug": "d",
}


class _Task(Task[Any]):
    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts: dict[str, Any] = super().arg_opts(name, default, taken_names)
        if name in SHORT:
            opts["names"].append(SHORT[name])
        return opts


task = functools.partial(invoke_task, klass=_Task, auto_shortflags=False)


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
