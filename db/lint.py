"""Lint the PostgreSQL SQL of revisions with squawk, finding by finding, revision by revision.

The SQL is the offline SQL the revisions render for a PostgreSQL environment, cut at
Alembic's ``-- Running upgrade A -> B`` markers so each finding names its revision.
Deliberate choices live in ``.squawk.toml``; one statement can be excused with a
``-- squawk-ignore RULE`` comment on the line before it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import util
from alembic.script import ScriptDirectory

from db.authoring import offline_sql
from db.environments import Environment
from db.errors import ConfigError, DbError, MigrationFailed
from db.runner import make_config

_MARKER = "-- Running upgrade "
NOT_LINTABLE = "not-lintable-offline"


@dataclass(frozen=True)
class Finding:
    revision: str
    rule: str
    message: str
    statement: str  # the line squawk points at


def applies(env: Environment) -> bool:
    """Whether squawk has something to say: it lints PostgreSQL's SQL only."""
    return env.url(need_secrets=False).get_backend_name() == "postgresql"


def postgresql_only(env: Environment) -> None:
    """Refuse an environment squawk has nothing to say of, before anything reads it."""
    if not applies(env):
        raise ConfigError(f"lint checks PostgreSQL SQL: {env.name} is not a PostgreSQL environment")


def lint(env: Environment, revisions: Iterable[str] | None = None) -> list[Finding]:
    """Findings for ``revisions`` (ids; default: all) as rendered for ``env``'s dialect."""
    postgresql_only(env)
    wanted = None if revisions is None else set(revisions)
    chunks, unlintable = rendered(env, wanted)
    findings = [
        Finding(
            rev,
            NOT_LINTABLE,
            f"it cannot be rendered as SQL offline ({why}): review it by hand",
            "",
        )
        for rev, why in unlintable.items()
    ]
    if not chunks:
        return findings
    with tempfile.TemporaryDirectory(prefix="lint-") as folder:
        for rev, sql in chunks.items():
            (Path(folder) / f"{rev}.sql").write_text(sql, encoding="utf-8")
        reported = _squawk(env.root, sorted(Path(folder).glob("*.sql")))
    for item in reported:
        rev = Path(item["file"]).stem
        lines = chunks[rev].splitlines()
        line = lines[item["line"]].strip() if item["line"] < len(lines) else ""
        findings.append(Finding(rev, item["rule_name"], item["message"], line))
    return findings


def rendered(env: Environment, wanted: set[str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """Each wanted revision's SQL; and, for those that cannot be rendered offline (a data
    migration that reads rows), why not. One offline pass, or one per revision if it fails."""
    try:
        every = split(offline_sql(env).text)
    except MigrationFailed:
        every, failed = {}, {}
        for script in ScriptDirectory.from_config(make_config(env, offline=True)).walk_revisions():
            if wanted is not None and script.revision not in wanted:
                continue
            start = ",".join(util.to_tuple(script.down_revision, default=())) or None
            try:
                every.update(split(offline_sql(env, start, script.revision).text))
            except MigrationFailed as exc:
                failed[script.revision] = str(exc).split(": ", 1)[-1]
    else:
        failed = {}
    return {rev: sql for rev, sql in every.items() if wanted is None or rev in wanted}, failed


def split(sql: str) -> dict[str, str]:
    """Each revision's statements, keyed by revision id, with the session settings before."""
    header, *parts = sql.split(_MARKER)
    settings = "\n".join(line for line in header.splitlines() if line.startswith("SET "))
    chunks = {}
    for part in parts:
        arrow, _, body = part.partition("\n")
        rev = arrow.split("->")[-1].strip()
        body = body.rstrip().removesuffix("BEGIN;").rstrip()
        chunks[rev] = f"{settings}\nBEGIN;\n{body}\n"
    return chunks


def _squawk(root: Path, files: list[Path]) -> list[dict[str, Any]]:
    binary = shutil.which("squawk") or str(Path(sys.executable).with_name("squawk"))
    if not Path(binary).exists() and shutil.which(binary) is None:
        raise DbError("squawk is not installed: pip install squawk-cli")
    command = [binary, "--reporter", "json", *map(str, files)]
    config = root / ".squawk.toml"
    if config.is_file():
        command[1:1] = ["--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True)
    try:
        reported = json.loads(done.stdout)
    except json.JSONDecodeError:
        reported = None
    # findings exit 1 with their list; a failure exits 1 with none (a broken .squawk.toml),
    # which read as "[]" passed the lint
    if not isinstance(reported, list) or (done.returncode != 0 and not reported):
        said = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
        if said.startswith("Configuration error") and config.is_file():
            raise ConfigError(f"{config.name}: squawk cannot read it: {said}")
        raise DbError(f"squawk failed: {said}")
    return [item for item in reported if isinstance(item, dict)]
