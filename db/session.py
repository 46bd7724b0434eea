"""What the bot imports: an async engine and session factory for a named environment."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from db.engines import CONNECT_TIMEOUT, make_async_engine
from db.environments import Environment

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "sqlite+pysqlite": "sqlite+aiosqlite"}


def async_engine(env: Environment) -> AsyncEngine:
    """An async engine for ``env``: aiosqlite for SQLite, asyncpg for PostgreSQL."""
    url = env.url(app=True)
    url = url.set(drivername=_ASYNC_DRIVERS.get(url.drivername, url.drivername))
    return make_async_engine(url, connect_timeout=env.number("CONNECT_TIMEOUT", CONNECT_TIMEOUT))


def session_factory(env: Environment) -> async_sessionmaker[AsyncSession]:
    """Sessions for the bot's handlers, e.g. ``async with Session() as session: ...``."""
    return async_sessionmaker(async_engine(env), expire_on_commit=False)
