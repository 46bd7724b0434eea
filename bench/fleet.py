"""A fleet of PostgreSQL databases: `invoke migrate` on every target against the loops
people write today, and the raw SQL floor, interleaved, fresh databases each round.

    python -m bench --fleet-only [--fleet-sizes 30,120] [--rounds 3]

Each target gets the same 20 synthetic revisions. The anchors: a shell-style loop of plain
`alembic upgrade head` (the stock async template), one database after another; the same
loop two at a time (`xargs -P2`); and `psql -1` of the offline SQL per database. A second
`invoke migrate` over the migrated fleet is the no-op run, against a no-op loop and against
one `invoke status` of one of its databases (the issue: "about as fast as one status").
Every run of it so far, and where a run's time goes: bench/FLEET.md.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import workspace

REVISIONS = 20
INVOKE, ALEMBIC = workspace.INVOKE, workspace.ALEMBIC


def report(pg_admin: str, sizes: list[int], rounds: int) -> str:
    base = pg_admin.rsplit("/", 1)[0]
    lines = ["", f"Fleet, {REVISIONS} revisions per database; seconds, median of {rounds}:"]
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as folder:
        root = Path(folder)
        async_base = base.replace("postgresql://", "postgresql+asyncpg://")
        ours = workspace.project(root / "ours", REVISIONS, "x", "sqlite:///unused.sqlite3")
        plain = workspace.plain_alembic(root / "plain", REVISIONS, "async", f"{async_base}/x")
        floor = workspace.floor_sql(plain, root / "floor.sql", "postgresql")
        for size in sizes:
            names = [f"t{n:03d}" for n in range(size)]
            env = f"DATABASE_URL={async_base}/fleet_{{target}}\nTARGETS={','.join(names)}\n"
            (ours / "environments" / "fleet.env").write_text(env)
            one = f"DATABASE_URL={async_base}/fleet_{names[0]}\n"  # one database of the fleet
            (ours / "environments" / "one.env").write_text(one)
            inis = _inis(plain, async_base, names)
            timings: dict[str, list[float]] = {}
            for _ in range(rounds):
                for label, seconds in _round(pg_admin, base, names, ours, plain, inis, floor):
                    timings.setdefault(label, []).append(seconds)
            _drop(pg_admin, names)
            lines += _lines(size, {k: statistics.median(v) for k, v in timings.items()})
    return "\n".join(lines)


def _round(pg_admin, base, names, ours, plain, inis, floor):  # type: ignore[no-untyped-def]
    out = []
    _fresh(pg_admin, names)
    out.append(("ours", workspace.run([*INVOKE, "migrate", "--env=fleet"], ours)))
    out.append(("ours no-op", workspace.run([*INVOKE, "migrate", "--env=fleet"], ours)))
    out.append(("one status", workspace.run([*INVOKE, "status", "--env=one"], ours)))
    _fresh(pg_admin, names)
    out.append(("alembic loop", _loop(inis, plain, 1)))
    out.append(("alembic no-op loop", _loop(inis, plain, 1)))
    _fresh(pg_admin, names)
    out.append(("alembic xargs -P2", _loop(inis, plain, 2)))
    _fresh(pg_admin, names)
    psql = [workspace.psql_floor(f"{base}/fleet_{n}", floor) for n in names]
    started = time.perf_counter()
    for command in psql:
        subprocess.run(command, check=True, capture_output=True)
    out.append(("raw SQL floor", time.perf_counter() - started))
    return out


def _lines(size: int, median: dict[str, float]) -> list[str]:
    ours, loop, floor = median["ours"], median["alembic loop"], median["raw SQL floor"]
    noop, noop_loop = median["ours no-op"], median["alembic no-op loop"]
    return [
        f"  {size} databases: ours {ours:.2f}, alembic loop {loop:.2f}, "
        f"xargs -P2 {median['alembic xargs -P2']:.2f}, floor {floor:.2f}: "
        f"ours/loop {ours / loop:.3f} (target 0.15), ours/floor {ours / floor:.2f}",
        # the target in terms of the floor: how far above raw SQL 0.15x the loop leaves room
        f"  {size} databases: the floor itself is {floor / loop:.3f}x the loop, so 0.15x the "
        f"loop is {0.15 * loop / floor:.2f}x the floor",
        f"  {size} databases, nothing to do: ours {noop:.2f}, alembic loop {noop_loop:.2f}: "
        f"{noop / noop_loop:.3f} (target 0.05); one `invoke status` {median['one status']:.2f}: "
        f"{noop / median['one status']:.2f}x it (target: about 1x)",
    ]


def _inis(plain: Path, async_base: str, names: list[str]) -> list[Path]:
    text = (plain / "alembic.ini").read_text()
    inis = []
    for name in names:
        ini = plain / f"alembic_{name}.ini"
        ini.write_text(text.replace(f"{async_base}/x", f"{async_base}/fleet_{name}"))
        inis.append(ini)
    return inis


def _loop(inis: list[Path], cwd: Path, parallel: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(
            pool.map(
                lambda ini: workspace.run([*ALEMBIC, "-c", str(ini), "upgrade", "head"], cwd), inis
            )
        )
    return time.perf_counter() - started


def _fresh(pg_admin: str, names: list[str]) -> None:
    _drop(pg_admin, names)
    for name in names:
        _psql(pg_admin, f'CREATE DATABASE "fleet_{name}"')
    _psql(pg_admin, "CHECKPOINT")


def _drop(pg_admin: str, names: list[str]) -> None:
    for name in names:
        _psql(pg_admin, f'DROP DATABASE IF EXISTS "fleet_{name}" WITH (FORCE)')


def _psql(pg_admin: str, sql: str) -> None:
    subprocess.run(["psql", "-X", "-q", "-d", pg_admin, "-c", sql], check=True, capture_output=True)


# --- schema per tenant: many schemas in one database ------------------------------------

SCHEMA_REVISIONS = 5
# The Alembic cookbook's schema-per-tenant recipe, added to the stock async env.py:
# `alembic -x tenant=NAME upgrade head` works in that schema alone.
_TENANT_ENV = """
def do_run_migrations(connection: Connection) -> None:
    tenant = context.get_x_argument(as_dictionary=True)["tenant"]
    connection.execute(text(f'create schema if not exists "{tenant}"'))
    connection.execute(text(f'set search_path to "{tenant}"'))
    connection.commit()
    connection.dialect.default_schema_name = tenant
    context.configure(
        connection=connection, target_metadata=target_metadata, version_table_schema=tenant
    )
    with context.begin_transaction():
        context.run_migrations()
