"""Build the entries and ``WriteCommand`` payloads the built-in key/value
state machines execute.

``insert``, ``delete`` and ``compare_and_swap`` return the encoded command
bytes; ``entry`` wraps command bytes in a log entry and ``noop`` builds a
noop entry. All are pure functions: thread-safe, never blocking.

>>> from d_engine_sm import commands
>>> e = commands.entry(1, 1, commands.insert(b"k", b"v"))
>>> (e.index, e.term)
(1, 1)
"""

from __future__ import annotations

from d_engine_sm._kv import command_entry as entry
from d_engine_sm._kv import compare_and_swap, delete, insert
from d_engine_sm._kv import noop_entry as noop

__all__ = ["compare_and_swap", "delete", "entry", "insert", "noop"]
