"""A request to stop a run: from a signal handler (SIGINT, SIGTERM), or from a fleet whose
other target failed. Light to import: tasks that only copy files (restore) use it too."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from db.errors import Halted, Interrupted


@dataclass
class Stop:
    """Set from a signal handler: the run stops before the next revision commits. Or
    ``halt``ed (a fleet whose other target failed): the running revision finishes first."""

    signum: int | None = None
    halted: str | None = None  # why, when halted
    _cancellers: list[Callable[[], None]] = field(default_factory=list)

    def request(self, signum: int) -> None:
        """Ask the run to stop; cut short a running statement where that loses nothing."""
        self.signum = signum
        for cancel in list(self._cancellers):
            cancel()

    def on_request(self, cancel: Callable[[], None]) -> Callable[[], None]:
        """Call ``cancel`` if a stop is requested; returns the function that unregisters it."""
        self._cancellers.append(cancel)
        return lambda: self._cancellers.remove(cancel)

    def halt(self, why: str) -> None:
        """Stop before the next revision starts, cancelling nothing."""
        self.halted = why

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            # the words of a task interrupted outside a run; a run says where it stopped
            raise Interrupted(f"interrupted ({name})", self.signum)
        if self.halted is not None:
            raise Halted(self.halted)
