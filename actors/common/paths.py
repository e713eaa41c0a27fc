"""Where the paths of a job spec may lead, for both planes: one function, `confine`, that every file
or directory a tenant names goes through (data, corpora, models, tokenizers, MLflow file stores,
the files a `datasets` directory lists), `package_file` for `pkg://` models, and `open_regular`,
the only way a tenant's file is opened, which never blocks on a FIFO or opens a device.

How: a path is resolved (symlinks followed) before it is judged, so a link cannot lead out of the
roots; it must land inside a root and outside every excluded directory (the server's own home,
job store and artifact root). A path outside the roots, an excluded one and one that does not
exist all raise the same PathError: a tenant never learns whether a file exists where it may not
read, nor tells the job store apart from nothing. Imports neither torch nor grpc.
"""

from __future__ import annotations

import importlib.util
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

SHOWN = 200  # characters of a tenant's path echoed back (a long one would not fit gRPC's trailers)


class PathError(Exception):
    """A path the tenant may not read; the control plane answers PERMISSION_DENIED with it."""

    def __init__(self, field: str, path: str | Path, problem: str = "no such file or directory in the data roots"):
        self.field, self.path, self.problem = field, str(path), problem
        shown = self.path if len(self.path) <= SHOWN else self.path[:SHOWN] + "..."
        super().__init__(f"{field}: {shown!r}: {problem}" if field else f"{shown!r}: {problem}")


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a file is read: never opened."""

    def __init__(self, path: str | Path):
        super().__init__(f"{path}: not a regular file (a FIFO, device or socket is never read)")
        self.filename = str(path)


def _inside(path: Path, dirs: Iterable[Path]) -> bool:
    return any(path.is_relative_to(Path(d).resolve()) for d in dirs)


def _excluded(path: Path, excluded: Iterable[Path]) -> bool:
    """Inside an excluded directory, or beside an excluded file with its name as a prefix (an
    SQLite store's -wal, -shm and -journal files hold its rows too)."""
    for ex in (Path(d).resolve() for d in excluded):
        if path.is_relative_to(ex) or (path.parent == ex.parent and path.name.startswith(ex.name + "-")):
            return True
    return False


def confine(
    path: str | Path,
    roots: Iterable[Path],
    excluded: Iterable[Path] = (),
    field: str = "",
    must_exist: bool = True,
    granted: Iterable[Path] = (),
) -> Path:
    """`path` resolved (relative paths are taken from the first root), inside a root, outside every
    excluded directory and, with `must_exist`, existing; else PathError, the same for all three.
    Inside a `granted` directory (a tenant's own earlier job, named as job://) it may be anywhere."""
    roots = tuple(roots)
    try:
        p = Path(path)
        p = p if p.is_absolute() or not roots else roots[0] / p
        resolved = p.resolve()
        exists = os.path.exists(resolved)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an embedded NUL, a name too long
        raise PathError(field, path) from None
    allowed = _inside(resolved, granted) or (_inside(resolved, roots) and not _excluded(resolved, excluded))
    if not p.is_absolute() or not allowed:
        raise PathError(field, path)
    if must_exist and not exists:
        raise PathError(field, path)
    return resolved


def entry(directory: Path, name: str, excluded: Iterable[Path] = (), field: str = "") -> Path:
    """A file a directory's own index names (e.g. a `datasets` state.json's data files): a plain
    name of a file in that same directory, no absolute path, no `..`, no symlink out of it."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise PathError(field, name, f"is not the name of a file in {directory}")
    return confine(directory / name, (directory,), excluded, field, must_exist=False)


def package_file(uri: str, field: str = "") -> Path:
    """The file `pkg://<package>/<rel>` names, confined to the package's own directory. The
    package is found without importing it (a dotted name would import its parent: refused)."""
    package, _, rel = uri.removeprefix("pkg://").partition("/")
    if not package.isidentifier():
        raise PathError(field, uri, f"{package!r} is not a package name")
    if not rel or rel.startswith(("/", "\\")):
        raise PathError(field, uri, "name a file inside the package: pkg://<package>/<file>")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed on the server")
    home = Path(next(iter(spec.submodule_search_locations))).resolve()
    try:
        return confine(home / rel, (home,), (), field, must_exist=False)
    except PathError:
        raise PathError(field, uri, f"leads outside the directory of package {package!r}") from None


def is_regular(path: str | Path) -> bool:
    """A regular file (symlinks followed), decided by stat alone: nothing is opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading, only if it is a regular file. stat decides before anything is
    opened (opening some devices does something); the open itself is non-blocking, and fstat of
    the open descriptor checks again, so a file swapped for a FIFO in between is refused too."""
    if not is_regular(path):
        if not os.path.exists(path):
            raise FileNotFoundError(2, "no such file or directory", str(path))
        raise NotRegularFile(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """A regular file's bytes (at most `limit`), through open_regular."""
    with open_regular(path) as f:
        return f.read() if limit is None else f.read(limit)
