"""A small, realistic shop for the dev database, written through the app's async session."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from db.backups import check_writable
from db.connections import connect_async, run_coroutine
from db.engines import sqlite_file_missing
from db.environments import Environment
from db.errors import BrokenModels, DbError, GuardRefused, first_line
from db.failures import what_to_do
from db.session import session_factory

try:
    from db.models import Category, Product, Purchase, User
except Exception as exc:  # the models being edited: named, not a traceback
    raise BrokenModels.of(exc) from exc

USERS = [(100001, "anna_k", "Anna"), (100002, "boris", "Boris"), (100003, None, "Chen")]
CATEGORIES = ["E-books", "Courses", "Templates"]
PRODUCTS = [
    ("E-books", "Async Python in Practice", "450.00"),
    ("E-books", "PostgreSQL for Bot Makers", "390.00"),
    ("Courses", "Telegram Bots from Zero", "1990.00"),
    ("Templates", "Shop Bot Starter Kit", "990.00"),
]
TRIES = 3  # seeds run at once (an app's replicas each seeding on start) add rows in turn
PURCHASES = [  # payment id, buyer, product
    ("pay-0001", 100001, "Async Python in Practice"),
    ("pay-0002", 100001, "Shop Bot Starter Kit"),
    ("pay-0003", 100002, "Telegram Bots from Zero"),
]


def seed(env: Environment, stopped: Callable[[], None] = lambda: None) -> dict[str, int]:
    """Add what is missing of the sample shop; returns how many rows of each were added.
    ``stopped`` raises to give up connecting (a signal to a fleet's worker)."""
    if env.protected:
        raise GuardRefused(f"{env.name} is protected: seed data is for development databases")
    migrate_first = f"run `invoke migrate {env.flags}` first"
    url = env.url(app=True)
    if sqlite_file_missing(url):  # the app's engine would make an empty one
        raise DbError(f"cannot seed {env.label}: it has no database yet ({migrate_first})")
    if url.get_backend_name() == "sqlite":  # else SQLite's "attempt to write a readonly database"
        check_writable(env, Path(url.database or ""))
    try:
        return run_coroutine(_seed(env, stopped))
    except DBAPIError as exc:
        said = first_line(exc)
        behind = any(words in said for words in ("no such", "does not exist"))  # table, column
        fix = migrate_first if behind else "nothing was added"
        advice = what_to_do(exc, env.flags, env.url(need_secrets=False, app=True).username)
        more = f"\n{advice}" if advice else ""  # a corrupt or locked SQLite file, a standby...
        raise DbError(f"cannot seed {env.label}: {said} ({fix}){more}") from exc


def described(added: dict[str, int]) -> str:
    """What a seed added, in words."""
    if not any(added.values()):
        return "the sample shop is already there: nothing added"
    return "added " + ", ".join(f"{count} {kind}" for kind, count in added.items())


async def _seed(env: Environment, stopped: Callable[[], None]) -> dict[str, int]:
    sessions = session_factory(env)
    engine = sessions.kw["bind"]
    try:  # connected first: the driver's own error for a server that is down is no DBAPIError
        async with (
            connect_async(engine, 0, stopped) as connection,
            sessions(bind=connection) as session,
        ):
            for _ in range(TRIES - 1):
                with suppress(IntegrityError):  # another seed added a row first: look again
                    return await _add(session)
            return await _add(session)
    finally:
        await engine.dispose()


async def _add(session: AsyncSession) -> dict[str, int]:
    """What is missing, added in one transaction."""
    async with session.begin():
        return {
            "users": await _users(session),
            "categories": await _categories(session),
            "products": await _products(session),
            "purchases": await _purchases(session),
        }


async def _users(session: AsyncSession) -> int:
    known = set(await session.scalars(select(User.telegram_id)))
    new = [User(telegram_id=t, username=u, first_name=f) for t, u, f in USERS if t not in known]
    session.add_all(new)
    return len(new)


async def _categories(session: AsyncSession) -> int:
    known = set(await session.scalars(select(Category.name)))
    new = [Category(name=name) for name in CATEGORIES if name not in known]
    session.add_all(new)
    await session.flush()
    return len(new)


async def _products(session: AsyncSession) -> int:
    categories = {c.name: c for c in await session.scalars(select(Category))}
    known = set(await session.scalars(select(Product.name)))
    new = [
        Product(category=categories[cat], name=name, price=Decimal(price))
        for cat, name, price in PRODUCTS
        if name not in known
    ]
    session.add_all(new)
    await session.flush()
    return len(new)


async def _purchases(session: AsyncSession) -> int:
    users = {u.telegram_id: u for u in await session.scalars(select(User))}
    products = {p.name: p for p in await session.scalars(select(Product))}
    known = set(await session.scalars(select(Purchase.payment_id)))
    new = [
        Purchase(
            user=users[buyer], product=products[item], price=products[item].price, payment_id=pay
        )
        for pay, buyer, item in PURCHASES
        if pay not in known
    ]
    session.add_all(new)
    return len(new)
