"""Disk I/O off the tracker's critical path: read frames ahead and write outputs behind, each in
one background thread (JPEG/PNG coding in PIL and zlib releases the GIL)."""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

from lib.errors import OutputError

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def read_ahead(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Iterate `items` with up to `depth` of them already produced by a background thread
    (e.g. frames decoded while the tracker works on the current one). An exception raised by
    `items` is raised here, at the item where it happened. Stopping early stops the thread."""
    if depth < 1:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer
            slots.put(_Failure(exc))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


class BackgroundWriter:
    """Runs write jobs in order in one background thread. `flush()` waits for all submitted jobs
    and raises the first failure as an OSError naming its path; after a failure later jobs are
    skipped (nothing more is written), so the run stops with the first bad path."""

    def __init__(self, max_pending: int = 16):
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="background-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                path, write = job
                if self._error is None:
                    try:
                        write()
                    except BaseException as exc:
                        self._error = _with_path(exc, path)
            finally:
                self._jobs.task_done()

    def submit(self, path: str | os.PathLike, write: Callable[[], object]) -> None:
        """Queue `write()` (which writes `path`); blocks while `max_pending` jobs wait. Raises the
        failure of an earlier job right away."""
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("the background writer is closed")
        self._jobs.put((path, write))

    def flush(self) -> None:
        """Wait until every submitted job ran; raise the first failure."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Flush and stop the thread (also when a job failed: the failure is raised)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:  # already failing: stop without masking that error
            self._jobs.put(None)
            self._thread.join()
        return False


def _with_path(exc: BaseException, path) -> BaseException:
    """The failure of writing `path`, as an OSError that names the path."""
    if isinstance(exc, OutputError) or (isinstance(exc, OSError) and exc.filename is not None):
        return exc
    error = OSError(f"could not write {path}: {exc}")
    error.__cause__ = exc
    return error
