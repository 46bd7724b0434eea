"""Files the tasks write for people and tools to read (offline SQL, run reports)."""

from __future__ import annotations

import glob
import os
import re
import secrets
import stat
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from pathlib import Path

STREAMS = ("/dev/", "/proc/")  # /dev/stdout, and >(psql)'s /dev/fd/63, name a stream


def dated(
    folder: Path, name: str, stamp: str, suffix: str, when: Callable[[str], datetime]
) -> list[Path]:
    """The files ``NAME-STAMP.SUFFIX`` in ``folder``, newest first by ``when`` (the time a
    stamp says; a ValueError: no time, so no file of ours); ``stamp`` is the pattern of
    their time stamps. Only ``name``'s own: the environment dev-old's ``dev-old-...``
    starts with ``dev-`` too, and a glob alone took them for dev's."""
    shape = re.compile(re.escape(f"{name}-") + f"({stamp})" + re.escape(f".{suffix}"))
    found = folder.glob(f"{glob.escape(name)}-*.{glob.escape(suffix)}")
    times: dict[Path, datetime] = {}
    for path in found:
        match = shape.fullmatch(path.name)
        with suppress(ValueError):  # the shape, but no time there is (a 13th month)
            if match:
                times[path] = when(match.group(1))
    return sorted(times, key=lambda path: (times[path], path.name), reverse=True)


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a full disk leaves no truncated file
    that a reader would take for the real one, and keeps what ``path`` held before.

    The file keeps its mode (a new one gets the umask's, as any file would) and a link
    keeps pointing at it. What is no file (a pipe, a terminal, a device) is written to as
    it is, never replaced by a file. Raises OSError."""
    if str(path.absolute()).startswith(STREAMS) or (path.exists() and not path.is_file()):
        # appended: /dev/stdout reopens the file a shell's `>> log.sql` points it at, which
        # "w" would empty (a pipe or a terminal takes either alike)
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(text)
        return
    path = path.resolve()  # through links: the file they name gets the text
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            if mode is not None:
                os.fchmod(file.fileno(), mode)
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
