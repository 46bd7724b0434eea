"""A warm interpreter that becomes ``python -m invoke ARGS``, once per request, by forking.

Most of an ``invoke`` command's cost in the tests is starting Python and importing invoke,
SQLAlchemy, Alembic and asyncpg (~0.3 s of ~0.35 s). This process imports those libraries
once, then forks a child for each request. The child takes the request's folder,
environment, stdin, stdout and stderr, and runs ``invoke`` exactly as ``python -m invoke``
does (``runpy``), so the project's ``tasks.py``, ``cli/``, ``db/`` and revisions are imported by the
child, from the project copy, as in a fresh process. Only third-party modules are preloaded,
never the project's own. The caller gets the child's pid, to signal it, and then its exit
status as ``subprocess`` reports it.

Linux only (``os.pidfd_open``); elsewhere, and with ``TEST_FRESH_INVOKE=1``, the tests start
a fresh interpreter per command instead.

Protocol, over a SOCK_SEQPACKET Unix socket: the caller sends one JSON message
``{"args", "cwd", "env"}`` with three file descriptors (stdin, stdout, stderr); the server
answers with the child's pid, and later with its exit status, one message each.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import selectors
import socket
import sys
import time

PRELOAD = [
    "invoke",
    "invoke.main",
    "dotenv",
    "sqlalchemy",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.orm",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.sqlite.aiosqlite",
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "asyncpg",
    "alembic",
    "alembic.command",
    "alembic.config",
    "alembic.script",
    "alembic.runtime.migration",
    "alembic.runtime.environment",
    "alembic.operations",
    "alembic.autogenerate",
    "alembic.ddl.postgresql",
    "alembic.ddl.sqlite",
    "mako.template",
    "asyncio",
    "concurrent.futures",
    "multiprocessing",
]


def serve(path: str) -> None:
    """Answer requests until terminated; return only in a forked child, ready to run."""
    for name in PRELOAD:
        importlib.import_module(name)
    # Out of the collector's sight: otherwise each child's collections, and its exit, walk
    # (and so copy) every preloaded object, costing a short command more than it saves.
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                caller, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(caller, 1 << 20, 3)
                request = json.loads(message)
                pid = os.fork()
                if pid == 0:
                    for other in selector.get_map().values():  # the other children's
                        if other.data is not None:
                            os.close(other.fd)
                            other.data[1].close()
                    selector.close()
                    listener.close()
                    caller.close()
                    become(request, fds)
                    return
                for fd in fds:
                    os.close(fd)
                caller.send(str(pid).encode())
                selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, caller))
            else:  # a child ended
                pid, caller = key.data
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                try:
                    caller.send(str(os.waitstatus_to_exitcode(status)).encode())
                except OSError:
                    pass  # the caller gave up on it (a timeout)
                caller.close()


def become(request: dict[str, object], fds: list[int]) -> None:
    """Make this child look like ``python -m invoke`` started in the request's folder."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(str(request["cwd"]))
    environ = request["env"]
    assert isinstance(environ, dict)
    os.environ.clear()
    os.environ.update(environ)
    time.tzset()  # local time as the request's TZ says, as a fresh interpreter reads it
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    args = request["args"]
    assert isinstance(args, list)
    sys.argv = ["-m", *args]  # runpy puts the module's path in argv[0], as -m does
    sys.path[0] = os.getcwd()  # -m puts the working folder first; a script, its own folder


if __name__ == "__main__":
    serve(sys.argv[1])
    # Only a forked child gets here. Exceptions, exit codes and KeyboardInterrupt end it as
    # they end `python -m invoke`.
    runpy.run_module("invoke", run_name="__main__", alter_sys=True)
