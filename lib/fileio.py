"""Everything the scripts create on disk goes through here: folders (`make_dirs`, `make_temp_dir`)
and atomic file writes (`atomic_write`).

A file is written to a temporary file in the target's directory, flushed and fsynced, then
os.replace()d over the target: a reader (or a run killed halfway) sees the old file or the
complete new one, never a partial one; a crash right after the rename keeps the data.

An OSError while creating (a file where a folder should be, permissions, a read-only file system,
a name too long, a full disk) becomes `OutputError` (a UsageError): one `error:` line naming the
path, the reason and the flag that picks another place (`creating`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from lib.errors import OutputError


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""The process's umask: files get 0o666 & ~UMASK, directories 0o777 & ~UMASK (as open() / mkdir())."""


def _reason(path: Path, exc: OSError) -> str:
    """Why creating `path` failed, in words (the part of the path that is a file, if that is it)."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        for part in (path, *path.parents):
            if part.exists() or part.is_symlink():
                if not part.is_dir():
                    return f"{part} is a file, not a folder"
                break
    if exc.errno == errno.ENAMETOOLONG:
        return "a file name in it is too long"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


@contextlib.contextmanager
def creating(path: str | os.PathLike, what: str = "", fix: str = "") -> Iterator[None]:
    """Turn an OSError raised while creating `path` into OutputError, e.g. "cannot create the
    results folder /a/b: /a is a file, not a folder (choose another with --output-root)".
    `what` names the thing ("the results folder"), `fix` the flag that places it."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        path = Path(path)
        hint = f" (choose another with {fix})" if fix else ""
        raise OutputError(f"cannot create {what + ' ' if what else ''}{path}: {_reason(path, exc)}{hint}") from exc


def make_dirs(path: str | os.PathLike, what: str = "the output folder", fix: str = "") -> Path:
    """Create the folder `path` and its parents (as `mkdir -p`) and check that files can be
    created in it; any failure raises OutputError (see `creating`). -> path."""
    path = Path(path)
    with creating(path, what, fix):
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):  # e.g. a read-only folder of a finished run
            raise PermissionError(errno.EACCES, "no permission to write in it")
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str, suffix: str) -> Path:
    """A new, empty folder in `parent` (which must exist) with a unique name, created with the
    permissions mkdir() would give it (tempfile.mkdtemp makes it 0700)."""
    with creating(parent, "a folder in"):
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        os.chmod(tmp, 0o777 & ~UMASK)
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(f) on a temporary binary file beside `path`, fsync it and rename it over `path`.

    The parent directory must exist. On any exception the temporary file is removed and `path`
    is left as it was; an OSError becomes OutputError naming `path`. The file gets the
    permissions a plain open() would give it."""
    path = Path(path)
    with creating(path):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o666 & ~UMASK)  # mkstemp creates the file 0600
            os.replace(tmp_name, path)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` through the atomic writer, creating the parent directory."""
    import torch  # only the callers that save tensors pay for it

    path = Path(path)
    make_dirs(path.parent)
    return atomic_write(path, lambda f: torch.save(obj, f))
