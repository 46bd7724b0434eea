"""What the bot imports: an async engine and session factory for a named environment."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from db.engines import make_async_engine
from db.environments import Environment
from db.errors import ConfigError

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "sqlite+pysqlite": "sqlite+aiosqlite"}


POOL_COUNTS = {"POOL_SIZE": 5, "MAX_OVERFLOW": 10}  # connections
POOL_SECONDS = {"POOL_TIMEOUT": 30.0, "POOL_RECYCLE": 1800.0}


def async_engine(env: Environment, target: str = "") -> AsyncEngine:
    """The app's async engine for ``env`` (aiosqlite for SQLite, asyncpg for PostgreSQL),
    with a pool of connections sized by the env file's ``POOL_*`` keys, working in ``SCHEMA``
    if the env file names one. On a fleet, ``target`` names the shop whose database (or
    schema) it is. With ``MIGRATION_URL`` set, ``DATABASE_URL`` is a pooler in transaction
    mode, and the engine is made for it (see :func:`db.engines.make_async_engine`)."""
    env = shop(env, target)
    url = env.url(app=True)
    url = url.set(drivername=_ASYNC_DRIVERS.get(url.drivername, url.drivername))
    pool: dict[str, float] = {key.lower(): env.count(key, n) for key, n in POOL_COUNTS.items()}
    pool.update({key.lower(): env.number(key, s) for key, s in POOL_SECONDS.items()})
    pooler = bool(env.get("MIGRATION_URL"))  # what it is for: DATABASE_URL is a pooler
    return make_async_engine(
        url,
        connect_timeout=env.connect_timeout,
        pool=pool,
        search_path=env.search_path,
        pooler=pooler,
        network_timeout=env.network_timeout,
    )


def session_factory(env: Environment, target: str = "") -> async_sessionmaker[AsyncSession]:
    """Sessions for the bot's handlers, e.g. ``async with Session() as session: ...``; on a
    fleet, one shop's: ``session_factory(env, target="alpha")``."""
    return async_sessionmaker(async_engine(env, target), expire_on_commit=False)


def shop(env: Environment, target: str) -> Environment:
    """The environment of the fleet target ``target`` (exactly that name), or ``env`` itself
    when it is one database."""
    from db import fleet

    if not fleet.is_fleet(env) or env.target:
        if target:
            raise ConfigError(f"{env.label} is one database, not a fleet: it has no {target!r}")
        return env
    if not target:
        raise ConfigError(
            f"{env.name} is a fleet: name the shop, e.g. target={fleet.targets(env)[0].name!r}"
        )
    for found in fleet.targets(env):
        if found.name == target:
            return fleet.environment(env, found)
    raise ConfigError(f"{env.name} has no target {target!r}")
