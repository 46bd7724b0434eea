"""Named environments: ``environments/NAME.env`` plus an optional ``NAME.local.env``.

Keys come only from those files; the process environment never replaces one. It feeds
only ``${VAR}`` references inside values (``${VAR:-default}`` as python-dotenv reads it;
``$$`` writes a literal ``$``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv.parser import parse_stream
from sqlalchemy.engine import URL

from db.errors import ConfigError
from db.urls import parse_url

ENV_DIR = "environments"
CONNECT_TIMEOUT = 10.0  # seconds, unless the env file says otherwise
NETWORK_TIMEOUT = 30.0  # seconds a connection may go silent before either side gives up
SECRET_KEYS = ("DATABASE_URL", "MIGRATION_URL", "DATABASE_PASSWORD")
# every key the tasks and the app's sessions read from an env file (README, "Environments")
SETTINGS = (
    *SECRET_KEYS,
    *("CONNECT_TIMEOUT", "CONNECT_WAIT", "PROTECTED", "SCHEMA", "SHARED_SCHEMAS"),
    *("BACKUP", "BACKUP_KEEP"),
    *(
        "NETWORK_TIMEOUT",
        "LOCK_TIMEOUT",
        "STATEMENT_TIMEOUT",
        "APPLICATION_NAME",
        "CLIENT_CHECK_INTERVAL",
    ),
    *("TARGETS", "TARGETS_FILE", "TARGETS_QUERY", "TARGETS_DATABASE_URL"),
    *("MAX_CONNECTIONS_PER_HOST", "RUNS_KEEP"),
    *("POOL_SIZE", "MAX_OVERFLOW", "POOL_TIMEOUT", "POOL_RECYCLE"),
)
CATALOG_KEY = "TARGETS_DATABASE_URL"  # a fleet's catalog of targets
_NAME = re.compile(r"[A-Za-z0-9_-]+")
NAME_MAX = 64  # an environment's or a target's name, as the audit trail's columns keep it
# PostgreSQL cuts a longer name to 63 bytes: two long tenants' schemas would be one
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
SCHEMA_RULE = (
    "must start with an ASCII letter or _, hold ASCII letters, digits and _ only, and be 63 at most"
)
_DURATION = re.compile(r"\d+(\.\d+)?\s*(us|ms|s|min|h|d)?")
_BARE = re.compile(r"[\d.]+")  # a duration without its unit (0 alone is clear: no limit)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")  # a key that may be named in a message
_COLON = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*:(?!//)")
_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DOLLARS = re.compile(r"\$\$|\$\{[^}]*\}?")  # what _REFERENCE must match whole, or refuse


@dataclass(frozen=True)
class Environment:
    """One loaded environment: its expanded values and where each came from."""

    name: str
    root: Path
    values: Mapping[str, str]
    sources: Mapping[str, Path]
    missing: Mapping[str, str] = field(default_factory=dict)  # key -> unset variable
    warnings: tuple[str, ...] = ()
    target: str = ""  # the fleet target this environment was made for, if any

    @property
    def label(self) -> str:
        """The name that tells this database apart: ``shops.alpha`` for a fleet target."""
        return f"{self.name}.{self.target}" if self.target else self.name

    @property
    def flags(self) -> str:
        """What names this database on the command line, for the commands messages suggest:
        ``--env=shops --only=alpha`` for a fleet target (its one-target tasks need both)."""
        return f"--env={self.name} --only={self.target}" if self.target else f"--env={self.name}"

    @property
    def schema(self) -> str | None:
        """``SCHEMA``: the PostgreSQL schema that holds the tables, the version table and the
        audit trail (schema-per-tenant fleets); None: the server's default (``public``)."""
        name = self.get("SCHEMA").strip()
        if not name:
            return None
        if not SCHEMA_NAME.fullmatch(name):
            where = self.relative(self.sources.get("SCHEMA", self.root))
            raise ConfigError(f"{where}: SCHEMA {SCHEMA_RULE}, not {name!r}")
        return name

    @property
    def search_path(self) -> tuple[str, ...]:
        """Each connection's search path on PostgreSQL: ``SCHEMA``, then ``SHARED_SCHEMAS``
        (commas or whitespace), where what every tenant uses and none owns lives: an
        extension's types, functions and operator classes. (): the server's own."""
        shared = self.get("SHARED_SCHEMAS").replace(",", " ").split()
        where = self.relative(self.sources.get("SHARED_SCHEMAS", self.root))
        for name in shared:
            if not SCHEMA_NAME.fullmatch(name):
                raise ConfigError(f"{where}: each of SHARED_SCHEMAS {SCHEMA_RULE}, not {name!r}")
        schema = self.schema
        if shared and schema is None:  # the server's search path has public already
            raise ConfigError(
                f"{where}: SHARED_SCHEMAS goes after SCHEMA on the search path: set SCHEMA "
                "(the schema the tables live in), or remove SHARED_SCHEMAS"
            )
        return (schema, *shared) if schema else ()

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    @property
    def protected(self) -> bool:
        """``PROTECTED=true``: migrate asks first, destructive tasks refuse."""
        return self.flag("PROTECTED")

    @property
    def backup(self) -> str:
        """``BACKUP``: ``pg_dump`` to dump a PostgreSQL database before a migrate, or ""
        (SQLite files are always copied, unless ``BACKUP_KEEP=0``)."""
        text = self.get("BACKUP").strip().lower()
        if text in ("", "pg_dump"):
            return text
        where = self.relative(self.sources["BACKUP"])
        raise ConfigError(
            f"{where}: BACKUP takes only pg_dump (a PostgreSQL dump before each migrate), not "
            f"{text!r}; SQLite is always copied first, and BACKUP_KEEP=0 takes no backups"
        )

    def flag(self, key: str) -> bool:
        """A yes/no setting: true/false, yes/no, on/off, 1/0; anything else is an error."""
        text = self.get(key).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        where = self.relative(self.sources[key])
        raise ConfigError(
            f"{where}: {key} must be true or false (or yes/no, on/off, 1/0), not {text!r}"
        )

    def duration(self, key: str, default: str) -> str:
        """A PostgreSQL time setting (``5s``, ``15min``, ``500ms``, ``0``), checked here so a
        typo is a configuration error before anything connects."""
        text = self.get(key).strip() or default
        if not _DURATION.fullmatch(text):
            where = self.relative(self.sources[key])
            raise ConfigError(
                f"{where}: {key} must be a duration such as 5s, 500ms or 15min, not {text!r}"
            )
        if _BARE.fullmatch(text) and float(text):  # LOCK_TIMEOUT=5: 5 ms, not the 5 s meant
            where = self.relative(self.sources[key])
            raise ConfigError(
                f"{where}: {key}={text} has no unit, and PostgreSQL reads a bare number as "
                f"milliseconds: write {text}s for seconds, or {text}ms"
            )
        return text

    def count(self, key: str, default: int) -> int:
        """A whole-number setting such as ``BACKUP_KEEP`` or ``POOL_SIZE``: ``2.5`` would be
        cut to 2 unseen (and a cap of ``0.5`` to 0, which means none)."""
        text = self.get(key).strip()
        if text and not (text.isascii() and text.isdigit()):
            where = self.relative(self.sources[key])
            raise ConfigError(f"{where}: {key} must be a whole number, 0 or more, not {text!r}")
        return int(text) if text else default

    def number(self, key: str, default: float) -> float:
        """A numeric setting such as ``CONNECT_WAIT`` (seconds)."""
        text = self.get(key)
        try:
            value = float(text) if text else default
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):  # nan and inf too: int() of them is a traceback
            where = self.relative(self.sources[key])
            raise ConfigError(f"{where}: {key} must be a number, 0 or more, not {text!r}")
        return value

    @property
    def connect_timeout(self) -> float:
        """``CONNECT_TIMEOUT``: seconds to wait for the server to accept a connection. Never
        0: libpq reads 0 as no limit, asyncpg as none at all, so every connection failed."""
        value = self.number("CONNECT_TIMEOUT", CONNECT_TIMEOUT)
        if value == 0:
            where = self.relative(self.sources["CONNECT_TIMEOUT"])
            given = self.get("CONNECT_TIMEOUT").strip()
            raise ConfigError(
                f"{where}: CONNECT_TIMEOUT={given} would give up before any server could "
                "answer (there is no 'no limit'): give the seconds to wait, e.g. CONNECT_TIMEOUT=10"
            )
        return value

    @property
    def network_timeout(self) -> float:
        """``NETWORK_TIMEOUT``: seconds a PostgreSQL connection may go silent (a partition,
        a host gone) before the task gives the server up and the server the task; 0 leaves
        it to the operating system (hours)."""
        return self.number("NETWORK_TIMEOUT", NETWORK_TIMEOUT)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    @property
    def unset_secrets(self) -> dict[str, str]:
        """The secrets whose ``${VAR}`` nobody set (yet): key -> the variable. A task that
        connects refuses them; ``envs`` and ``offline-sql`` need none of them."""
        return {key: var for key, var in self.missing.items() if key in SECRET_KEYS}

    def url(self, *, need_secrets: bool = True, app: bool = False) -> URL:
        """The URL migrations use: ``MIGRATION_URL`` if set (a direct connection where the
        app goes through a pooler), else ``DATABASE_URL``; ``app=True``: always the latter.

        With ``need_secrets=False`` unset variables count as empty.
        """
        if need_secrets:
            self._variables_set(SECRET_KEYS)
        key = "MIGRATION_URL" if self.get("MIGRATION_URL") and not app else "DATABASE_URL"
        return _database_url(self, key)

    def path(self, given: str, what: str) -> Path:
        """A path the env file gives, resolved against the project (an absolute one stays
        as it is; ``~/`` is the home folder, not a folder named ``~`` in the project)."""
        try:
            return self.root / Path(given).expanduser()
        except RuntimeError:  # ~someone, who has no home here
            raise ConfigError(
                f"{self.name}: {what} {given} starts with a home folder that does not exist "
                "here: write the path out"
            ) from None

    def catalog_url(self) -> URL:
        """``TARGETS_DATABASE_URL``, the catalog a fleet's ``TARGETS_QUERY`` runs on. It is
        a URL of its own, password included: the targets' ``DATABASE_PASSWORD`` and
        ``SCHEMA`` are not the catalog's."""
        self._variables_set([CATALOG_KEY])
        return _database_url(self, CATALOG_KEY)

    def _variables_set(self, keys: Iterable[str]) -> None:
        """Refuse a key that names a variable nobody set, saying what sets it: a
        ``${VAR}`` sees the keys above it and the process environment, so a VAR set only
        below it (or in ``NAME.local.env``, read after ``NAME.env``) does not."""
        for key in keys:
            if key not in self.missing:
                continue
            var, where = self.missing[key], self.relative(self.sources[key])
            local = f"{ENV_DIR}/{self.name}.local.env"
            fix = f"export {var}, or set {key} itself in {local}"
            if self.sources.get(var) == self.sources[key]:
                fix = f"{var} is set below it, and a ${{VAR}} sees only the keys above: move it up"
            elif var in self.sources:
                read_later = self.relative(self.sources[var])
                fix = f"{var} is set in {read_later}, which is read after it: set {key} there"
            raise ConfigError(f"{where}: {key} uses ${{{var}}}, which is not set; {fix}")


