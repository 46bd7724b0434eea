"""Review before production: do files, models and the database agree?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import ScriptDirectory

from db import audit, guards, revision_files
from db.commands import plan_steps, read_state, unfinished
from db.enum_types import value_drift
from db.environments import Environment
from db.runner import RunOptions, load_scripts, make_config, run_env


def check(env: Environment, options: RunOptions | None = None) -> list[str]:
    """What keeps files, models and database from agreeing; empty when all is in order.

    Several heads, applied files that changed, pending revisions, and drift: a difference
    between the models and the migrated database that autogenerate would write.
    ``options``: its ``stop`` gives up connecting on a signal (a fleet's worker).
    """
    config = make_config(env, options, models=True)
    script = load_scripts(config)
    heads = guards.several_heads(script)
    if heads:
        return [f"{heads}: run `invoke merge`"]
    state = read_state(env, config, script)
    problems = guards.changed_files(state.log, script, env)
    problems += _importing_models(script, env.root)
    problems += [run.said for run in unfinished(state.log, env)]  # migrate refuses: resolve
    unrecorded = guards.unrecorded(state.log, script, state.current)
    if unrecorded:
        problems.append(_unrecorded(unrecorded, state.current, env))
    pending = plan_steps(script, "heads", state.current, up=True)
    if pending:
        return [
            *problems,
            f"{len(pending)} revision(s) pending: run `invoke migrate {env.flags}`",
        ]
    diffs: list[Any] = []
    by_hand: list[str] = []

    def compare(_current: tuple[str, ...], context: MigrationContext) -> list[RevisionStep]:
        diffs.extend(compare_metadata(context, context.opts["target_metadata"]))
        by_hand.extend(value_drift(context.connection, context.opts["target_metadata"]))
        return []

    run_env(config, script, compare, dont_mutate=True)
    if diffs:
        problems.append(
            f"the models and the database differ; `invoke makemigration {env.flags}` would write: "
            + "; ".join(_describe(diff) for diff in diffs)
        )
    return problems + by_hand


def _importing_models(script: ScriptDirectory, root: Path) -> list[str]:
    """The revisions that import the app's models, oldest first."""
    paths = [Path(rev.path) for rev in script.walk_revisions() if rev.path]
    found = (revision_files.models_problem(path, root) for path in reversed(paths))
    return [problem for problem in found if problem is not None]


def _unrecorded(revisions: list[str], current: tuple[str, ...], env: Environment) -> str:
    """Applied revisions whose files nothing can check: the audit trail has no checksum."""
    more = f" and {len(revisions) - 3} more" if len(revisions) > 3 else ""
    shown = ", ".join(revisions[:3]) + more
    at = current[0] if len(current) == 1 else "REV"
    return (
        f"{len(revisions)} applied revision(s) have no checksum in {audit.LOG.name} ({shown}), "
        "so whether their files changed is unknown (applied by plain Alembic, or the trail was "
        f"emptied): `invoke stamp {env.flags} {at}` compares the schema and records them"
    )


def _describe(diff: Any) -> str:
    """One autogenerate difference in a few words, e.g. ``add_table coupons``."""
    first = diff[0] if isinstance(diff, list) else diff
    names = [str(getattr(part, "name", part)) for part in first[1:4] if part is not None]
    return " ".join([first[0], *names[:2]])
