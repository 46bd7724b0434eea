"""reset: drop everything under the migration lock, then migrate from scratch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db import backups, guards, restore
from db.commands import migrate, read_state
from db.connections import connect, connect_async, run_coroutine
from db.engines import make_async_engine, make_engine
from db.environments import Environment
from db.errors import DbError, GuardRefused, Interrupted, cause_of
from db.failures import describe, not_the_revision
from db.locks import pg_lock, prepare_session, sqlite_locked
from db.runner import Run, RunOptions, Step, load_scripts, make_config, run_of


def reset(env: Environment, options: RunOptions | None = None) -> list[Step]:
    """Drop everything and migrate from scratch; never on a protected environment.

    It runs the guards ``migrate`` runs (the env name, a sound SQLite file), and backs the
    database up before it drops anything. A corrupt SQLite file, which has nothing that can
    be dropped, is moved into the backups as it is, and a new one is migrated.
    """
    if env.protected:
        raise GuardRefused(f"{env.name} is protected: reset drops every table and never runs there")
    options = options or RunOptions()
    url = env.url()
    kept = restore.set_aside_corrupt(env, url, options)
    if kept is not None:  # nothing in it to drop or back up: a new file, migrated from scratch
        options.note(f"the corrupt database file was moved to {env.relative(kept)}")
        return migrate(env, "head", replace(options, backup=False))
    backups.check_file(env, url, options)
    config = make_config(env, options)
    script = load_scripts(config)
    state = read_state(env, config, script, known=False)  # a branch's revision: dropped
    guards.same_environment(state.log, env, options.allow_env_mismatch)

    def back_up() -> None:
        options.note(backups.before_change(env, url, options.stop))

    schema: list[str] = []  # the PostgreSQL schema it drops, once known
    try:
        if url.get_backend_name() == "sqlite":
            _drop_sqlite(run_of(config), back_up)
        else:
            run_coroutine(_drop_schema(run_of(config), back_up, schema))
    except Interrupted as exc:  # waiting for the lock, or backing up: nothing dropped yet
        as_it_was = "interrupted: nothing was dropped: the database is as it was"
        raise Interrupted(as_it_was, exc.signum) from None
    except DBAPIError as exc:  # the drop's transaction was rolled back
        said, fix = not_the_revision(exc, run_of(config)) or (describe(exc), _fix(exc, env, schema))
        raise DbError(
            f"reset could not drop the tables: {said}\nnothing was dropped: the database is "
            f"as it was; {fix}"
        ) from exc
    # said before the migration, which may fail or be interrupted: what it then says of
    # where the database is stays true, but only this line tells that its data is gone
    dropped = f"the schema {schema[0]} (made again, empty)" if schema else "every table"
    options.note(f"dropped {dropped}: migrating from scratch")
    return migrate(env, "head", replace(options, backup=False))  # backed up before the drop


def _fix(exc: DBAPIError, env: Environment, schema: list[str]) -> str:
    """What to do when the drop failed for another reason than the revision's session."""
    if getattr(cause_of(exc), "sqlstate", None) != "42501" or not schema:  # insufficient_privilege
        return "fix that"
    name, url = schema[0], env.url()
    role = _quoted(url.username) if url.username else "the role the URL connects as"
    return (
        f"reset drops the schema {name} and makes it again as it was, which takes its "
        "owner's rights and CREATE on the database: run it as a role that has both, or give "
        f"them to {role} (ALTER SCHEMA {_quoted(name)} OWNER TO {role}; GRANT CREATE ON "
        f"DATABASE {_quoted(url.database or '')} TO {role}), or drop the tables yourself"
    )


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _drop_sqlite(run: Run, back_up: Callable[[], None]) -> None:
    """Under the migration lock (a running migration is waited for): back up, then drop
    every table, view and trigger. The file stays: one unlinked under a process that has
    it open (a migration waiting for the lock) would take that run's revisions with it."""
    engine = make_engine(run.url, connect_timeout=run.connect_timeout, migrating=True)
    try:
        with (
            connect(engine, run.wait, run.stop.check) as connection,
            sqlite_locked(connection, run.lock_wait, run.note, run.stop.check),
        ):
            back_up()
            found = connection.exec_driver_sql(
                "select type, name from sqlite_master where type in ('table', 'view', "
                "'trigger') and name not like 'sqlite_%' order by type = 'table'"
            )
            for kind, name in found.all():
                quoted = '"' + name.replace('"', '""') + '"'
                connection.exec_driver_sql(f"DROP {kind.upper()} IF EXISTS {quoted}")
    finally:
        engine.dispose()


