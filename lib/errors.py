"""The exception for user mistakes, importable from anywhere (it imports nothing of the project).

Scripts print it as one `error: ...` line and exit with status 2 (`lib.cli.run`).
"""
from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the user's input (flag, path, data file); the message says which flag or path
    fixes it. A ValueError, so library callers can catch it as one."""


class OutputError(UsageError):
    """A file or folder the run writes could not be created (a file standing where a folder
    should be, permissions, a read-only file system, a name too long, a full disk): the message
    names the path, the reason and, where known, the flag that chooses another place."""
