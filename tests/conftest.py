"""Fixtures: a throwaway copy of the project, and throwaway PostgreSQL databases.

Acceptance tests run the real ``invoke`` commands in a copy of the project, so they see
exactly what a user sees. PostgreSQL tests skip with a reason where no server answers,
and fail instead under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import compileall
import glob
import json
import os
import pty
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import pytest

from db.locks import NAMESPACE

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
COPIED = [
    "tasks.py",
    "invoke.yaml",
    "alembic.ini",
    "pyproject.toml",
    ".squawk.toml",
    "cli",
    "db",
    "environments",
]


INVOKE_TIMEOUT = int(os.environ.get("TEST_INVOKE_TIMEOUT", "120"))
# a task's stdio when a test reads its output: no input, stdout and stderr as text
PIPES: dict[str, Any] = {
    "stdin": subprocess.DEVNULL,
    "stdout": subprocess.PIPE,
    "stderr": subprocess.PIPE,
    "text": True,
}


class Launcher:
    """Runs ``python -m invoke ARGS`` as a child of a warm interpreter (tests/forkserver.py)
    that has invoke, SQLAlchemy, Alembic and asyncpg imported already: a real process with
    its own pid, folder, environment, stdio and exit status, at a fifth of a fresh start's
    cost. The project's own modules are imported by each child from its copy."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def start(self, args: list[str], cwd: Path, env: dict[str, str]) -> Child:
        stdin, stdin_end = os.pipe()
        os.close(stdin_end)  # stdin reads end of file at once, as from /dev/null
        out, out_end = os.pipe()
        err, err_end = os.pipe()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.connect(self.socket_path)
        request = json.dumps({"args": args, "cwd": str(cwd), "env": env}).encode()
        socket.send_fds(server, [request], [stdin, out_end, err_end])
        for fd in (stdin, out_end, err_end):
            os.close(fd)
        return Child(server, open(out, encoding="utf-8"), open(err, encoding="utf-8"))


class Child:
    """A task the warm interpreter forked, as much of ``subprocess.Popen`` as tests use."""

    def __init__(self, server: socket.socket, stdout: Any, stderr: Any) -> None:
        self._server = server
        self.pid = int(server.recv(64))
        self.stdout, self.stderr = stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._server.setblocking(False)
            with suppress(BlockingIOError):
                self._ended(self._server.recv(64))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._server.settimeout(timeout)
            try:
                self._ended(self._server.recv(64))
            except TimeoutError:
                raise subprocess.TimeoutExpired("invoke", timeout or 0) from None
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        with suppress(ProcessLookupError):  # ended on its own meanwhile
            os.kill(self.pid, signal.SIGKILL)

    def _ended(self, status: bytes) -> None:
        self.returncode = int(status)
        self._server.close()


