"""What is wrong with the revision files, read without importing them.

Alembic reports a broken history as a raw warning or a ``KeyError``; these functions name
the files instead.
"""

from __future__ import annotations

import ast
import traceback
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
    """A file whose revision id is no id, a duplicate revision id, or a parent that no file
    has, naming the files."""
    for path in sorted(versions.glob("*.py")):
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
    return _bad_reference(versions, root, set(owners))


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
