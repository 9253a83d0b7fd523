"""BytePipe: bytes handed from a writer thread to a reader thread, bounded."""

from __future__ import annotations

import threading

from d_engine_sm._snapshot.pipe import BytePipe


def test_bytes_arrive_in_order_then_eof() -> None:
    pipe = BytePipe(max_buffered=64)
    pieces = [bytes([i]) * (i * 7 + 1) for i in range(40)]
    got = bytearray()

    def reader() -> None:
        while data := pipe.read(13):
            got.extend(data)

    t = threading.Thread(target=reader)
    t.start()
    for piece in pieces:
        assert pipe.put(piece)
    pipe.close_writer()
    t.join(10)
    assert not t.is_alive()
    assert bytes(got) == b"".join(pieces)
    assert pipe.tell() == len(got)


def test_writer_blocks_while_full_and_resumes_when_read() -> None:
    pipe = BytePipe(max_buffered=10)
    assert pipe.put(b"x" * 10)
    second_done = threading.Event()

    def writer() -> None:
        pipe.put(b"y" * 5)
        second_done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not second_done.wait(0.05)  # full: the writer waits (bounded memory)
    assert pipe.read(4) == b"xxxx"
    assert second_done.wait(10)
    t.join(10)
    pipe.close_writer()
    assert pipe.read(100) == b"xxxxxxyyyyy"
    assert pipe.read(100) == b""


def test_stop_reader_releases_a_blocked_writer() -> None:
    pipe = BytePipe(max_buffered=4)
    assert pipe.put(b"abcd")
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(pipe.put(b"more")))
    t.start()
    pipe.stop_reader()
    t.join(10)
    assert result == [False]
    assert pipe.put(b"later") is False
