"""The app's pooled engine against a pool-less one: 2,000 short shop transactions.

    python -m bench --pool-only

Each transaction reads a product and inserts a purchase, through ``session_factory`` (a
pool: ``POOL_SIZE=5``, ``MAX_OVERFLOW=5``) and through the same sessions on a ``NullPool``
engine (a new connection each time, as the app had before), one after another and as 50
concurrent tasks. Each round runs both, interleaved, so a slow moment of the machine (a
commit's fsync varies a lot on a VM) falls on both. It prints the median transactions per
second, the ratio per round (median and range), and the most connections the server saw.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from statistics import median

import asyncpg
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.engines import make_async_engine
from db.environments import load_environment
from db.models import Base, Category, Product, Purchase, User
from db.session import session_factory

TRANSACTIONS = 2000
CONCURRENT = 50
ROUNDS = 3


def report(pg_admin: str, rounds: int = ROUNDS) -> str:
    """The comparison, as lines of text."""
    return asyncio.run(_report(pg_admin, max(1, rounds)))


async def _report(pg_admin: str, rounds: int) -> str:
    name = f"bench_pool_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_admin)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + name
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pool-") as folder:
            (Path(folder) / "environments").mkdir()
            settings = f"DATABASE_URL={url}\nPOOL_SIZE=5\nMAX_OVERFLOW=5\n"
            (Path(folder) / "environments" / "pool.env").write_text(settings)
            pooled = session_factory(load_environment(Path(folder), "pool", {}))
            bare = async_sessionmaker(make_async_engine(make_url(url)), expire_on_commit=False)
            await _shop(bare)
            lines = [
                "",
                f"App sessions, 2,000 transactions (read a product, insert a purchase), "
                f"median of {rounds} interleaved rounds:",
            ]
            for label, run in (("sequential", _sequential), ("50 concurrent", _concurrent)):
                unpooled, with_pool, ratios, most = [], [], [], 0
                for _ in range(rounds):
                    bare_seconds, _ = await _timed(run, bare, url)
                    pooled_seconds, seen = await _timed(run, pooled, url)
                    unpooled.append(bare_seconds)
                    with_pool.append(pooled_seconds)
                    ratios.append(bare_seconds / pooled_seconds)
                    most = max(most, seen)
                lines.append(
                    f"  {label:<14} pooled {TRANSACTIONS / median(with_pool):7.0f}/s, NullPool "
                    f"{TRANSACTIONS / median(unpooled):7.0f}/s: {median(ratios):.1f}x faster "
                    f"({min(ratios):.1f}-{max(ratios):.1f}x); "
                    f"at most {most} server connections (pool 5 + overflow 5)"
                )
            for factory in (pooled, bare):
                await factory.kw["bind"].dispose()
            return "\n".join(lines)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _shop(factory: async_sessionmaker[AsyncSession]) -> None:
    engine = factory.kw["bind"]
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    async with factory() as session, session.begin():
        category = Category(name="e-books")
        session.add_all([category, User(telegram_id=1)])
        session.add(Product(category=category, name="guide", price=Decimal("9.90")))


async def _one(factory: async_sessionmaker[AsyncSession], n: int) -> None:
    async with factory() as session, session.begin():
        product = (await session.scalars(select(Product).limit(1))).one()
        session.add(
            Purchase(user_id=1, product_id=product.id, price=product.price, payment_id=f"p{n}")
        )


async def _sequential(factory: async_sessionmaker[AsyncSession], offset: int) -> None:
    for n in range(TRANSACTIONS):
        await _one(factory, offset + n)


async def _concurrent(factory: async_sessionmaker[AsyncSession], offset: int) -> None:
    per_task = TRANSACTIONS // CONCURRENT

    async def worker(k: int) -> None:
        for n in range(per_task):
            await _one(factory, offset + k * per_task + n)

    await asyncio.gather(*(worker(k) for k in range(CONCURRENT)))


_runs = 0


async def _timed(
    run: Callable[[async_sessionmaker[AsyncSession], int], Awaitable[None]],
    factory: async_sessionmaker[AsyncSession],
    url: str,
) -> tuple[float, int]:
    """Seconds for one run, and the most connections the server saw meanwhile."""
    global _runs
    _runs += 1
    watcher = make_async_engine(make_url(url))
    count = text(
        "select count(*) from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid()"
    )
    most = 0
    async with watcher.connect() as watch:
        started = time.perf_counter()
        work = asyncio.ensure_future(run(factory, _runs * 1_000_000))
        while not work.done():
            most = max(most, int(await watch.scalar(count) or 0))
            await watch.rollback()
            await asyncio.sleep(0.01)
        await work
        seconds = time.perf_counter() - started
    await watcher.dispose()
    return seconds, most
