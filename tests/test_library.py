"""Unit tests of the db library: env.py called by code, from event loops, the app's sessions."""

from __future__ import annotations

import asyncio
import itertools
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.runtime.migration import MigrationContext
from conftest import REPO, PgDatabase, cannot, head_revision, wait_until
from sqlalchemy import create_engine, func, inspect, make_url, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.types import TypeEngine

from db import commands, fleet
from db.casts import converts_itself, sql_type, using
from db.engines import make_async_engine, make_engine
from db.environments import Environment, load_environment
from db.errors import ConfigError, LockLost, MigrationFailed
from db.locks import pg_lock, prepare_session, sqlite_run
from db.models import Category, User, UTCDateTime
from db.runner import make_config
from db.schema import differences
from db.sequences import INSERTED, check_sequences, inserts_noted
from db.session import async_engine, session_factory
from db.stop import Stop


def sqlite_env(tmp_path: Path) -> Environment:
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "t.env").write_text("DATABASE_URL=sqlite:///t.sqlite3\n")
    for name in ("alembic.ini", "db"):
        (tmp_path / name).symlink_to(REPO / name)
    return load_environment(tmp_path, "t", {})


def pg_env(tmp_path: Path, database: PgDatabase) -> Environment:
    """A project in ``tmp_path`` (as :func:`sqlite_env`) with the environment ``pg`` on
    ``database``."""
    sqlite_env(tmp_path)
    (tmp_path / "environments" / "pg.env").write_text(f"DATABASE_URL={database.url}\n")
    return load_environment(tmp_path, "pg", {})


def test_env_py_accepts_a_callers_engine(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    engine = create_engine(f"sqlite:///{tmp_path / 'given.sqlite3'}")
    config = make_config(env)
    config.attributes["connection"] = engine
    try:
        command.upgrade(config, "head")

        assert "users" in inspect(engine).get_table_names()
        assert not (tmp_path / "t.sqlite3").exists()  # the env's own URL was not used
    finally:
        engine.dispose()


def test_env_py_accepts_a_callers_connection(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    engine = create_engine(f"sqlite:///{tmp_path / 'given.sqlite3'}")
    try:
        with engine.begin() as connection:
            config = make_config(env)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            found = connection.execute(text("select version_num from alembic_version"))
            assert found.scalar() == head_revision()
    finally:
        engine.dispose()


def test_migrate_from_inside_a_running_event_loop(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)

    async def app_startup() -> list[str]:
        return [step.revision for step in commands.migrate(env)]

    assert asyncio.run(app_startup()) == [head_revision()]


def test_app_sessions_on_a_fleet_are_one_shops(tmp_path: Path) -> None:
    one = sqlite_env(tmp_path)
    text = "DATABASE_URL=sqlite:///var/{target}.sqlite3\nTARGETS=alpha beta\n"
    (tmp_path / "environments" / "shops.env").write_text(text)
    shops = load_environment(tmp_path, "shops", {})
    for target in fleet.targets(shops):
        commands.migrate(fleet.environment(shops, target))

    assert use_the_shop(shops, "alpha") == ["e-books"]
    assert use_the_shop(shops, "beta") == ["e-books"]  # its own database: one category each
    with pytest.raises(ConfigError, match="shops is a fleet: name the shop, e.g. target='alpha'"):
        session_factory(shops)
    with pytest.raises(ConfigError, match="shops has no target 'gamma'"):
        session_factory(shops, "gamma")
    with pytest.raises(ConfigError, match="t is one database, not a fleet: it has no 'alpha'"):
        session_factory(one, "alpha")


@pytest.mark.postgres
def test_migrate_postgres_from_inside_a_running_event_loop(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    pg = pg_env(tmp_path, pg_database)

    async def app_startup() -> list[str]:
        commands.migrate(pg)
        return [rev.id for rev in commands.status(pg).current]

    assert asyncio.run(app_startup()) == [head_revision()]


def use_the_shop(env: Environment, target: str = "") -> list[str]:
    """Add a category and a user through the app's sessions; read them back.

    Times come back aware and in UTC on both backends, so comparing them with
    ``datetime.now(timezone.utc)`` works in dev as in production. A naive time is taken as
    UTC on both (asyncpg alone took it as the process's local time).
    """

    async def scenario() -> list[str]:
        Session = session_factory(env, target)
        given = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=3)))
        async with Session() as session, session.begin():
            session.add(Category(name="e-books"))
            session.add(User(telegram_id=1, created_at=given))
            session.add(User(telegram_id=2))  # the server's default time
            session.add(User(telegram_id=3, created_at=given.replace(tzinfo=None)))
        async with Session() as session:
            names = list(await session.scalars(select(Category.name)))
            times = list(await session.scalars(select(User.created_at).order_by(User.id)))
        await Session.kw["bind"].dispose()
        assert times[0] == given and times[0].utcoffset() == timedelta(0), times
        assert times[1].tzinfo is not None and times[1] <= datetime.now(timezone.utc), times
        assert times[2] == given.replace(tzinfo=timezone.utc), times
        return names

    return asyncio.run(scenario())


