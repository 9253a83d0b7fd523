"""One apply batch of SqliteStateMachine, as SQL: an overlay of the batch's
writes (last write per key wins) flushed with multi-row statements."""

from __future__ import annotations

import sqlite3
from itertools import chain
from typing import Final

from d_engine_sm import _kv

_ROWS_PER_STATEMENT: Final = 128  # rows per multi-row statement (x3 params < SQLite's old 999 cap)


def _statements(head: str, row: str, sep: str = ", ", tail: str = "") -> dict[int, str]:
    """SQL with 128, 64, ... 1 row placeholders: any count is a sum of these."""
    sizes = [_ROWS_PER_STATEMENT >> i for i in range(_ROWS_PER_STATEMENT.bit_length())]
    return {n: head + sep.join([row] * n) + tail for n in sizes}


# One multi-row statement binds ~2x faster than executemany (one step, no
# per-row reset); power-of-two sizes keep the statement cache small.
_UPSERT2: Final = _statements("INSERT OR REPLACE INTO kv(key, value) VALUES ", "(?, ?)")
_UPSERT3: Final = _statements(
    "INSERT OR REPLACE INTO kv(key, value, expires_at) VALUES ", "(?, ?, ?)"
)
_DELETE: Final = _statements("DELETE FROM kv WHERE key IN (", "?", ", ", ")")
SELECT_ONE: Final = "SELECT value, expires_at FROM kv WHERE key = ?"


class OverlayOps(_kv.KvOps):
    """Collects one batch's writes, last write per key; reads fall through to the DB.

    A key lives in exactly one of ``plain`` (no TTL; None = deleted) and
    ``ttl``, so the two ``executemany`` calls that flush them commute.
    ``plain`` maps key -> value so ``plain.items()`` already yields the SQL
    parameter rows: no tuple is built per entry on the hot path.
    """

    __slots__ = ("conn", "deletes", "plain", "ttl")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.plain: dict[bytes, bytes | None] = {}
        self.ttl: dict[bytes, tuple[bytes, bytes, float]] = {}
        self.deletes = False

    def put(self, key: bytes, value: bytes, expires_at: float | None) -> None:
        if expires_at is None:
            self.plain[key] = value
            if self.ttl:
                self.ttl.pop(key, None)
        else:
            self.ttl[key] = (key, value, expires_at)
            self.plain.pop(key, None)

    def delete(self, key: bytes) -> None:
        self.plain[key] = None
        self.deletes = True
        if self.ttl:
            self.ttl.pop(key, None)

    def get_live(self, key: bytes, now: float) -> bytes | None:
        if key in self.plain:
            return self.plain[key]
        if key in self.ttl:
            _, value, at = self.ttl[key]
        else:
            found = self.conn.execute(SELECT_ONE, (key,)).fetchone()
            if found is None:
                return None
            value, at = found
        return value if at is None or at > now else None

    def flush(self) -> None:
        """Write the collected batch (inside the caller's transaction)."""
        db = self.conn
        plain = self.plain
        if self.deletes:
            live = [kv for kv in plain.items() if kv[1] is not None]
            _execute_rows(db, _UPSERT2, list(chain.from_iterable(live)), 2)
            _execute_rows(db, _DELETE, [k for k, v in plain.items() if v is None], 1)
        elif plain:
            _execute_rows(db, _UPSERT2, list(chain.from_iterable(plain.items())), 2)
        if self.ttl:
            _execute_rows(db, _UPSERT3, list(chain.from_iterable(self.ttl.values())), 3)


def _execute_rows(
    db: sqlite3.Connection, statements: dict[int, str], flat: list[object], width: int
) -> None:
    """Run ``statements`` over ``flat`` (rows of ``width`` params, concatenated)."""
    count = len(flat) // width
    done = 0
    size = _ROWS_PER_STATEMENT
    while done < count:
        while size > count - done:
            size >>= 1
        db.execute(statements[size], flat[done * width : (done + size) * width])
        done += size