async def _drop_schema(run: Run, back_up: Callable[[], None], schema: list[str]) -> None:
    """Under the migration lock: back up, then drop the schema and make it again. Without
    SCHEMA, the one the revisions' tables went to: the version table's, as the search path
    finds it, or the first on the path that exists (``"$user"`` comes before ``public``, so
    a schema named as the role, when there is one)."""
    engine = make_async_engine(
        run.url, connect_timeout=run.connect_timeout, network_timeout=run.network_timeout
    )
    try:
        async with connect_async(engine, run.wait, run.stop.check) as connection:
            pid = await prepare_session(connection, engine, run.session_settings, run.env_file)
            stopped = run.stop.check
            async with pg_lock(connection, pid, run.lock_name, run.lock_wait, run.note, stopped):
                back_up()
                current = await connection.scalar(text(_THE_SCHEMA))
                schema.append(run.schema or current or "public")
                found = await connection.execute(text(_AS_IT_WAS), {"schema": schema[0]})
                as_it_was = found.scalars().all()
                name = _quoted(schema[0])
                await connection.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
                await connection.execute(text(f"CREATE SCHEMA {name}"))
                for statement in as_it_was:  # in the drop's transaction: all, or no drop
                    await connection.exec_driver_sql(statement)
                await connection.commit()
    finally:
        await engine.dispose()


_THE_SCHEMA = """
select coalesce((select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace
                  where c.oid = to_regclass('alembic_version')), current_schema())
"""

# What a schema made again must get back, so that only its contents are new: its owner (the
# public schema's is pg_database_owner), its grants (USAGE to PUBLIC, or to the app's role),
# its comment, and the default privileges set in it (GRANT SELECT ON TABLES TO the app).
_AS_IT_WAS = """
select statement from (
  select 1, format('GRANT %s ON SCHEMA %I TO %s%s', a.privilege_type, n.nspname,
                   case a.grantee when 0 then 'PUBLIC' else a.grantee::regrole::text end,
                   case when a.is_grantable then ' WITH GRANT OPTION' else '' end)
    from pg_namespace n, aclexplode(n.nspacl) a
   where n.nspname = :schema and a.grantee <> n.nspowner
  union all
  select 2, format('ALTER DEFAULT PRIVILEGES FOR ROLE %s IN SCHEMA %I GRANT %s ON %s TO %s%s',
                   d.defaclrole::regrole, n.nspname, a.privilege_type,
                   case d.defaclobjtype when 'r' then 'TABLES' when 'S' then 'SEQUENCES'
                                        when 'f' then 'FUNCTIONS' else 'TYPES' end,
                   case a.grantee when 0 then 'PUBLIC' else a.grantee::regrole::text end,
                   case when a.is_grantable then ' WITH GRANT OPTION' else '' end)
    from pg_default_acl d join pg_namespace n on n.oid = d.defaclnamespace,
         aclexplode(d.defaclacl) a
   where n.nspname = :schema
  union all
  select 3, format('COMMENT ON SCHEMA %I IS %L', n.nspname, c.description)
    from pg_namespace n
    join pg_description c on c.objoid = n.oid and c.classoid = 'pg_namespace'::regclass
   where n.nspname = :schema
  union all
  select 4, format('ALTER SCHEMA %I OWNER TO %s', n.nspname, n.nspowner::regrole)
    from pg_namespace n
   where n.nspname = :schema and n.nspowner <> current_user::regrole
) as kept (step, statement)
order by step
"""
