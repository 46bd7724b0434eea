"""The one place that builds Alembic's Config, and runs env.py with clear errors."""

from __future__ import annotations

import io
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from alembic import util
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError

from db import audit
from db.engines import CONNECT_TIMEOUT
from db.environments import Environment, mask
from db.errors import DbError, MigrationFailed, RevisionError


@dataclass(frozen=True)
class Step:
    """One revision applied (``up``) or rolled back (``down``), and how long it took."""

    revision: str
    message: str
    direction: str
    seconds: float


StepCallback = Callable[[Step], None]


@dataclass
class RunOptions:
    """What the caller asks of one run, beyond the environment's own settings."""

    lock_wait: float = 60.0  # seconds to wait for another run's migration lock
    allow_env_mismatch: bool = False
    wait: float | None = None  # seconds to retry the first connection; None: CONNECT_WAIT
    on_step: StepCallback | None = None
    on_note: Callable[[str], None] | None = None

    def note(self, text: str) -> None:
        if self.on_note is not None and text:
            self.on_note(text)


@dataclass(frozen=True)
class Settings:
    """How env.py runs: read from ``config.attributes["settings"]``."""

    environment: str
    connect_timeout: float = CONNECT_TIMEOUT
    wait: float = 0.0
    lock: bool = False  # take the migration lock: only runs that change the database
    lock_wait: float = 60.0
    server_settings: dict[str, str] = field(default_factory=dict)
    note: Callable[[str], None] = field(default=lambda _text: None)
    models: bool = True  # import db.models: only autogenerate and check compare against them


def make_config(
    env: Environment,
    options: RunOptions | None = None,
    *,
    offline: bool = False,
    lock: bool = False,
    models: bool = False,
    output: io.StringIO | None = None,
) -> Config:
    """Alembic's Config for ``env``; the URL goes in ``attributes``, never through ConfigParser.

    ``offline`` needs no secrets: only the dialect matters for printing SQL.
    """
    options = options or RunOptions()
    quiet = Namespace(quiet=True)  # progress is the caller's to report
    config = Config(str(env.root / "alembic.ini"), output_buffer=output, cmd_opts=quiet)
    config.attributes["url"] = env.url(need_secrets=not offline)
    config.attributes["settings"] = Settings(
        environment=env.name,
        connect_timeout=env.number("CONNECT_TIMEOUT", CONNECT_TIMEOUT),
        wait=options.wait if options.wait is not None else env.number("CONNECT_WAIT", 0),
        lock=lock,
        lock_wait=options.lock_wait,
        server_settings=session_settings(env),
        note=options.note,
        models=models,
    )
    return config


def session_settings(env: Environment) -> dict[str, str]:
    """PostgreSQL settings for migration sessions, so a migration fails fast, not stalls."""
    return {
        "application_name": env.get("APPLICATION_NAME") or "migrations",
        "lock_timeout": env.get("LOCK_TIMEOUT") or "5s",
        "statement_timeout": env.get("STATEMENT_TIMEOUT") or "15min",
        # end a killed run's query within a second, instead of when it finishes
        "client_connection_check_interval": env.get("CLIENT_CHECK_INTERVAL") or "1s",
    }


@dataclass
class Progress:
    """What a run planned and applied: reports each step, writes it to the audit trail,
    and names the revision that failed."""

    on_step: StepCallback | None = None
    environment: str = ""
    who: audit.Who | None = None  # None: no audit rows (read-only runs)
    plan: list[Any] = field(default_factory=list)  # alembic RevisionSteps
    applied: list[Step] = field(default_factory=list)
    _clock: float = field(default_factory=time.perf_counter)
    _started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def planned(self, steps: list[Any]) -> list[Any]:
        self.plan = steps
        self._restart()
        return steps

    def on_version_apply(self, ctx: Any, step: Any, **_kw: Any) -> None:
        done = Step(
            step.up_revision_id,
            step.up_revision.doc or "",
            "up" if step.is_upgrade else "down",
            time.perf_counter() - self._clock,
        )
        if self.who is not None:
            audit.record(
                ctx,
                revision=done.revision,
                direction=done.direction,
                environment=self.environment,
                started_at=self._started,
                seconds=done.seconds,
                who=self.who,
                file_checksum=audit.checksum(step.up_revision.path),
            )
        self._restart()
        self.applied.append(done)
        if self.on_step is not None:
            self.on_step(done)

    def _restart(self) -> None:
        self._clock, self._started = time.perf_counter(), datetime.now(timezone.utc)

    def failed(self, exc: BaseException) -> MigrationFailed | None:
        """The failure of the step that was running, or None if no step was."""
        if len(self.applied) >= len(self.plan):
            return None
        step = self.plan[len(self.applied)]
        running: Script = step.revision
        if step.is_upgrade:
            verb, at = (
                "upgrade",
                ", ".join(util.to_tuple(running.down_revision, default=())) or "base",
            )
        else:
            verb, at = "downgrade", running.revision
        return MigrationFailed(
            f"{verb} of revision {running.revision} ({running.doc}) failed: {describe(exc)}\n"
            f"the database is still at {at}, without any of that revision's changes; "
            "fix it and run the task again"
        )


def load_scripts(config: Config) -> ScriptDirectory:
    """The revision files, all loaded now, so a broken one is reported clearly up front."""
    script = ScriptDirectory.from_config(config)
    try:
        script.revision_map.heads  # noqa: B018 (loads every file)
    except Exception as exc:
        raise RevisionError(f"the revision files cannot be loaded: {describe(exc)}") from exc
    return script


def run_env(
    config: Config,
    script: ScriptDirectory,
    fn: Callable[..., Any],
    progress: Progress | None = None,
    **kw: Any,
) -> None:
    """Run env.py with ``fn`` deciding the steps; turn expected failures into DbError."""
    if progress is not None:
        config.attributes["on_version_apply"] = [progress.on_version_apply]
    try:
        with EnvironmentContext(config, script, fn=fn, **kw):
            script.run_env()
    except Exception as exc:
        failed = progress.failed(exc) if progress is not None else None
        if failed is not None:
            raise failed from exc
        if isinstance(exc, DbError):
            raise
        if isinstance(exc, CommandError):
            raise revision_error(exc, config.attributes["settings"].environment) from exc
        if isinstance(exc, DBAPIError):
            url = mask(config.attributes["url"])
            raise DbError(f"database error on {url}: {describe(exc)}") from exc
        raise


def revision_error(exc: CommandError, env_name: str) -> RevisionError:
    """Alembic's message, with the precise cause it sometimes hides, and where to look."""
    cause = exc.__cause__ if isinstance(exc.__cause__, ResolutionError) else exc
    return RevisionError(f"{cause}; see `invoke history --env={env_name}`")


def describe(exc: BaseException) -> str:
    """The first line of a failure, as the database or the revision said it."""
    reason = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(reason).strip().splitlines()
    return f"{type(reason).__name__}: {lines[0] if lines else ''}".rstrip(": ")