def test_app_sessions_on_sqlite_use_aiosqlite(tmp_path: Path, in_tokyo: None) -> None:
    env = sqlite_env(tmp_path)
    commands.migrate(env)
    assert use_the_shop(env) == ["e-books"]


APP_START = """
import logging
from pathlib import Path

logging.basicConfig(level=logging.INFO, format="bot log: %(name)s: %(message)s")
from db import commands
from db.environments import load_environment

commands.migrate(load_environment(Path.cwd(), "t", {}))
logging.getLogger("bot").info("started")
"""


def test_an_app_that_migrates_as_it_starts_keeps_its_own_logging(tmp_path: Path) -> None:
    """alembic.ini's logging replaced the root logger's handlers and level: the bot's own
    INFO lines after the migration were gone, and its warnings in Alembic's format."""
    import subprocess
    import sys

    sqlite_env(tmp_path)
    started = subprocess.run(
        [sys.executable, "-c", APP_START], cwd=tmp_path, capture_output=True, text=True
    )

    assert started.returncode == 0, started.stderr
    assert started.stderr.endswith("bot log: bot: started\n"), started.stderr


def handlers_at_once(env: Environment, handlers: int = 50) -> list[str]:
    """Many of the bot's handlers at once, each in one transaction that reads (the shop's
    categories) and then writes (a user): what each one that failed said."""

    async def handler(Session: async_sessionmaker[AsyncSession], n: int) -> str:
        try:
            async with Session() as session, session.begin():
                await session.scalar(select(func.count()).select_from(Category))
                session.add(User(telegram_id=n))
        except DBAPIError as exc:
            return str(exc.orig)
        return ""

    async def scenario() -> list[str]:
        Session = session_factory(env)
        failed = await asyncio.gather(*(handler(Session, n) for n in range(handlers)))
        async with Session() as session:
            added = await session.scalar(select(func.count()).select_from(User))
        await Session.kw["bind"].dispose()
        assert added == failed.count(""), (added, failed)
        return [reason for reason in failed if reason]

    return asyncio.run(scenario())


def test_the_apps_handlers_that_read_then_write_at_once_all_commit_on_sqlite(
    tmp_path: Path,
) -> None:
    """Two transactions that read and then write at once each waited for the other's read
    lock, and SQLite failed one at once: 'database is locked' for most of 50 handlers on
    dev, where PostgreSQL commits them all (as the next test shows)."""
    env = sqlite_env(tmp_path)
    commands.migrate(env)

    assert handlers_at_once(env) == []


