"""Benchmarks: our invoke tasks against plain Alembic and raw SQL, side by side, in one run.

    python -m bench                      # N = 50, 200, 1000; 5 rounds
    python -m bench --sizes 200 --rounds 5 --json bench.json --png bench.png

Each round runs every tool once, interleaved, on a fresh database; the report gives the
median and the min-max of the rounds, the ratios, growth from N=200 to N=1000, and the
targets met or missed. This is a measuring tool, not a test.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench import fleet, pool, report, workspace

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def main() -> None:
    args = parse()
    if args.pool_only:
        print(pool.report(args.pg_admin, args.pool_rounds))
        return
    if args.fleet_only:
        if args.fleet_sizes:
            print(fleet.report(args.pg_admin, args.fleet_sizes, args.rounds))
        if args.schemas:
            print(fleet.schema_report(args.pg_admin, args.schemas, args.rounds))
        return
    results: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        for size in args.sizes:
            print(f"N = {size}: building workspaces", file=sys.stderr)
            bench = Bench(Path(folder) / str(size), size, args.pg_admin, args.postgres)
            for round_ in range(args.rounds):
                print(f"N = {size}: round {round_ + 1} of {args.rounds}", file=sys.stderr)
                for task, tool, seconds in bench.round():
                    results[task][size][tool].append(seconds)
            bench.close()
        checksum_ms = workspace.checksum_validation_ms(Path(folder) / "checksums", max(args.sizes))
    machine = f"{platform.node()} {platform.machine()}, Python {platform.python_version()}"
    print(report.table(results, checksum_ms, max(args.sizes), machine))
    if args.postgres:
        print(pool.report(args.pg_admin, args.pool_rounds))
    if args.json:
        report.write_json(Path(args.json), results, checksum_ms, machine)
    if args.png:
        print(report.write_png(Path(args.png), results), file=sys.stderr)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", default="50,200,1000", help="revision counts (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per size (default: 5)")
    parser.add_argument("--json", help="write the raw timings to this JSON file")
    parser.add_argument("--png", help="draw time against N to this PNG (needs matplotlib)")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="admin DSN (default: %(default)s)")
    parser.add_argument("--no-postgres", dest="postgres", action="store_false")
    parser.add_argument(
        "--pool-only", action="store_true", help="only the app's pooled engine against NullPool"
    )
    parser.add_argument(
        "--pool-rounds",
        type=int,
        default=pool.ROUNDS,
        help="interleaved rounds of the pool comparison (default: %(default)s)",
    )
    parser.add_argument("--fleet-only", action="store_true", help="only the fleet comparison")
    parser.add_argument(
        "--fleet-sizes", default="30,120", help="databases in the fleet (default: %(default)s)"
    )
    parser.add_argument(
        "--schemas", type=int, default=200, help="schemas in the schema fleet (0: none)"
    )
    args = parser.parse_args()
    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.fleet_sizes = [int(size) for size in args.fleet_sizes.split(",") if size]
    return args


class Bench:
    """The workspaces for one N, and how to time each task in them."""

    def __init__(self, root: Path, size: int, pg_admin: str, postgres: bool) -> None:
        self.root, self.size, self.pg_admin, self.postgres = root, size, pg_admin, postgres
        self.pg_base = pg_admin.rsplit("/", 1)[0]
        ours_pg = f"{self.pg_base.replace('postgresql://', 'postgresql+asyncpg://')}/bench_ours"
        self.ours = workspace.project(root / "ours", size, "bench", "sqlite:///var/bench.sqlite3")
        (self.ours / "environments" / "benchpg.env").write_text(f"DATABASE_URL={ours_pg}\n")
        self.models = workspace.project(
            root / "models", size, "bench", "sqlite:///var/bench.sqlite3", models=True
        )
        self.plain = workspace.plain_alembic(
            root / "plain", size, "generic", f"sqlite:///{root / 'plain.sqlite3'}"
        )
        plain_pg = f"{self.pg_base.replace('postgresql://', 'postgresql+asyncpg://')}/bench_plain"
        self.plain_pg = workspace.plain_alembic(root / "plain_pg", size, "async", plain_pg)
        self.floor_sqlite = workspace.floor_sql(self.plain, root / "floor.sqlite.sql", "sqlite")
        self.floor_pg = workspace.floor_sql(self.plain_pg, root / "floor.pg.sql", "postgresql")
        run([*INVOKE, "migrate", "--env=bench"], self.models)  # check needs a migrated database
        self._warm_up()

    def round(self) -> list[tuple[str, str, float]]:
        timed = []
        timed += self._migrate_sqlite()
        if self.postgres:
            timed += self._migrate_postgres()
        timed.append(("status", "ours", run([*INVOKE, "status", "--env=bench"], self.ours)))
        timed.append(("status", "alembic", run([*ALEMBIC, "current"], self.plain)))
        timed.append(("invoke --list", "ours", run([*INVOKE, "--list"], self.ours)))
        timed.append(
            (report.IMPORTS, "python", run([sys.executable, "-c", IMPORT_LINE], self.root))
        )
        offline = [*INVOKE, "offline-sql", "--env=benchpg"]
        timed.append(("offline-sql", "ours", run(offline, self.ours)))
        timed.append(
            ("offline-sql", "alembic", run([*ALEMBIC, "upgrade", "head", "--sql"], self.plain_pg))
        )
        timed.append(("check", "ours", run([*INVOKE, "check", "--env=bench"], self.models)))
        return timed

    def _migrate_sqlite(self) -> list[tuple[str, str, float]]:
        databases = [
            self.ours / "var" / "bench.sqlite3",
            self.root / "plain.sqlite3",
            self.root / "floor.sqlite3",
        ]
        for database in databases:
            database.unlink(missing_ok=True)
        return [
            ("migrate sqlite", "ours", run([*INVOKE, "migrate", "--env=bench"], self.ours)),
            ("migrate sqlite", "alembic", run([*ALEMBIC, "upgrade", "head"], self.plain)),
            (
                "migrate sqlite",
                "floor",
                run(
                    ["sqlite3", "-bail", str(databases[2]), f".read {self.floor_sqlite}"], self.root
                ),
            ),
        ]

    def _migrate_postgres(self) -> list[tuple[str, str, float]]:
        self._fresh("bench_ours", "bench_plain", "bench_floor")
        floor = workspace.psql_floor(f"{self.pg_base}/bench_floor", self.floor_pg)
        return [
            (
                "migrate postgres",
                "ours",
                self._settled(INVOKE + ["migrate", "--env=benchpg"], self.ours),
            ),
            (
                "migrate postgres",
                "alembic",
                self._settled(ALEMBIC + ["upgrade", "head"], self.plain_pg),
            ),
            ("migrate postgres", "floor", self._settled(floor, self.root)),
        ]

    def _fresh(self, *names: str) -> None:
        for name in names:
            self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self._psql(f'CREATE DATABASE "{name}"')

    def _settled(self, command: list[str], cwd: Path) -> float:
        """Time a PostgreSQL run after a checkpoint, so no tool pays for the writes of the
        previous one (or of CREATE DATABASE): without it the rounds varied by a factor of 2."""
        self._psql("CHECKPOINT")
        return run(command, cwd)

    def _psql(self, sql: str) -> None:
        subprocess.run(["psql", "-X", "-q", "-d", self.pg_admin, "-c", sql], check=True)

    def _warm_up(self) -> None:
        """Compile every revision to bytecode once, so no round pays for it."""
        self.round()

    def close(self) -> None:
        if self.postgres:
            for name in ("bench_ours", "bench_plain", "bench_floor"):
                self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


INVOKE, ALEMBIC, run = workspace.INVOKE, workspace.ALEMBIC, workspace.run
# what every Alembic-based tool on asyncpg imports before it can do anything
IMPORT_LINE = "import alembic.command, sqlalchemy.ext.asyncio, asyncpg"


if __name__ == "__main__":
    main()
