"""Reading ahead and writing behind in background threads (lib/background.py)."""
from __future__ import annotations

import threading
import time

import pytest

from lib.background import BackgroundWriter, read_ahead


def test_read_ahead_keeps_order_and_reads_ahead():
    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    stream = read_ahead(items(), depth=3)
    assert next(stream) == 0
    deadline = time.time() + 5
    while len(produced) < 4 and time.time() < deadline:  # the thread runs ahead of the consumer
        time.sleep(0.01)
    assert len(produced) >= 4
    assert list(stream) == list(range(1, 10))


def test_read_ahead_raises_where_the_source_failed():
    def items():
        yield 1
        yield 2
        raise FileNotFoundError("frame 3.jpg")

    got = []
    with pytest.raises(FileNotFoundError, match="frame 3.jpg"):
        for x in read_ahead(items(), depth=2):
            got.append(x)
    assert got == [1, 2]


def test_read_ahead_stops_its_thread_when_the_consumer_stops():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = read_ahead(endless(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == before


def test_writer_runs_jobs_in_order_and_flush_waits(tmp_path):
    order = []
    with BackgroundWriter(max_pending=2) as writer:
        for i in range(6):
            writer.submit(tmp_path / f"{i}.txt", lambda i=i: (time.sleep(0.01), order.append(i),
                                                                (tmp_path / f"{i}.txt").write_text(str(i))))
        writer.flush()
        assert order == list(range(6))
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.txt" for i in range(6)]


def test_a_write_error_names_the_path_and_stops_later_writes(tmp_path):
    written = []
    writer = BackgroundWriter()
    writer.submit(tmp_path / "a.png", lambda: written.append("a"))
    writer.submit(tmp_path / "b.png", lambda: (_ for _ in ()).throw(RuntimeError("disk full")))
    writer.submit(tmp_path / "c.png", lambda: written.append("c"))
    with pytest.raises(OSError, match="b.png.*disk full"):
        writer.flush()
    assert written == ["a"]
    with pytest.raises(OSError, match="b.png"):
        writer.submit(tmp_path / "d.png", lambda: written.append("d"))
    with pytest.raises(OSError, match="b.png"):
        writer.close()