@pytest.mark.postgres
def test_the_apps_handlers_that_read_then_write_at_once_all_commit_on_postgres(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    pg = pg_env(tmp_path, pg_database)
    commands.migrate(pg)

    assert handlers_at_once(pg) == []


@pytest.mark.postgres
def test_app_sessions_on_postgres_use_asyncpg(
    tmp_path: Path, pg_database: PgDatabase, in_tokyo: None
) -> None:
    pg = pg_env(tmp_path, pg_database)
    commands.migrate(pg)
    assert use_the_shop(pg) == ["e-books"]


def socket_options(url: str, env_text: str, tmp_path: Path) -> tuple[int, ...]:
    """What the app's engine for ``url`` set on its socket: SO_KEEPALIVE, TCP_KEEPIDLE,
    TCP_KEEPINTVL, TCP_KEEPCNT and TCP_USER_TIMEOUT (ms); () on a Unix socket."""
    (tmp_path / "environments").mkdir(exist_ok=True)
    (tmp_path / "environments" / "pg.env").write_text(f"DATABASE_URL={url}\n{env_text}")

    async def read() -> tuple[int, ...]:
        engine = async_engine(load_environment(tmp_path, "pg", {}))
        try:
            async with engine.connect() as connection:
                assert await connection.scalar(text("select 1")) == 1
                raw = (await connection.get_raw_connection()).driver_connection
                sock = raw._transport.get_extra_info("socket")  # asyncpg's, as engines.py reads it
                if sock.family == socket.AF_UNIX:
                    return ()
                tcp = (
                    socket.TCP_KEEPIDLE,
                    socket.TCP_KEEPINTVL,
                    socket.TCP_KEEPCNT,
                    socket.TCP_USER_TIMEOUT,
                )
                keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                return (keepalive, *(sock.getsockopt(socket.IPPROTO_TCP, o) for o in tcp))
        finally:
            await engine.dispose()

    return asyncio.run(read())


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("setting", "options"),
    [("", (1, 10, 5, 4, 30000)), ("NETWORK_TIMEOUT=8\n", (1, 2, 1, 4, 8000))],
)
def test_a_connection_gives_a_silent_server_up_after_network_timeout(
    tmp_path: Path, pg_database: PgDatabase, setting: str, options: tuple[int, ...]
) -> None:
    assert socket_options(pg_database.url, setting, tmp_path) == options


