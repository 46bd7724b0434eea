"""Short flags: a letter means one flag, in every task.

invoke gives each flag the first letter of its name that its task has left free, so a
letter meant different flags in different tasks: ``-o`` was ``--only`` in ``migrate`` and
``--output`` in ``offline-sql``, ``-s`` ``--json`` in ``migrate`` and ``--steps`` in
``rollback``. Here only the flags of ``SHORT`` get a letter; any other is typed in full.
"""

from __future__ import annotations

import functools
from typing import Any

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
