"""What a protected environment asks before a change: the plan shown, and its name typed."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from cli.output import marker, show_plan

if TYPE_CHECKING:
    from db.environments import Environment
    from db.progress import Revision
    from db.restore import Chosen


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