@pytest.fixture(scope="session")
def launcher() -> Iterator[Launcher | None]:
    """This worker's warm interpreter, or None where tests start a fresh one per command
    (TEST_FRESH_INVOKE=1, or no os.pidfd_open: not Linux)."""
    if os.environ.get("TEST_FRESH_INVOKE") == "1" or not hasattr(os, "pidfd_open"):
        yield None
        return
    folder = tempfile.mkdtemp(prefix="forkserver-")
    path = os.path.join(folder, "socket")
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "forkserver.py"), path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        yield Launcher(path)
    finally:
        server.terminate()
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Project:
    """A copy of the project in a temporary directory, driven through ``invoke``."""

    root: Path
    environ: dict[str, str]
    launcher: Launcher | None = None

    def invoke(
        self, *args: str, cwd: Path | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        if self.launcher is not None:
            run = Background(self.launcher.start(list(args), cwd or self.root, self.environ | env))
        else:
            run = Background(self.start(*args, cwd=cwd or self.root, env=env, **PIPES))
        try:
            out, err = run.communicate(INVOKE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(run.pid, signal.SIGKILL)
            raise
        return subprocess.CompletedProcess(["invoke", *args], run.wait(), out, err)

    def start(
        self, *args: str, env: dict[str, str] | None = None, **stdio: Any
    ) -> subprocess.Popen[Any]:
        """``python -m invoke ARGS`` in a fresh interpreter in this copy, with the stdio
        given (a terminal, a pipe nobody reads): what the warm launcher cannot hand over."""
        command = [sys.executable, "-m", "invoke", *args]
        where = {"cwd": self.root, **stdio}
        return subprocess.Popen(command, env={**self.environ, **(env or {})}, **where)

    def ok(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        result = self.invoke(*args, **env)
        assert result.returncode == 0, f"invoke {' '.join(args)} failed:\n{result.stderr}"
        return result

    def fails(self, *args: str, **env: str) -> str:
        """Run a task that must fail cleanly; return its stderr."""
        result = self.invoke(*args, **env)
        assert result.returncode != 0, f"invoke {' '.join(args)} should fail:\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert starts, f"no 'error:' line:\n{result.stderr}"
        assert len(lines) - starts[0] <= 2, f"the error takes more than two lines:\n{result.stderr}"
        return result.stderr

    def migrated(self, env: str = "dev", to: str = "head") -> None:
        """Migrate this copy through the library, in this process: a test's set-up, not
        its subject (the ``migrate`` task has tests of its own), at a tenth of the cost."""
        from db import commands
        from db.environments import load_environment
        from db.runner import RunOptions

        commands.migrate(load_environment(self.root, env, self.environ), to, RunOptions())

    def write_env(self, name: str, text: str) -> None:
        (self.root / "environments" / f"{name}.env").write_text(text, encoding="utf-8")

    def extend_env(self, name: str, text: str) -> None:
        path = self.root / "environments" / f"{name}.env"
        path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")

    @property
    def versions(self) -> Path:
        return self.root / "db" / "migrations" / "versions"

    def add_revision(self, name: str, body: str) -> None:
        (self.versions / f"{name}.py").write_text(body, encoding="utf-8")

    def revision_suite(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run tests/test_revisions.py over this copy's revisions (the tests copied in)."""
        if not (self.root / "tests").exists():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / "tests", self.root / "tests", ignore=ignore)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
        return subprocess.run(
            [*command, *args, "tests/test_revisions.py"],
            cwd=self.root,
            env={**self.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    @contextmanager
    def sqlite(self, relative: str = "var/dev.sqlite3") -> Iterator[sqlite3.Connection]:
        """A connection to one of the project's SQLite files, committed and closed after."""
        connection = sqlite3.connect(self.root / relative)
        try:
            with connection:
                yield connection
        finally:
            connection.close()


CATALOG_URL = "sqlite:///var/catalog.sqlite3"


def sqlite_catalog(project: Project, columns: str, *rows: tuple[object, ...]) -> None:
    """A catalog of shops at ``CATALOG_URL``: a table ``shops (columns)`` holding ``rows``."""
    (project.root / "var").mkdir(exist_ok=True)
    with closing(sqlite3.connect(project.root / "var" / "catalog.sqlite3")) as db:
        db.execute(f"create table shops ({columns})")
        db.executemany(f"insert into shops values ({', '.join('?' * len(rows[0]))})", rows)
        db.commit()


def catalog_env(fleet: str, query: str, url: str = CATALOG_URL) -> str:
    """An env file's text: ``fleet``'s settings, its targets from ``query`` on ``url``."""
    return f"{fleet}TARGETS_DATABASE_URL={url}\nTARGETS_QUERY={query}\n"


def cannot(reason: str) -> NoReturn:
    """Skip a test this machine cannot run, saying why; under CI, which must run every
    test, fail it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI requires it: {reason}")
    pytest.skip(reason)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (needs root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        cannot(f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}): run as root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextmanager
def at_the_prompt(
    project: Project, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, bytes]]:
    """A task started with a terminal as stdin, once it shows its prompt: the process, the
    terminal's controller (to type on), and what it said so far. Killed if left running."""
    controller, terminal = pty.openpty()
    process = project.start(*args, stdin=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        assert process.stderr is not None
        said = b""
        while b"Type its name to " not in said or not said.endswith(b": "):
            chunk = os.read(process.stderr.fileno(), 4096)
            assert chunk, said
            said += chunk
        yield process, controller, said
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()


def head_revision() -> str:
    """The id of the bundled head revision, read from the files."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_heads()
    assert len(heads) == 1
    return heads[0]


@pytest.fixture(scope="session")
def compiled() -> None:
    """The project's bytecode, made once, so that each copy's ``invoke`` does not compile
    every module again (the copies write none: PYTHONDONTWRITEBYTECODE). A copied file a
    test edits gets a new mtime, so Python ignores its old bytecode and reads the source."""
    compileall.compile_dir(str(REPO / "cli"), quiet=1)
    compileall.compile_dir(str(REPO / "db"), quiet=1)
    compileall.compile_file(str(REPO / "tasks.py"), quiet=1)


@pytest.fixture
def project(tmp_path: Path, compiled: None, launcher: Launcher | None) -> Project:
    root = tmp_path / "project"
    root.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("*.local.env"))
        else:
            shutil.copy2(source, root / name)
    if (REPO / "__pycache__").is_dir():  # tasks.py's bytecode
        shutil.copytree(REPO / "__pycache__", root / "__pycache__")
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("INVOKE_") and not key.endswith("_DB_PASSWORD")
    }
    environ["PYTHONDONTWRITEBYTECODE"] = "1"
    return Project(root, environ, launcher)


# --- PostgreSQL -------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _execute(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _fetch(dsn: str, query: str) -> list[Any]:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await connection.fetch(query))
    finally:
        await connection.close()


def pg_fetch(dsn: str, query: str) -> list[Any]:
    return run(_fetch(dsn, query))  # type: ignore[no-any-return]


def pg_execute(dsn: str, *statements: str) -> None:
    run(_execute(dsn, *statements))


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin DSN of a reachable PostgreSQL server, or skip (fail under CI)."""
    try:
        run(_fetch(PG_ADMIN, "select 1"))
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        cannot(f"PostgreSQL not reachable at {PG_ADMIN} ({exc}); set TEST_PG_URL to use another")
    return PG_ADMIN


@dataclass
class PgDatabase:
    name: str
    dsn: str  # for asyncpg / psql
    url: str  # for an env file (asyncpg driver)


def scratch_of(database: PgDatabase) -> str:
    """The query for the scratch databases stamp made to compare ``database`` with (named
    for it: other tests' stamps on the same server have their own)."""
    return f"select datname from pg_database where datname like 'stamp_scratch_%_{database.name}'"


def _new_database(admin: str) -> PgDatabase:
    name = f"mig_{uuid.uuid4().hex[:12]}"
    pg_execute(admin, f'CREATE DATABASE "{name}"')
    dsn = admin.rsplit("/", 1)[0] + f"/{name}"
    return PgDatabase(name, dsn, dsn.replace("postgresql://", "postgresql+asyncpg://", 1))


_EMPTIED = """
do $$ declare found text; begin
  for found in select nspname from pg_namespace
               where nspname not like 'pg\\_%' and nspname <> 'information_schema' loop
    execute format('drop schema %I cascade', found);
  end loop;
  if current_setting('server_version_num')::int >= 150000 then  -- as initdb makes it
    execute 'create schema public authorization pg_database_owner';
    grant usage on schema public to public;
  else
    create schema public;
    grant create, usage on schema public to public;
  end if;
  comment on schema public is 'standard public schema';
end $$;
"""


def _emptied(admin: str, database: PgDatabase) -> bool:
    """Make a used database as a new one is: no sessions, no settings, nothing in it but an
    empty ``public`` as initdb makes it (pg_dump cannot tell the two apart). CREATE DATABASE
    costs ~0.3 s here; this, a few milliseconds."""
    try:
        pg_execute(
            admin,
            "select pg_terminate_backend(pid, 5000) from pg_stat_activity "
            f"where datname = '{database.name}' and pid <> pg_backend_pid()",
            f'ALTER DATABASE "{database.name}" RESET ALL',
        )
        pg_execute(database.dsn, _EMPTIED)
        left = pg_fetch(admin, f"select 1 from pg_stat_activity where datname = '{database.name}'")
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return False
    return not left


@pytest.fixture(scope="session")
def _spare_databases(pg_server: str) -> Iterator[list[PgDatabase]]:
    """Databases a finished test left empty, for the next test of this worker to use."""
    spare: list[PgDatabase] = []
    yield spare
    for database in spare:
        pg_execute(pg_server, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')


@contextmanager
def _database(admin: str, spare: list[PgDatabase]) -> Iterator[PgDatabase]:
    database = spare.pop() if spare else _new_database(admin)
    try:
        yield database
    finally:
        if _emptied(admin, database):
            spare.append(database)
        else:
            pg_execute(admin, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')


@pytest.fixture
def pg_database(pg_server: str, _spare_databases: list[PgDatabase]) -> Iterator[PgDatabase]:
    """An empty database on the server, of this test alone."""
    with _database(pg_server, _spare_databases) as database:
        yield database


@pytest.fixture
def pg_project(project: Project, pg_database: PgDatabase) -> Project:
    """The project with an environment ``ci`` on a fresh PostgreSQL database."""
    project.write_env("ci", f"DATABASE_URL={pg_database.url}\n")
    return project


@pytest.fixture
def pg_database_2(pg_server: str, _spare_databases: list[PgDatabase]) -> Iterator[PgDatabase]:
    with _database(pg_server, _spare_databases) as database:
        yield database


# --- running tasks in the background, and waiting without sleeping blindly -------------


class Background:
    """An ``invoke`` task running in the background. Its output is read as it comes, so a
    test can wait for a line it printed (``printed``) instead of guessing with a sleep."""

    def __init__(self, process: subprocess.Popen[str] | Child) -> None:
        self.process = process
        self.pid = process.pid
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=_read_lines, args=(stream, lines), daemon=True)
            for stream, lines in ((process.stdout, self._out), (process.stderr, self._err))
        ]
        for reader in self._readers:
            reader.start()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def printed(self, text: str) -> bool:
        """Whether a line of its stderr so far contains ``text``."""
        return any(text in line for line in list(self._err))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the task to end; its whole stdout and stderr."""
        self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return "".join(self._out), "".join(self._err)

    def when(
        self,
        ready: Callable[[], Any],
        what: str,
        then: Callable[[], object] | None = None,
        timeout: float = 20,
    ) -> str:
        """Once ``ready()`` (waited for as ``what``), do ``then`` (by default, send SIGINT),
        and wait ``timeout`` seconds at most for the task to end; its stderr. A task still
        running then is killed, so that no test leaves one behind (and the test fails, even
        where a fleet's worker, left on its own, holds the task's output open)."""
        try:
            wait_until(ready, what, process=self)
            if then is None:
                self.send_signal(signal.SIGINT)
            else:
                then()
            return self.communicate(timeout)[1]
        finally:
            if self.poll() is None:
                self.process.kill()
                self.communicate(10)


def _read_lines(stream: Any, lines: list[str]) -> None:
    with stream:
        for line in stream:
            lines.append(line)


def popen(project: Project, *args: str, **env: str) -> Background:
    """Start an ``invoke`` task in the background (its pid is the task's own, for signals)."""
    if project.launcher is not None:
        return Background(project.launcher.start(list(args), project.root, project.environ | env))
    return Background(project.start(*args, env=env, **PIPES))


def wait_until(check: Any, what: str, seconds: float = 30, process: Any = None) -> Any:
    """Poll ``check()`` until it returns something true, failing after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (found := check()):
        if process is not None and process.poll() is not None:
            pytest.fail(f"the task ended before {what}:\n{process.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds}s")
        time.sleep(0.05)
    return found


def running_query(dsn: str, pattern: str) -> list[Any]:
    """Backends of the database whose current query contains ``pattern``."""
    return pg_fetch(
        dsn,
        "select pid, query from pg_stat_activity where datname = current_database() "
        f"and pid <> pg_backend_pid() and query like '%{pattern}%'",
    )


async def _hold(dsn: str, key_name: str, held: asyncio.Event, release: asyncio.Event) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            f"select pg_advisory_lock({NAMESPACE}, hashtext(current_database() || '.' || $1))",
            key_name,
        )
        held.set()
        await release.wait()
    finally:
        await connection.close()


@contextmanager
def holding_lock(dsn: str, key_name: str) -> Iterator[None]:
    """The migration lock keyed ``key_name``, held by another session until the block ends."""
    loop = asyncio.new_event_loop()
    held, release = asyncio.Event(), asyncio.Event()
    holder = threading.Thread(
        target=loop.run_until_complete, args=(_hold(dsn, key_name, held, release),)
    )
    holder.start()
    try:
        wait_until(held.is_set, f"the test to hold the lock of {key_name}")
        yield
    finally:
        loop.call_soon_threadsafe(release.set)
        holder.join(timeout=30)
        loop.close()


def versions_of(dsn: str) -> list[str]:
    rows = pg_fetch(dsn, "select version_num from alembic_version")
    return sorted(row["version_num"] for row in rows)


# --- servers of our own: a throwaway PostgreSQL cluster, and PgBouncer ------------------


def tool(name: str) -> str | None:
    """A PostgreSQL or PgBouncer program, on PATH or in Debian's versioned folders."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def as_postgres(command: list[str]) -> list[str]:
    """initdb, the server and PgBouncer refuse to run as root: run them as ``postgres``."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def need(*programs: str) -> list[str]:
    """The programs' paths; skip without them (fail under CI, which must run these tests)."""
    found = [tool(name) for name in programs]
    if None in found:
        missing = ", ".join(n for n, f in zip(programs, found, strict=True) if f is None)
        cannot(f"{missing} not found")
    return [f for f in found if f is not None]


def owned_dir(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    return base


@dataclass
class Cluster:
    """A PostgreSQL cluster of our own on a free port, to restart or stop at will; on
    ``address`` in the network namespace ``namespace`` (see :func:`cluster_across_a_link`)."""

    base: Path
    port: int
    address: str = "127.0.0.1"
    namespace: str | None = None

    @property
    def data(self) -> str:
        return str(self.base / "data")

    @property
    def socket_dsn(self) -> str:
        """The admin DSN over its Unix socket, which no cut link reaches."""
        return f"postgresql://postgres@/postgres?host={self.base}&port={self.port}"

    def ctl(self, *args: str) -> None:
        [pg_ctl] = need("pg_ctl")
        inside = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        subprocess.run(
            inside + as_postgres([pg_ctl, "-D", self.data, *args]), check=True, capture_output=True
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses={self.address} -k {self.base} -c fsync=off"
        self.ctl("-o", options, "-l", str(self.base / "log"), "-w", "start")

    def restart(self) -> None:
        self.ctl("-m", "fast", "-l", str(self.base / "log"), "-w", "restart")

    def stop(self) -> None:
        self.ctl("-m", "immediate", "stop")


@contextmanager
def tcp_server(reply: bytes | None, accepted: list[socket.socket] | None = None) -> Iterator[int]:
    """A port that takes connections: each gets ``reply`` to its first message and is
    closed, or (None) is kept open, never answered, and added to ``accepted``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted = [] if accepted is None else accepted
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                peer = listener.accept()[0]
            except OSError:
                continue
            if reply is None:
                accepted.append(peer)
                continue
            with peer:
                peer.recv(1024)
                peer.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


@contextmanager
def cluster(*initdb_args: str, link: Link | None = None) -> Iterator[Cluster]:
    """initdb a cluster in a temporary folder, start it, and stop and delete it after; at
    the far end of ``link`` if given."""
    [initdb] = need("initdb")
    base = owned_dir("cluster-")
    found = Cluster(base, free_port())
    if link is not None:
        found.address, found.namespace = link.server, link.namespace
    command = [initdb, "-D", found.data, "-U", "postgres", "--no-sync", *initdb_args]
    try:  # the folder goes, however far this got
        subprocess.run(as_postgres(command), check=True, capture_output=True)
        if link is not None:  # initdb's rules trust only this host's own addresses
            with open(Path(found.data) / "pg_hba.conf", "a") as rules:
                rules.write(f"host all all {link.client}/32 trust\n")
        found.start()
        yield found
    finally:
        with suppress(subprocess.CalledProcessError, OSError):  # not started, or not made
            found.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Link:
    """A veth pair from this host to a network namespace of its own: ``cut`` it and packets
    between the two ends vanish, as in a network partition (nothing is refused or reset)."""

    namespace: str
    device: str  # the namespace's end
    client: str = ""  # this host's address
    server: str = ""  # the namespace's address

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespace, "ip", *args], check=True)

    def cut(self) -> None:
        self.ip("link", "set", self.device, "down")

    def mend(self) -> None:
        self.ip("link", "set", self.device, "up")


@contextmanager
def network_link() -> Iterator[Link]:
    """A :class:`Link` (needs root: skipped without it, failed under CI), removed after.
    Named by this process, on a /30 of 198.18.0.0/15 (kept for benchmarks, never routed)."""
    if shutil.which("ip") is None:
        cannot("ip not found: install iproute2")
    pid = os.getpid()
    link = Link(f"migrations-{pid}", f"ms{pid}")
    made = subprocess.run(["ip", "netns", "add", link.namespace], capture_output=True, text=True)
    if made.returncode != 0:
        cannot(f"cannot make a network namespace ({made.stderr.strip()}): run as root")
    try:
        net = (198 << 24) | (18 << 16) | ((pid % 32768) << 2)
        link.client, link.server = (socket.inet_ntoa((net + n).to_bytes(4, "big")) for n in (1, 2))
        ours = f"mc{pid}"
        subprocess.run(["ip", "link", "add", ours, "type", "veth", "peer", link.device], check=True)
        subprocess.run(["ip", "link", "set", link.device, "netns", link.namespace], check=True)
        subprocess.run(["ip", "addr", "add", f"{link.client}/30", "dev", ours], check=True)
        subprocess.run(["ip", "link", "set", ours, "up"], check=True)
        link.ip("addr", "add", f"{link.server}/30", "dev", link.device)
        link.ip("link", "set", link.device, "up")
        yield link
    finally:
        # deleting the namespace deletes its end, and with it the pair
        subprocess.run(["ip", "netns", "delete", link.namespace], check=True)


@contextmanager
def pgbouncer(
    server_port: int, mode: str, pool_size: int = 4, databases: tuple[str, ...] = ()
) -> Iterator[int]:
    """PgBouncer in ``mode`` (session or transaction) in front of a server, with up to
    ``pool_size`` server connections per database; yields its port. ``databases``: the only
    ones it knows, where by default it passes any name on."""
    [program] = need("pgbouncer")
    base = owned_dir("pgbouncer-")
    port = free_port()
    (base / "users.txt").write_text('"postgres" ""\n')
    known = "".join(f"{name} = host=127.0.0.1 port={server_port}\n" for name in databases)
    (base / "pgbouncer.ini").write_text(
        f"""[databases]
{known or f"* = host=127.0.0.1 port={server_port}"}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {base}/users.txt
pool_mode = {mode}
default_pool_size = {pool_size}
max_client_conn = 100
logfile = {base}/log
pidfile = {base}/pid
"""
    )
    process = subprocess.Popen(
        as_postgres([program, str(base / "pgbouncer.ini")]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # it logs to base/log
    )
    try:
        wait_until(lambda: _answers(port), "PgBouncer to listen", 10)
        yield port
    finally:
        # SIGTERM is PgBouncer's immediate shutdown; sent to runuser, it would wait 2 s
        # before killing its child, so it goes to PgBouncer's own pid
        pid = (base / "pid").read_text().strip() if (base / "pid").exists() else ""
        if pid.isdigit():
            os.kill(int(pid), signal.SIGTERM)
        else:
            process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- revisions and readings the tests share --------------------------------------------


def revision(
    rev: str,
    down: str | tuple[str, ...] | None,
    upgrade: str = "pass",
    message: str = "hand written",
) -> str:
    return f'''"""{message}"""

from alembic import op
import sqlalchemy as sa

revision = "{rev}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    {upgrade}


def downgrade() -> None:
    pass
'''


# A revision that goes on past a failed statement, undone to a savepoint of its own: the
# way to do what its connection's rollback() would (which the tasks refuse)
SAVEPOINT_RECOVERY = (
    'op.create_table("notes", sa.Column("id", sa.Integer))\n'
    "    try:\n"
    "        with op.get_bind().begin_nested():\n"
    '            op.execute("insert into no_such_table values (1)")\n'
    "    except sa.exc.DBAPIError:\n"
    "        pass\n"
    '    op.execute("insert into notes values (1)")'
)


# A revision whose ORM Session rolls back the transaction it joined (the revision's), then
# goes on as if what it ran before were still there
SESSION_ROLLBACK = (
    "from sqlalchemy.orm import Session\n"
    '    op.create_table("leftover", sa.Column("id", sa.Integer))\n'
    "    session = Session(bind=op.get_bind())\n"
    '    session.execute(sa.text("select 1"))\n'
    "    session.rollback()\n"
    '    op.create_table("after", sa.Column("id", sa.Integer))'
)


def add_good_then_bad(project: Project, failure: str) -> None:
    """good01 (add notes) applies cleanly; bad001 (add coupons) creates a table, then fails."""
    notes = 'op.create_table("notes", sa.Column("id", sa.Integer))'
    coupons = 'op.create_table("coupons", sa.Column("id", sa.Integer))\n    ' + failure
    project.add_revision("good", revision("good01", head_revision(), notes, message="add notes"))
    project.add_revision("bad", revision("bad001", "good01", coupons, message="add coupons"))


def migrated_shop(project: Project) -> None:
    """The dev database at head, with a user, a product and a purchase in it."""
    project.migrated()
    with project.sqlite() as connection:
        for statement in SHOP_ROWS:
            connection.execute(statement)


SHOP_ROWS = [
    "insert into users (id, telegram_id) values (1, 1001)",
    "insert into categories (id, name) values (1, 'e-books')",
    "insert into products (id, category_id, name, price) values (1, 1, 'Guide', 9.99)",
    "insert into purchases (user_id, product_id, price, payment_id) values (1, 1, 9.99, 'pay-1')",
]


def tables(project: Project) -> set[str]:
    with project.sqlite() as connection:
        rows = connection.execute("select name from sqlite_master where type = 'table'")
        return {name for (name,) in rows} - {"alembic_version", "migration_log", "sqlite_sequence"}


def version(project: Project, relative: str = "var/dev.sqlite3") -> list[str]:
    """The revisions recorded in the file; none where there is no version table (yet)."""
    with project.sqlite(relative) as connection:
        found = connection.execute("select 1 from sqlite_master where name = 'alembic_version'")
        if found.fetchone() is None:
            return []
        return [rev for (rev,) in connection.execute("select version_num from alembic_version")]


COUPON_MODEL = """

class Coupon(Base):
    __tablename__ = "coupons"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    percent_off: Mapped[int]
"""


def add_coupon_model(project: Project) -> None:
    models = project.root / "db" / "models.py"
    models.write_text(models.read_text() + COUPON_MODEL)


def log_rows(project: Project, relative: str = "var/dev.sqlite3") -> list[tuple[object, ...]]:
    with project.sqlite(relative) as connection:
        return connection.execute(
            "select revision, direction, environment, os_user, host, checksum, duration_ms, "
            "tool_version from migration_log order by id"
        ).fetchall()


# A revision that inserts reference rows with their ids, which a sequence never gave, and
# what ends it so that the app's inserts go on past them (tests of the sequence check)
REFERENCE_CATEGORIES = (
    'categories = sa.table("categories", sa.column("id"), sa.column("name"))\n'
    '    op.bulk_insert(categories, [{"id": 10, "name": "E-books"}, {"id": 11, "name": "Courses"}])'
)
SETVAL = (
    "SELECT setval(pg_get_serial_sequence('categories', 'id'), (SELECT max(id) FROM categories))"
)


def add_notes(project: Project) -> None:
    project.add_revision(
        "notes",
        revision(
            "notes1",
            head_revision(),
            'op.create_table("notes", sa.Column("id", sa.Integer))',
            message="add notes",
        ),
    )


def settings_revision(project: Project) -> None:
    """A revision that keeps the session settings it ran with, in a table ``seen``."""
    project.add_revision(
        "seen",
        revision(
            "seen01",
            head_revision(),
            "op.execute(\"create table seen as select current_setting('lock_timeout') lt, "
            "current_setting('statement_timeout') st, current_setting('application_name') app\")",
        ),
    )


def lock_holders(database: PgDatabase) -> list[int]:
    rows = pg_fetch(
        database.dsn,
        f"select pid from pg_locks where locktype = 'advisory' and classid = {NAMESPACE} "
        "and database = (select oid from pg_database where datname = current_database())",
    )
    return [row["pid"] for row in rows]
