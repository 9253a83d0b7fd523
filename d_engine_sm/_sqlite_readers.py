"""Per-thread read connections of SqliteStateMachine, which an install can park.

Each thread gets its own connection (WAL readers never block the writer).
Each connection has its own lock, held for one query (or one ``get_many``),
so :meth:`ReaderPool.parked` can wait out every running query, close every
connection and keep new queries waiting while the database file is
replaced: no connection ever spans the swap, and afterwards each reader
reconnects to the file then at the path (``generation`` tells it to).
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Reader:
    """One thread's connection; hold ``lock`` while using :meth:`ReaderPool.conn`."""

    __slots__ = ("conn", "generation", "lock", "thread")

    def __init__(self, thread: threading.Thread) -> None:
        self.conn: sqlite3.Connection | None = None
        self.generation = -1  # no connection yet
        self.lock = threading.Lock()
        self.thread = weakref.ref(thread)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class ReaderPool:
    """The readers of one database path. Thread-safe.

    Args:
        connect: opens a read-only connection to the path.
        closed_error: the error to raise once the pool is closed.
    """

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], closed_error: Callable[[], Exception]
    ) -> None:
        self._connect = connect
        self._closed_error = closed_error
        self._lock = threading.Lock()  # guards _readers
        self._local = threading.local()
        self._readers: list[Reader] = []
        self.generation = 0  # bumped when the file is swapped, and at close
        self.closed = False

    def mine(self) -> Reader:
        """This thread's reader (registered on first use)."""
        reader: Reader | None = getattr(self._local, "reader", None)
        if reader is not None:
            return reader
        if self.closed:
            raise self._closed_error()
        reader = Reader(threading.current_thread())
        with self._lock:
            live = []
            for other in self._readers:  # close connections of threads that have exited
                thread = other.thread()
                if thread is not None and thread.is_alive():
                    live.append(other)
                else:
                    other.close()
            live.append(reader)
            self._readers = live
        self._local.reader = reader
        return reader

    def conn(self, reader: Reader) -> sqlite3.Connection:
        """``reader``'s connection to the current file (caller holds ``reader.lock``)."""
        if reader.generation != self.generation or reader.conn is None:
            if self.closed:
                raise self._closed_error()
            reader.close()
            reader.conn = self._connect()
            reader.generation = self.generation
        return reader.conn

    @contextmanager
    def parked(self) -> Iterator[None]:
        """Inside: every connection closed, no query running or starting."""
        with self._lock:
            held: list[Reader] = []
            try:
                for reader in self._readers:
                    reader.lock.acquire()
                    held.append(reader)
                    reader.close()
                yield
            finally:
                self.generation += 1
                for reader in held:
                    reader.lock.release()

    def close(self) -> None:
        """Close every connection; further use raises ``closed_error()``."""
        with self.parked():
            self.closed = True
            self._readers = []