def known_environments(root: Path) -> list[str]:
    """Names of the environments defined under ``root/environments``."""
    # a link to a file that is not there is one: named, it is said why it cannot be read
    files = (p for p in (root / ENV_DIR).glob("*.env") if p.is_file() or p.is_symlink())
    return sorted(p.name[: -len(".env")] for p in files if not p.name.endswith(".local.env"))


def load_environment(root: Path, name: str, environ: Mapping[str, str]) -> Environment:
    """Read ``NAME.env`` and ``NAME.local.env`` under ``root``, expanding ``${VAR}``."""
    base = root / ENV_DIR / f"{name}.env"
    _known(root, name, base)
    raw: dict[str, tuple[str, Path]] = {}
    local = base.with_name(f"{name}.local.env")
    for path in (base, local):
        if path == base or path.exists() or path.is_symlink():  # a link to no file: said
            raw.update({k: (v, path) for k, v in _read(root, path).items()})
    warnings: tuple[str, ...] = ()
    if local.is_file() and local.stat().st_mode & 0o077:
        where = local.relative_to(root)
        warnings = (f"warning: {where} may hold secrets but others can read it: chmod 600 {where}",)
    values, missing = _expanded(root, raw, environ)
    sources = {key: path for key, (_text, path) in raw.items()}
    _no_misspelled_settings(root, raw)
    loaded = Environment(name, root, values, sources, missing, warnings)
    # a setting read as empty would be its default: PROTECTED=${IS_PROD} unset, unprotected.
    # Only the secrets may wait until a task needs them (offline-sql and envs do not).
    loaded._variables_set(k for k in SETTINGS if k not in (*SECRET_KEYS, CATALOG_KEY))
    loaded.flag("PROTECTED")  # a typo there must not silently mean "unprotected"
    loaded.backup  # nor one there (BACKUP=false) "back up as before"  # noqa: B018
    return loaded


