"""What one run plans, starts, commits and reports, and what it says when it stops early.

A step is reported as applied only once its transaction has committed: on PostgreSQL when
Alembic moves to the next revision, on SQLite when the run's single transaction commits.
A revision that runs outside a transaction (``autocommit_block``) leaves an audit row
before its first non-transactional statement, so a run that dies part way leaves a trace
that the next run refuses to pass blindly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from alembic.runtime.migration import MigrationContext, MigrationInfo, RevisionStep
from alembic.script import Script
from sqlalchemy import event

from db import audit
from db.errors import OwnTransaction
from db.locks import Fence
from db.stop import Stop

if TYPE_CHECKING:
    from sqlalchemy import Connection


# A statement that ends or starts a transaction (ROLLBACK TO a savepoint does neither)
_TRANSACTION_CONTROL = re.compile(
    r"\s*(begin|start\s+transaction|commit|end|abort|rollback(?!\s+(work\s+|transaction\s+)?to\b))\b",
    re.IGNORECASE,
)


def message_of(script: Script) -> str:
    """A revision's message as listed: its docstring's first paragraph, on one line."""
    return " ".join((script.doc or "").split())


@dataclass(frozen=True)
class Revision:
    id: str
    message: str
    transactional: bool = True  # False: it uses autocommit_block, outside a transaction

    @classmethod
    def of(cls, script: Script) -> Revision:
        source = Path(script.path).read_text(encoding="utf-8")
        return cls(script.revision, message_of(script), "autocommit_block(" not in source)


@dataclass(frozen=True)
class Step:
    """One revision applied (``up``) or rolled back (``down``), and how long it took."""

    revision: str
    message: str
    direction: str
    seconds: float


@dataclass
class Progress:
    """Reports each step, writes it to the audit trail, and knows what was running."""

    environment: str = ""
    who: audit.Who | None = None  # None: no audit rows (read-only runs)
    on_start: Callable[[RevisionStep], None] | None = None
    on_step: Callable[[Step], None] | None = None
    stop: Stop = field(default_factory=Stop)
    fence: Fence | None = None  # a locked run's: checked before each step commits
    plan: list[RevisionStep] = field(default_factory=list)
    applied: list[Step] = field(default_factory=list)  # committed, in order
    running: RevisionStep | None = None
    in_block: bool = False  # the running step has started a non-transactional block
    in_code: bool = False  # the running step's own code runs (its upgrade() or downgrade())
    ended: bool = False  # that code rolled its transaction back (an ORM Session's rollback())
    committing: bool = False  # the running step's commit was asked for: it may have committed
    last_statement: str | None = None
    _uncommitted: list[Step] = field(default_factory=list)
    _started_row: int | None = None
    _clock: float = field(default_factory=time.perf_counter)
    _started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def steps(self, plan: list[RevisionStep], context: MigrationContext) -> Iterator[RevisionStep]:
        """The plan, handed to Alembic one step at a time, noting each commit and each start."""
        self.plan = plan
        connection = None if context.as_sql else context.connection
        for step in plan:
            self.committed(connection)
            self.stop.check()
            self.running, self.in_block, self.last_statement = step, False, None
            self.ended = self.committing = False
            self._started_row = None
            self._clock, self._started = time.perf_counter(), datetime.now(timezone.utc)
            if self.on_start is not None:
                self.on_start(step)
            self.in_code = True
            yield step
        self.committed(connection)
        if not self._uncommitted:
            self.running = None

    def committed(self, connection: Connection | None = None) -> None:
        """The steps done so far have committed (unless ``connection`` is still in one)."""
        if connection is not None and connection.in_transaction():
            return
        for done in self._uncommitted:
            self.applied.append(done)
            if self.on_step is not None:
                self.on_step(done)
        self._uncommitted.clear()

    def before_block(self, ctx: MigrationContext) -> None:
        """Entering ``autocommit_block``: the audit row goes in before the commit Alembic does."""
        if self.running is None or ctx.connection is None or ctx.as_sql:
            return
        if not self.in_block and self.who is not None:
            audit.ensure_table(ctx.connection.execute)
            self._started_row = audit.record(
                ctx, self._row(self.running.info, "run-" + self._direction(self.running))
            )
        self.in_block = True

    @contextmanager
    def keeping_transactions(self, connection: Connection) -> Iterator[None]:
        """Refuse a revision's own COMMIT, ROLLBACK or BEGIN (``op.execute("COMMIT")``, an old
        recipe for CREATE INDEX CONCURRENTLY, or ``op.get_bind().commit()``). It would end the
        revision's transaction part way: what came before it stays, what comes after runs
        outside any transaction, and a later failure rolls neither back, while the run would
        say the revision was. (Alembic ends its transactions through their own objects, never
        through the connection's ``commit()``, so only the revision's calls are refused.)"""

        def refuse(_conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
            if self.running is not None and _TRANSACTION_CONTROL.match(statement):
                if self.ended:  # the BEGIN after it, on SQLite
                    raise _rolled_back(self.running)
                raise _own_transaction(self.running, f"runs {statement.split()[0].upper()}")

        def rolled_back(_conn: Connection) -> None:  # not by a call: a Session's, say
            self.ended = self.ended or (self.in_code and not self.in_block)

        def committing(_conn: Connection) -> None:  # before a commit is sent
            if self.running is not None and self.in_code and not self.in_block:
                raise _own_transaction(self.running, "commits")  # and it never is
            self.committing = self.running is not None

        def refusing(name: str) -> Callable[[], None]:
            own = getattr(connection, name)

            def instead() -> None:
                if self.running is not None and self.in_code and not self.in_block:
                    raise _own_transaction(self.running, f"calls op.get_bind().{name}()")
                own()

            return instead

        listeners: dict[str, Callable[..., None]] = {
            "before_cursor_execute": refuse,
            "rollback": rolled_back,
            "commit": committing,
        }
        for name, listener in listeners.items():
            event.listen(connection, name, listener)
        connection.commit = refusing("commit")  # type: ignore[method-assign]
        connection.rollback = refusing("rollback")  # type: ignore[method-assign]
        try:
            yield
        finally:
            del connection.commit, connection.rollback  # the class's own, again
            for name, listener in listeners.items():
                event.remove(connection, name, listener)

    @contextmanager
    def noting_statements(self, connection: Connection) -> Iterator[None]:
        """Inside a non-transactional block, record each statement before it starts."""
        busy = False

        def note(conn: Connection, element: Any, *_args: Any) -> None:
            nonlocal busy
            if busy:
                return
            busy = True
            try:
                self.last_statement = _sql(element, conn)
                if self._started_row is not None:
                    audit.set_statement(conn, self._started_row, self.last_statement)
            finally:
                busy = False

        event.listen(connection, "before_execute", note)
        try:
            yield
        finally:
            event.remove(connection, "before_execute", note)

    def after_each(self, ctx: MigrationContext, step: MigrationInfo, **_kw: Any) -> None:
        """Alembic's ``on_version_apply``: inside the step's transaction, before its commit,
        check the lock (a locked run's ``fence``) and write the audit row; one statement
        does both where the row is new. A signal that came while the revision's own Python
        code ran (nothing to cancel there) rolls it back here, before it commits; one whose
        non-transactional block ran is let commit, as that block could not be undone."""
        self.in_code = False
        if self.ended and self.running is not None and ctx.connection is not None:
            ctx.connection.rollback()  # what it ran after, in a transaction of its own
            raise _rolled_back(self.running)
        if self.stop.signum is not None and not self.in_block:
            self.stop.check()
        direction = "up" if step.is_upgrade else "down"
        seconds = time.perf_counter() - self._clock
        done = Step(step.up_revision_id or "", message_of(_script(step)), direction, seconds)
        connection = ctx.connection
        row = self._row(step, direction, done.seconds) if self.who is not None else None
        if self.fence is None or connection is None:
            self._write(ctx, row)
        elif row is not None and self._started_row is None:  # the check and the row, at once
            self.fence.verify(audit.record_and(connection, row, self.fence.held))
        else:
            self.fence.check(connection)
            self._write(ctx, row)
        self._uncommitted.append(done)

    def _write(self, ctx: MigrationContext, row: audit.Row | None) -> None:
        """The step's audit row: a new one, or the one written before its non-transactional
        block, completed."""
        if row is not None and self._started_row is not None:
            audit.complete(ctx, self._started_row, row)
        elif row is not None:
            audit.record(ctx, row)

    def _row(self, step: MigrationInfo, direction: str, seconds: float = 0.0) -> audit.Row:
        assert self.who is not None
        path = _script(step).path
        return audit.Row(
            step.up_revision_id or "",
            direction,
            self.environment,
            self._started,
            seconds,
            self.who,
            audit.checksum(path),
            audit.code_checksum(path),
        )

    @staticmethod
    def _direction(step: RevisionStep) -> str:
        return "up" if step.is_upgrade else "down"

    def lost(self) -> list[Step]:
        """Steps that ran but whose commit did not happen (or is not known to have)."""
        return list(self._uncommitted)


def _script(step: MigrationInfo) -> Script:
    return cast("Script", step.up_revision)


def _sql(element: Any, connection: Connection) -> str:
    try:
        sql = str(element.compile(dialect=connection.dialect))
    except Exception:  # noqa: S110 - a statement we cannot render is named by its type
        sql = type(element).__name__
    return " ".join(sql.split())


_SAVEPOINT = "to undo part of it, use a savepoint: `with op.get_bind().begin_nested():`"


def _rolled_back(step: RevisionStep) -> OwnTransaction:
    """A revision's code rolled its transaction back (an ORM Session bound to its connection,
    whose rollback() ends the transaction it joined), and went on in a new one: refused, as
    a COMMIT is, once its code has run (or at the BEGIN of that new one, on SQLite)."""
    return OwnTransaction(
        f"revision {step.revision.revision} rolled its transaction back part way (an ORM "
        f"Session's rollback()?), which would lose what it ran before; {_SAVEPOINT}"
    )


def _own_transaction(step: RevisionStep, does: str) -> OwnTransaction:
    """The refusal, with the way that works: a savepoint to undo part of a revision (a
    failed statement it means to go on from), else a block for what must not be in one."""
    if "rollback" in does.lower() or "abort" in does.lower():
        instead = _SAVEPOINT
    else:
        instead = (
            "what must run outside a transaction goes in "
            "`with op.get_context().autocommit_block():`"
        )
    return OwnTransaction(
        f"revision {step.revision.revision} {does} itself, which would end its transaction "
        f"part way; {instead}"
    )
