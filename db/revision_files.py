"""What is wrong with the revision files, read without importing them.

Alembic reports a broken history as a raw warning or a ``KeyError``; these functions name
the files instead.
"""

from __future__ import annotations

import ast
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path


def declared(versions: Path) -> dict[Path, tuple[str, tuple[str, ...]]]:
    """Each file's ``revision`` and ``down_revision`` ids, as written."""
    found: dict[Path, tuple[str, tuple[str, ...]]] = {}
    for path in sorted(versions.glob("*.py")):
        values = _assignments(path)
        revision, down = values.get("revision"), values.get("down_revision")
        if isinstance(revision, str):
            parents = (down,) if isinstance(down, str) else down
            if isinstance(parents, (tuple, list)) or parents is None:
                found[path] = (revision, tuple(str(p) for p in parents or ()))
    return found


def _assignments(path: Path) -> dict[str, object]:
    """Module-level ``NAME = literal`` (or ``NAME: type = literal``) in a file."""
    try:
        tree = ast.parse(path.read_bytes())  # as Python reads it: a BOM, a coding line
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return {}  # importing it reports the problem, with the file's name
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                values[target.id] = ast.literal_eval(value)
            except ValueError:
                continue
    return values


def problem(versions: Path, root: Path) -> str | None:
    """A file that is no revision Python can read, a file whose revision id is no id, a
    duplicate revision id, or a parent that no file has, naming the files."""
    for path in sorted(versions.glob("*.py")):
        unread = unreadable(path, root)
        if unread is not None:
            return unread
        values = _assignments(path)
        rev = values.get("revision", "?")
        if not isinstance(rev, str) or not rev.strip():  # Alembic: "'NoneType' not iterable"
            return (
                f"{path.relative_to(root)}: `revision = {rev!r}` is no revision id: give it "
                'one, a string (revision = "1a2b3c4d5e6f"), as in its file name'
            )
    files = declared(versions)
    owners: dict[str, list[Path]] = {}
    for path, (rev, _parents) in files.items():
        owners.setdefault(rev, []).append(path)
    for rev, paths in owners.items():
        if len(paths) > 1:
            names = " and ".join(str(p.relative_to(root)) for p in paths)
            return (
                f"revision id {rev} is in two files, {names}: give one of them a new id "
                "(in `revision =` and in its file name)"
            )
    for path, (_rev, parents) in files.items():
        for parent in parents:
            if parent not in owners:
                return (
                    f"{path.relative_to(root)}: down_revision {parent!r} names no revision "
                    "file: restore that file, or point down_revision at the revision before"
                )
    where = {rev: path for path, (rev, _parents) in files.items()}
    needs = {rev: _ids(_assignments(path).get("depends_on")) or () for rev, path in where.items()}
    return circle(dict(files.values()), where, root, needs) or _bad_reference(
        versions, root, set(owners)
    )


def circle(
    parents: Mapping[str, tuple[str, ...]],
    files: Mapping[str, Path],
    root: Path,
    needs: Mapping[str, tuple[str, ...]] | None = None,
) -> str | None:
    """Revisions whose down_revisions (or depends_on, ``needs``) lead back to themselves (a
    copied file's ids edited the wrong way round), given each revision's file. Alembic
    says only "Cycle is detected in revisions (...)", and misses a circle through a merge
    revision altogether: it ran the revisions in it in an order that no history has."""
    needs = needs or {}

    def before(rev: str) -> Iterator[str]:
        return iter((*parents.get(rev, ()), *needs.get(rev, ())))

    done: set[str] = set()
    for start in sorted(parents):
        trail: list[str] = []
        todo = [(start, before(start))]
        while todo:
            rev, ups = todo[-1]
            if not trail or trail[-1] != rev:
                trail.append(rev)
            up = next(ups, None)
            if up is None:
                done.add(trail.pop())
                todo.pop()
            elif up in trail:
                return _circle(trail[trail.index(up) :], parents, files, root)
            elif up not in done:
                todo.append((up, before(up)))
    return None


def _circle(
    loop: list[str], parents: Mapping[str, tuple[str, ...]], files: Mapping[str, Path], root: Path
) -> str:
    """A circle of revisions in words, from its lowest id, whichever file it was met in."""
    first = loop.index(min(loop))
    loop = loop[first:] + loop[:first]
    steps = list(zip(loop, [*loop[1:], loop[0]], strict=True))
    names = ", ".join(_named(files[rev], root) for rev in loop)
    shown = " -> ".join([*loop, loop[0]])
    if all(up in parents.get(rev, ()) for rev, up in steps):
        which = "it" if len(loop) == 1 else "one of them"
        return (
            f"down_revision goes round in a circle ({shown}), in {names}: point {which} at "
            "the revision before it"
        )
    return (
        f"down_revision and depends_on go round in a circle ({shown}), in {names}: take the "
        "revision out of depends_on, or point a down_revision at the revision before it"
    )


