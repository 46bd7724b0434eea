"""What the bot imports: an async engine and session factory for a named environment."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from db.engines import make_async_engine
from db.environments import Environment

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "sqlite+pysqlite": "sqlite+aiosqlite"}


POOL_DEFAULTS = {"POOL_SIZE": 5, "MAX_OVERFLOW": 10, "POOL_TIMEOUT": 30, "POOL_RECYCLE": 1800}


def async_engine(env: Environment) -> AsyncEngine:
    """The app's async engine for ``env`` (aiosqlite for SQLite, asyncpg for PostgreSQL),
    with a pool of connections sized by the env file's ``POOL_*`` keys, working in ``SCHEMA``
    if the env file names one."""
    url = env.url(app=True)
    url = url.set(drivername=_ASYNC_DRIVERS.get(url.drivername, url.drivername))
    pool = {key.lower(): env.number(key, default) for key, default in POOL_DEFAULTS.items()}
    return make_async_engine(url, connect_timeout=env.connect_timeout, pool=pool, schema=env.schema)


def session_factory(env: Environment) -> async_sessionmaker[AsyncSession]:
    """Sessions for the bot's handlers, e.g. ``async with Session() as session: ...``."""
    return async_sessionmaker(async_engine(env), expire_on_commit=False)
