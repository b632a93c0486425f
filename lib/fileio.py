"""Atomic file writes, the one writer every output goes through.

A file is written to a temporary file in the target's directory, flushed and fsynced, then
os.replace()d over the target: a reader (or a run killed halfway) sees the old file or the
complete new one, never a partial one; a crash right after the rename keeps the data.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""The process's umask: files get 0o666 & ~UMASK, directories 0o777 & ~UMASK (as open() / mkdir())."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(f) on a temporary binary file beside `path`, fsync it and rename it over `path`.

    The parent directory must exist. On any exception the temporary file is removed and `path`
    is left as it was. The file gets the permissions a plain open() would give it."""
    path = Path(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save(obj, f))