def nested(versions: Path, root: Path) -> str | None:
    """A revision file in a folder below ``versions``, where Alembic does not look (its
    ``recursive_version_locations`` is off): it would be left out without a word, and
    ``status`` say that nothing is pending. A helper module there (no ``revision =``) may stay."""
    for path in sorted(versions.glob("*/**/*.py")):
        if "__pycache__" not in path.parts and "revision" in _assignments(path):
            return (
                f"{_named(path, root)} is a revision in a folder below {_named(versions, root)}, "
                "where Alembic does not look for revisions: move it up into that folder"
            )
    return None


def not_utf8(path: Path, root: Path) -> str | None:
    """Why a file is not UTF-8 text (Python may load one that is not, if the odd bytes are
    in a comment, but its checksum and plan would then fail to read it); None if it is."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{_named(path, root)} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
    return None


def unreadable(path: Path, root: Path) -> str | None:
    """Why a file is no revision Python can read: not UTF-8, not Python (cut short, a NUL
    byte), or without the ``revision =`` every revision declares; None if it is one."""
    try:
        data = path.read_bytes()
    except OSError:
        return None  # loading it says why, with its name
    if (wrong := not_utf8(path, root)) is not None:
        return wrong
    restore = "fix it, or restore it from the repository"
    try:
        tree = ast.parse(data)
    except SyntaxError as exc:
        line = f", line {exc.lineno}," if exc.lineno else ""
        return f"{_named(path, root)}{line} is not valid Python ({exc.msg}): {restore}"
    except ValueError as exc:  # a NUL byte, before Python 3.12
        return f"{_named(path, root)} is not valid Python ({exc}): {restore}"
    names = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    if "revision" not in names:
        return (
            f"{_named(path, root)} declares no `revision =`: each .py file in its folder is "
            "read as a revision; restore it, or move it out of that folder"
        )
    return None


MODELS = "db.models"  # the app's models, as autogenerate and the app see them: always at head


def models_imported(path: Path) -> int | None:
    """The line on which a revision file imports the app's models (``from db.models import
    User``, ``from db import models``), anywhere in it; None if it does not. Such a revision
    reads its tables as the newest revision leaves them, not as they are at its own turn."""
    try:
        data = path.read_bytes()
        tree = ast.parse(data) if b"models" in data else None
    except (OSError, SyntaxError, ValueError):
        return None  # loading it says what is wrong, with its name
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        if any(name == MODELS or name.startswith(f"{MODELS}.") for name in names):
            return node.lineno
    return None


def models_problem(path: Path, root: Path) -> str | None:
    """What is wrong with a revision that imports the app's models, or None if it does not."""
    line = models_imported(path)
    if line is None:
        return None
    return (
        f"{_named(path, root)}, line {line}, imports {MODELS}: the models describe the tables "
        "as the newest revision leaves them, so once one changes a table this revision "
        "reads, it fails on every new database; give it its own "
        '`sa.table("users", sa.column("id"), ...)` of the columns it needs'
    )


def _named(path: Path, root: Path) -> str:
    """A file, named from the project (or whole, if it lies elsewhere)."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _bad_reference(versions: Path, root: Path, revisions: set[str]) -> str | None:
    """A ``down_revision`` that is no id (``42``), or a ``depends_on`` that names neither a
    revision nor a branch label: Alembic says only ``TypeError`` or ``KeyError: 'x'``."""
    found = {path: _assignments(path) for path in sorted(versions.glob("*.py"))}
    labels = {
        label for values in found.values() for label in _ids(values.get("branch_labels")) or ()
    }
    for path, values in found.items():
        down = values.get("down_revision")
        if _ids(down) is None:
            return (
                f"{path.relative_to(root)}: `down_revision = {down!r}` is no revision id: "
                "write the id of the revision before it, as a string"
            )
        for need in _ids(values.get("depends_on")) or ():
            if need not in revisions and need not in labels:
                return (
                    f"{path.relative_to(root)}: depends_on {need!r} names no revision file "
                    "and no branch label: restore that file, or take it out of depends_on"
                )
    return None


def _ids(value: object) -> tuple[str, ...] | None:
    """A file's ids as a tuple (none for None); None when ``value`` is no id or ids."""
    if value is None or isinstance(value, str):
        return () if value is None else (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def culprit(exc: BaseException, versions: Path, root: Path) -> str | None:
    """The revision file in which loading failed (an ImportError, a NameError...)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [frame for frame in frames if Path(frame.filename).parent == versions]
    if not inside:
        return None
    return f"{Path(inside[-1].filename).relative_to(root)}, line {inside[-1].lineno}"
