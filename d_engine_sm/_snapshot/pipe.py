"""A bounded byte pipe between two threads, readable as a file.

The receive path writes accepted chunk bytes into it; an unpacking thread
reads it through gzip and tar, so the archive is unpacked while it is
still arriving instead of after.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from typing import Any


class BytePipe(io.RawIOBase):
    """One writer thread ``put``s bytes; one reader thread reads them.

    ``put`` blocks while ``max_buffered`` bytes or more wait, so memory stays
    bounded (by ``max_buffered`` plus one piece). After
    ``close_writer`` the reader drains what is left and then sees EOF. After
    ``stop_reader`` (the reader gave up) ``put`` returns False at once.
    """

    def __init__(self, max_buffered: int) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._pieces: deque[memoryview] = deque()
        self._buffered = 0
        self._max = max_buffered
        self._eof = False
        self._reader_gone = False
        self._read = 0

    # -- writer side -----------------------------------------------------------
    def put(self, data: bytes) -> bool:
        """Queue ``data`` for the reader; False when the reader has stopped."""
        with self._cond:
            self._cond.wait_for(lambda: self._reader_gone or self._buffered < self._max)
            if self._reader_gone:
                return False
            self._pieces.append(memoryview(data))
            self._buffered += len(data)
            self._cond.notify_all()
            return True

    def close_writer(self) -> None:
        """No more data: the reader gets EOF once drained."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # -- reader side -----------------------------------------------------------
    def stop_reader(self) -> None:
        """The reader is done (or failed): release a blocked writer, drop the rest."""
        with self._cond:
            self._reader_gone = True
            self._pieces.clear()
            self._buffered = 0
            self._cond.notify_all()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        with self._cond:
            self._cond.wait_for(lambda: bool(self._pieces) or self._eof)
            filled = 0
            while self._pieces and filled < len(out):
                piece = self._pieces[0]
                n = min(len(piece), len(out) - filled)
                out[filled : filled + n] = piece[:n]
                filled += n
                if n == len(piece):
                    self._pieces.popleft()
                else:
                    self._pieces[0] = piece[n:]
            self._buffered -= filled
            self._read += filled
            self._cond.notify_all()
            return filled

    def tell(self) -> int:
        return self._read