@pytest.mark.postgres
def test_network_timeout_0_leaves_the_socket_as_the_system_makes_it(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    assert socket_options(pg_database.url, "NETWORK_TIMEOUT=0\n", tmp_path)[0] == 0


@pytest.mark.postgres
def test_a_unix_socket_connects_without_tcp_options(
    tmp_path: Path, pg_database: PgDatabase, pg_server: str
) -> None:
    sockets = Path("/var/run/postgresql")
    if not any(sockets.glob(f".s.PGSQL.{make_url(pg_server).port or 5432}")):
        cannot(f"the server has no Unix socket in {sockets}")  # TEST_PG_URL elsewhere
    url = make_url(pg_database.url).set(host=None, port=None)
    local = f"{url.render_as_string(hide_password=False)}?host={sockets}"
    assert socket_options(local, "", tmp_path) == ()


@pytest.mark.postgres
@pytest.mark.parametrize("migrating", [True, False])
def test_migration_sessions_keep_no_prepared_statements(
    pg_database: PgDatabase, migrating: bool
) -> None:
    """A migration session prepares its statements unnamed: none is kept, none needs closing."""

    async def kept_statements() -> int:
        engine = make_async_engine(make_url(pg_database.url), migrating=migrating)
        try:
            async with engine.connect() as connection:
                await connection.execute(text("select 1"))
                query = text("select count(*) from pg_prepared_statements")
                return int(await connection.scalar(query) or 0)
        finally:
            await engine.dispose()

    kept = asyncio.run(kept_statements())
    assert kept == 0 if migrating else kept > 0


ODD = '"Shop"."Odd ""Table"""'  # a quoted name in a quoted schema


def inserted_past_sequences(connection: sa.Connection) -> list[str]:
    """What check_sequences says after each insert into ODD, the second with its id; and
    what is noted of an insert once the run is over."""
    connection.execute(text('CREATE SCHEMA "Shop"'))
    connection.execute(text(f"CREATE TABLE {ODD} (id serial PRIMARY KEY, n int)"))
    context = MigrationContext.configure(connection)
    said = []
    with inserts_noted(connection):
        for insert in (
            f"INSERT INTO {ODD} (n) VALUES (1)",
            f"WITH picked AS (SELECT 5 AS id) INSERT INTO {ODD} (id, n) SELECT id, 2 FROM picked",
        ):
            connection.execute(text(insert))
            try:
                check_sequences(context)
                said.append("")
            except MigrationFailed as exc:
                said.append(str(exc))
    connection.execute(text(f"INSERT INTO {ODD} (id, n) VALUES (9, 3)"))  # the run is over
    said.append(str(sorted(connection.info.get(INSERTED, []))))
    connection.rollback()
    return said


@pytest.mark.postgres
def test_ids_inserted_past_a_sequence_are_found_behind_quotes_schemas_and_a_cte(
    pg_database: PgDatabase,
) -> None:
    """The tables a revision inserts into are read from its SQL as written: a quoted name
    in a quoted schema, after a WITH. A row its sequence numbered passes."""

    async def checked() -> list[str]:
        engine = make_async_engine(make_url(pg_database.url), migrating=True)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(inserted_past_sequences)
        finally:
            await engine.dispose()

    numbered, given, after = asyncio.run(checked())

    assert numbered == ""
    assert given.startswith(
        f'the revision inserts ids into {ODD} that its sequence "Shop"."Odd ""Table""_id_seq" '
        "has not given (id reaches 5, the sequence 1)"
    )
    assert after == "[]"  # nothing is noted once the run is over


@pytest.mark.postgres
def test_a_migration_session_takes_its_settings_on_its_own_backend(
    pg_database: PgDatabase,
) -> None:
    """prepare_session applies the settings in the transaction that reads the backend's pid,
    and they stay for the session's later transactions."""
    settings = {"application_name": "settings-test", "lock_timeout": "3s"}

    async def prepared() -> tuple[int, int, list[str]]:
        engine = make_async_engine(make_url(pg_database.url), migrating=True)
        try:
            async with engine.connect() as connection:
                pid = await prepare_session(connection, engine, settings, "environments/t.env")
                shown = text(
                    "select pg_backend_pid(), current_setting('application_name'), "
                    "current_setting('lock_timeout')"
                )
                backend, *values = (await connection.execute(shown)).one()
                return pid, backend, values
        finally:
            await engine.dispose()

    pid, backend, values = asyncio.run(prepared())
    assert pid == backend
    assert values == ["settings-test", "3s"]


@pytest.mark.postgres
def test_a_session_that_already_holds_the_migration_lock_is_refused(
    pg_database: PgDatabase,
) -> None:
    """A session handed over with the lock still held (a shared pooled session) must not
    count the lock as its own: it stops before migrating, and holds the lock once, as before."""

    async def try_twice() -> tuple[str, int]:
        engine = make_async_engine(make_url(pg_database.url), migrating=True)
        held = text("select count(*) from pg_locks where locktype = 'advisory' and pid = :pid")
        try:
            async with engine.connect() as connection:
                pid = int(await connection.scalar(text("select pg_backend_pid()")) or 0)
                async with pg_lock(connection, pid, "alembic_version", 0, print):
                    with pytest.raises(LockLost) as refused:
                        async with pg_lock(connection, pid, "alembic_version", 0, print):
                            pass
                # the outer run's one unlock frees it: the refused one never took it again
                return str(refused.value), int(await connection.scalar(held, {"pid": pid}) or 0)
        finally:
            await engine.dispose()

    message, still_held = asyncio.run(try_twice())
    assert "already held the migration lock" in message
    assert still_held == 0


@pytest.mark.postgres
def test_the_apps_pool_keeps_the_server_below_its_size_under_load(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    """50 handlers at once through POOL_SIZE=5, MAX_OVERFLOW=2: never more than 7 server
    connections, and every transaction done."""
    sqlite_env(tmp_path)
    settings = f"DATABASE_URL={pg_database.url}\nPOOL_SIZE=5\nMAX_OVERFLOW=2\n"
    (tmp_path / "environments" / "pg.env").write_text(settings)
    pg = load_environment(tmp_path, "pg", {})
    commands.migrate(pg)
    count = text(
        "select count(*) from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid()"
    )

    async def scenario() -> tuple[int, int]:
        Session = session_factory(pg)
        monitor_engine = make_async_engine(make_url(pg_database.url))
        seen, done = 0, 0

        async def handler(n: int) -> None:
            nonlocal done
            async with Session() as session, session.begin():
                session.add(Category(name=f"c{n}"))
                await session.execute(text("select pg_sleep(0.02)"))
            done += 1

        async with monitor_engine.connect() as monitor:
            work = asyncio.gather(*(handler(n) for n in range(50)))
            while not work.done():
                seen = max(seen, int(await monitor.scalar(count) or 0))
                await monitor.rollback()
                await asyncio.sleep(0.005)
            await work
        await monitor_engine.dispose()
        await Session.kw["bind"].dispose()
        return seen, done

    seen, done = asyncio.run(scenario())

    assert done == 50
    assert 0 < seen <= 7, seen


def test_alembic_still_has_the_planning_calls_plan_steps_uses() -> None:
    """plan_steps plans like `alembic upgrade`/`downgrade` through these private calls."""
    from alembic.script import ScriptDirectory

    for name in ("_upgrade_revs", "_downgrade_revs"):
        assert hasattr(ScriptDirectory, name), (
            f"Alembic no longer has ScriptDirectory.{name}: db.commands.plan_steps needs "
            "another way to plan, before the upper bound on alembic in pyproject.toml is raised"
        )


def test_alembic_still_moves_the_version_table_as_records_resolve_does() -> None:
    """records.resolve moves the version table after a step through Alembic's own (not
    documented) HeadMaintainer, as Alembic's run_migrations does after each step."""
    from alembic.runtime import migration

    assert hasattr(getattr(migration, "HeadMaintainer", None), "update_to_step"), (
        "Alembic no longer has HeadMaintainer.update_to_step: db.records.resolve needs another "
        "way to record a step, before the upper bound on alembic in pyproject.toml is raised"
    )


def test_an_install_puts_no_copy_of_db_in_site_packages(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.startswith("db/")], names


@pytest.mark.parametrize(
    ("backend", "entries"), [("sqlite", 2), pytest.param("postgres", 1, marks=pytest.mark.postgres)]
)
def test_a_confirmed_migrate_asks_once_and_enters_env_py_once_on_postgres(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    backend: str,
    entries: int,
) -> None:
    """On PostgreSQL the plan is shown and confirmed inside the one run, under the lock. On
    SQLite, whose lock is a write transaction, in a read before it: env.py is entered twice
    (Alembic's run_env is spied on, not replaced)."""
    from alembic.script import ScriptDirectory

    from db.runner import RunOptions

    env = sqlite_env(tmp_path)
    if backend == "postgres":
        url = request.getfixturevalue("pg_database").url
        (tmp_path / "environments" / "pg.env").write_text(f"DATABASE_URL={url}\n")
        env = load_environment(tmp_path, "pg", {})
    entered: list[int] = []
    real_run_env = ScriptDirectory.run_env

    def counted(self: ScriptDirectory) -> None:
        entered.append(1)
        real_run_env(self)

    monkeypatch.setattr(ScriptDirectory, "run_env", counted)
    planned: list[tuple[str, ...]] = []

    steps = commands.migrate(
        env, options=RunOptions(on_plan=lambda plan: planned.append(tuple(r.id for r in plan)))
    )

    assert len(entered) == entries
    assert planned == [(head_revision(),)] == [tuple(step.revision for step in steps)]


def test_a_drivers_message_is_shown_without_the_class_sqlalchemy_2_0_puts_first() -> None:
    """SQLAlchemy 2.0 (what Python 3.10 gets) words an asyncpg error as
    "<class 'asyncpg.exceptions.DivisionByZeroError'>: division by zero"; 2.1 does not."""
    from db.errors import first_line

    worded = ValueError(
        "<class 'asyncpg.exceptions.DivisionByZeroError'>: division by zero\nDETAIL"
    )
    assert first_line(worded) == "division by zero"
    assert (
        first_line(ValueError("column <class 'x'>: kept inside"))
        == "column <class 'x'>: kept inside"
    )


@pytest.mark.postgres
def test_autocommit_is_refused_where_the_schema_is_set_per_transaction(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    """Behind a pooler in transaction mode (MIGRATION_URL set) the app's schema lives in
    each transaction; an AUTOCOMMIT statement ran in the server connection's own schema."""
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "pooled.env").write_text(
        f"DATABASE_URL={pg_database.url}\nMIGRATION_URL={pg_database.url}\nSCHEMA=alpha\n"
    )
    env = load_environment(tmp_path, "pooled", {})

    async def scenario() -> str | None:
        engine = async_engine(env)
        try:
            async with engine.connect() as connection:
                in_transaction = await connection.scalar(text("show search_path"))
            async with engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                with pytest.raises(ConfigError, match="AUTOCOMMIT cannot work in SCHEMA alpha"):
                    await autocommit.scalar(text("show search_path"))
            return in_transaction
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == "alpha"


def test_a_fleets_halt_lets_a_sqlite_run_waiting_for_readers_commit(tmp_path: Path) -> None:
    """A halt (another target failed) lets a running target finish: one that was waiting
    for the app's readers to commit rolled all of its revisions back instead."""
    path = tmp_path / "shop.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        db.executescript("create table users (id integer)")
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("begin")
    reader.execute("select count(*) from users").fetchall()
    stop, notes = Stop(), []
    engine = make_engine(make_url(f"sqlite:///{path}"), migrating=True)

    def halt_then_let_go() -> None:
        wait_until(lambda: notes, "the run to wait for the reader")
        stop.halt("another target failed")
        time.sleep(0.5)  # the run keeps waiting, halted
        reader.execute("commit")

    helper = threading.Thread(target=halt_then_let_go)
    helper.start()
    try:
        with engine.connect() as connection:
            with sqlite_run(connection, 30, notes.append, lambda: None, stop.check):
                connection.exec_driver_sql("create table coupons (id integer)")
    finally:
        helper.join(timeout=30)
        reader.close()
        engine.dispose()

    assert notes == ["waiting up to 30s for readers of this SQLite file to finish"]
    with closing(sqlite3.connect(path)) as db:
        tables = db.execute("select name from sqlite_master").fetchall()
    assert ("coupons",) in tables


@pytest.fixture
def in_tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time 9 hours ahead of UTC, in this process."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_backups_are_ordered_by_when_they_were_taken_in_either_stamp(
    tmp_path: Path, in_tokyo: None
) -> None:
    """Backups are stamped in UTC (``...Z``); an older tool's, in local time, are still
    its own, and take their place by the time they say. A file of their shape whose stamp
    is no time is none of them (reading its time ended the task in a traceback)."""
    from db.backups import backups

    env = sqlite_env(tmp_path)
    folder = tmp_path / "var" / "backups"
    folder.mkdir(parents=True)
    now = datetime.now(timezone.utc)
    names = [
        "t-" + (now - timedelta(hours=1)).strftime("%Y%m%d-%H%M%S-%fZ") + ".sqlite3",
        "t-" + (now - timedelta(hours=2)).astimezone().strftime("%Y%m%d-%H%M%S-%f") + ".sqlite3",
        "t-" + (now - timedelta(hours=3)).strftime("%Y%m%d-%H%M%S-%fZ") + ".sqlite3",
    ]
    for name in [*names, "t-20261340-000000-000000Z.sqlite3"]:  # no 13th month: not a backup
        (folder / name).touch()

    assert [path.name for path in backups(env)] == names


@pytest.mark.parametrize("task", ["reset", "seed"])
def test_the_library_refuses_to_reset_or_seed_a_protected_environment(
    tmp_path: Path, task: str
) -> None:
    """The tasks refuse before they load a secret; the library refuses on its own too, for a
    caller that is not the tasks (the app, a script), and touches nothing."""
    from db.errors import GuardRefused
    from db.reset import reset
    from db.seed import seed

    sqlite_env(tmp_path)  # the project's files beside an env file t, made protected here
    (tmp_path / "environments" / "t.env").write_text(
        "DATABASE_URL=sqlite:///t.sqlite3\nPROTECTED=true\n"
    )
    env = load_environment(tmp_path, "t", {})

    with pytest.raises(GuardRefused, match="t is protected"):
        (reset if task == "reset" else seed)(env)
    assert not (tmp_path / "t.sqlite3").exists()


# a column's types as the models give them and as SQLite and PostgreSQL read them back
COLUMN_TYPES: list[TypeEngine[Any]] = [
    *(sa.VARCHAR(10), sa.Text(), sa.BigInteger(), sa.Integer(), sa.SmallInteger()),
    *(sa.Numeric(10, 2), sa.Float(), postgresql.DOUBLE_PRECISION(), sa.Boolean()),
    *(sa.DateTime(), UTCDateTime(), sa.Date(), sa.Time(), sa.Interval()),
    *(sa.JSON(), postgresql.JSONB(), sa.Uuid(), sa.LargeBinary(), sqlite.DATETIME()),
]


@pytest.mark.postgres
def test_which_type_changes_postgresql_makes_by_itself_is_what_the_server_says(
    pg_database: PgDatabase,
) -> None:
    """For every pair of types, ``converts_itself`` says what the server does with an
    ``ALTER COLUMN ... TYPE`` and no USING; from a text type, the USING of ``using`` does
    it."""

    async def refused(connection: Any, old: TypeEngine[Any], new: TypeEngine[Any]) -> bool:
        """Whether the server refuses the change with no USING; with ``using``'s USING
        (where it gives one) it must make it. Nothing is kept."""
        alter = f'alter table t alter column "Stock" type {sql_type(new)}'
        transaction = connection.transaction()
        await transaction.start()
        try:
            await connection.execute(f'create table t ("Stock" {sql_type(old)})')
            try:
                async with connection.transaction():
                    await connection.execute(alter)
            except (asyncpg.DatatypeMismatchError, asyncpg.CannotCoerceError):
                said = True
            else:
                said = False
            how = using("Stock", old, new)
            if how is not None:
                await connection.execute(f"{alter} using {how}")
            return said
        finally:
            await transaction.rollback()

    async def server_says() -> list[str]:
        connection = await asyncpg.connect(pg_database.dsn, timeout=5)
        try:
            return [
                f"{old!r} -> {new!r}: "
                + ("refused" if await refused(connection, old, new) else "converted")
                for old, new in itertools.permutations(COLUMN_TYPES, 2)
            ]
        finally:
            await connection.close()

    expected = [
        f"{old!r} -> {new!r}: {'converted' if converts_itself(old, new) else 'refused'}"
        for old, new in itertools.permutations(COLUMN_TYPES, 2)
    ]
    assert asyncio.run(server_says()) == expected
    assert using("Stock", sa.VARCHAR(10), sa.BigInteger()) == '"Stock"::BIGINT'
    assert using("stock", sa.Boolean(), sa.Integer()) is None  # no text: the author's call


def test_schema_differences_say_on_which_side_each_thing_is() -> None:
    """A changed table was shown as its two column dicts, whole; a table as "only on one
    side", without saying which."""
    table = {
        "columns": {"id": ("int", False), "name": ("str", True)},
        "primary_key": ("pk_t", ("id",)),
        "foreign_keys": [],
        "unique": [],
        "indexes": [("ix_t_name", ("name",), False)],
    }
    changed = {
        **table,
        "columns": {"id": ("int", False), "name": ("str", False), "age": ("int", True)},
        "primary_key": (None, ("id",)),
        "indexes": [],
    }
    sides = ("in the database", "in what r1 produces")

    assert differences({"t": table, "old": table}, {"t": changed}, sides) == [
        "table old only in the database",
        "column t.age only in what r1 produces",
        "column t.name is str NULL in the database, str NOT NULL in what r1 produces",
        "t primary key is ('pk_t', ('id',)) in the database, (None, ('id',)) in what r1 produces",
        "t indexes ('ix_t_name', ('name',), False) only in the database",
    ]
    assert differences({"t": table}, {"t": table}, sides) == []