"""


def schema_report(pg_admin: str, count: int, rounds: int) -> str:
    """``count`` schemas in one database, ``SCHEMA_REVISIONS`` revisions each."""
    base = pg_admin.rsplit("/", 1)[0]
    async_base = base.replace("postgresql://", "postgresql+asyncpg://")
    names = [f"s{n:03d}" for n in range(count)]
    lines = ["", f"Schemas, {SCHEMA_REVISIONS} revisions each, one database; median of {rounds}:"]
    with tempfile.TemporaryDirectory(prefix="bench-schemas-") as folder:
        root = Path(folder)
        ours = workspace.project(root / "ours", SCHEMA_REVISIONS, "x", "sqlite:///unused.sqlite3")
        env = f"DATABASE_URL={async_base}/fleet_schemas\nSCHEMA={{target}}\n"
        (ours / "environments" / "tenants.env").write_text(env + f"TARGETS={','.join(names)}\n")
        plain = workspace.plain_alembic(
            root / "plain", SCHEMA_REVISIONS, "async", f"{async_base}/fleet_schemas"
        )
        _tenant_env(plain / "migrations" / "env.py")
        floor = workspace.floor_sql(plain, root / "floor.sql", "postgresql")
        timings: dict[str, list[float]] = {}
        for _ in range(rounds):
            for label, seconds in _schema_round(pg_admin, base, names, ours, plain, floor):
                timings.setdefault(label, []).append(seconds)
        _drop(pg_admin, ["schemas"])
    median = {k: statistics.median(v) for k, v in timings.items()}
    ours_s, loop, floor_s = median["ours"], median["alembic loop"], median["raw SQL floor"]
    lines.append(
        f"  {count} schemas: ours {ours_s:.2f}, alembic -x tenant loop {loop:.2f}, "
        f"floor {floor_s:.2f}: ours/loop {ours_s / loop:.2f}, ours/floor {ours_s / floor_s:.2f}; "
        f"nothing to do: ours {median['ours no-op']:.2f}"
    )
    return "\n".join(lines)


def _tenant_env(path: Path) -> None:
    text = path.read_text()
    start = text.index("def do_run_migrations")
    end = text.index("async def run_async_migrations")
    text = text[:start] + _TENANT_ENV.lstrip() + "\n\n" + text[end:]
    path.write_text("from sqlalchemy import text\n" + text)


def _schema_round(pg_admin, base, names, ours, plain, floor):  # type: ignore[no-untyped-def]
    out = []
    _fresh(pg_admin, ["schemas"])
    out.append(("ours", workspace.run([*INVOKE, "migrate", "--env=tenants"], ours)))
    out.append(("ours no-op", workspace.run([*INVOKE, "migrate", "--env=tenants"], ours)))
    _fresh(pg_admin, ["schemas"])
    started = time.perf_counter()
    for name in names:
        workspace.run([*ALEMBIC, "-x", f"tenant={name}", "upgrade", "head"], plain)
    out.append(("alembic loop", time.perf_counter() - started))
    _fresh(pg_admin, ["schemas"])
    sql = floor.read_text()
    started = time.perf_counter()
    for name in names:
        script = f'CREATE SCHEMA "{name}";\nSET search_path TO "{name}";\n{sql}'
        done = subprocess.run(
            [*workspace.psql_floor(f"{base}/fleet_schemas", floor)[:-2], "-f", "-"],
            input=script,
            text=True,
            capture_output=True,
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
    out.append(("raw SQL floor", time.perf_counter() - started))
    return out