def _known(root: Path, name: str, base: Path) -> None:
    """Refuse a name with no env file (saying which there are, or the one meant), or one
    the audit trail cannot keep."""
    if len(name) > NAME_MAX:  # every revision's audit row would fail on PostgreSQL
        raise ConfigError(
            f"the environment name {name[:20]}... is {len(name)} characters long, and the "
            f"audit trail keeps {NAME_MAX} at most: rename {ENV_DIR}/{name}.env"
        )
    if _NAME.fullmatch(name) and (base.is_file() or base.is_symlink()):
        return
    names = known_environments(root)
    known = ", ".join(names) or "none"
    create = f"add {ENV_DIR}/{name}.env to create it"
    meant = next((k for k in names if _typo_of(name, k.upper())), None)
    if meant is not None:  # --env=DEV, --env=stagin: a deploy's typo
        create = f"did you mean {meant}?"
    elif not _NAME.fullmatch(name):
        create = "a name holds ASCII letters, digits, _ and - only"
    raise ConfigError(f"unknown environment {name!r}: known environments are {known} ({create})")


def _expanded(
    root: Path, raw: Mapping[str, tuple[str, Path]], environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Each key's value with its ``${VAR}`` filled in (from the keys above it, then
    ``environ``), and, for a key that names a variable not set, the first such name."""
    values: dict[str, str] = {}
    missing: dict[str, str] = {}
    for key, (text, path) in raw.items():
        if any(not _REFERENCE.fullmatch(m.group()) for m in _DOLLARS.finditer(text)):
            raise ConfigError(  # left as it is, it would be part of a password, silently
                f"{path.relative_to(root)}: {key} has a ${{...}} that is neither ${{NAME}} nor "
                "${NAME:-default}: write $$ for a literal $"
            )
        values[key], unset = _expand(text, values, environ)
        if unset:
            missing[key] = unset[0]
    return values, missing


def _no_misspelled_settings(root: Path, raw: Mapping[str, tuple[str, Path]]) -> None:
    """Refuse a key that is a setting misspelled (``PROTECTD``, ``LOCK_TIMOUT``): it would be
    ignored, silently. Other keys (the app's own, or ones that feed a ``${VAR}``) may stay."""
    referenced = {m.group(1) for text, _ in raw.values() for m in _REFERENCE.finditer(text)}
    for key, (_text, path) in raw.items():
        if key in SETTINGS or key in referenced:
            continue
        meant = next((known for known in SETTINGS if _typo_of(key, known)), None)
        if meant is not None:
            raise ConfigError(
                f"{path.relative_to(root)}: {key} is no setting; did you mean {meant}? "
                "(a misspelled setting would be ignored without a word)"
            )


def _typo_of(key: str, known: str) -> bool:
    """Whether ``key`` is ``known`` in the wrong case, or a letter or two off (two for the
    long names): Levenshtein's distance. (difflib's similarity would also take an app's
    ``DATABASE_USER`` for ``DATABASE_URL``.)"""
    key = key.upper()
    most = 2 if len(known) >= 8 else 1
    if abs(len(key) - len(known)) > most:
        return False
    row = list(range(len(known) + 1))
    for i, char in enumerate(key, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(known, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (char != other))
    return row[-1] <= most


def _read(root: Path, path: Path) -> dict[str, str]:
    """The file's keys, through python-dotenv's parser; a line it cannot parse, or a key
    given twice, is an error naming the line (never its text, which may hold a secret)."""
    where = path.relative_to(root)
    if path.is_symlink() and not path.exists():  # a secret's mount missing, say
        raise ConfigError(
            f"cannot read {where}: it is a link to {path.readlink()}, which is not there; "
            "make that file, or remove the link"
        )
    try:
        with path.open(encoding="utf-8") as stream:
            bindings = list(parse_stream(stream))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {where}: {reason}") from None
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for binding in bindings:
        text = binding.original.string  # may start with the blank lines before it
        line = binding.original.line + text[: len(text) - len(text.lstrip())].count("\n")
        colon = _COLON.match(text.lstrip())  # KEY: value, as YAML and compose files have it
        if colon and (binding.error or binding.value is None):
            raise ConfigError(
                f"{where}, line {line}: {colon.group(1)} is followed by a colon, where an env "
                f"file has =: write {colon.group(1)}=VALUE"
            )
        if binding.error:
            raise ConfigError(
                f"{where}, line {line}: python-dotenv cannot parse this line (an unbalanced "
                "quote?): write KEY=value, and single-quote a value with # ' \" or spaces"
            )
        if binding.key is None:
            continue
        if binding.value is None and not _KEY.fullmatch(binding.key):  # a URL pasted alone?
            raise ConfigError(
                f"{where}, line {line}: no KEY=value (the line, not shown here as it may hold "
                "a secret, has no =): write KEY=VALUE, or remove the line"
            )
        if binding.key in lines:
            raise ConfigError(
                f"{where}: {binding.key} is set twice, on lines {lines[binding.key]} and {line}: "
                "keep one (NAME.local.env may override a key of NAME.env)"
            )
        if binding.value is None:  # a bare PROTECTED read as unset: unprotected, silently
            raise ConfigError(
                f"{where}, line {line}: {binding.key} has no = and no value: write "
                f"{binding.key}=VALUE, or {binding.key}= for an empty one"
            )
        values[binding.key], lines[binding.key] = binding.value, line
    return values


def _expand(
    text: str, defined: Mapping[str, str], environ: Mapping[str, str]
) -> tuple[str, list[str]]:
    unset: list[str] = []

    def replace(match: re.Match[str]) -> str:
        var, default = match.group(1, 2)
        if var is None:
            return "$"
        value = defined.get(var, environ.get(var, default))  # the default: VAR is not set
        if value is None:
            unset.append(var)
            return ""
        return value

    return _REFERENCE.sub(replace, text), unset


def _database_url(env: Environment, key: str) -> URL:
    if not env.get(key):
        env._variables_set([key])  # all of it a ${VAR} nobody set: said so, not "not set"
        raise ConfigError(f"{ENV_DIR}/{env.name}.env does not set {key}")
    url = parse_url(env.get(key), env.relative(env.sources[key]), key)
    if key == CATALOG_KEY:  # the catalog's URL is all its own
        return _sqlite_path(env, url)
    if "DATABASE_PASSWORD" in env.values and url.get_backend_name() == "sqlite":
        where = env.relative(env.sources["DATABASE_PASSWORD"])
        raise ConfigError(f"{where}: SQLite has no passwords: remove DATABASE_PASSWORD")
    if "DATABASE_PASSWORD" in env.values and (key == "DATABASE_URL" or url.password is None):
        url = url.set(password=env.get("DATABASE_PASSWORD"))
    for key in ("SCHEMA", "SHARED_SCHEMAS"):
        if url.get_backend_name() == "sqlite" and env.get(key).strip():
            where = env.relative(env.sources[key])
            raise ConfigError(f"{where}: SQLite has no schemas: remove {key}, or use PostgreSQL")
    return _sqlite_path(env, url)


def _sqlite_path(env: Environment, url: URL) -> URL:
    """A SQLite file's path, resolved as :meth:`Environment.path` resolves one."""
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        url = url.set(database=str(env.path(url.database or "", "the SQLite path")))
    return url
