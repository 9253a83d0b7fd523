"""A snapshot node in its own process, for tests/test_grpc.py.

Serves d-engine's SnapshotService for one handler on 127.0.0.1 (free port),
prints ``PORT <n>``, then answers line commands on stdin:

- ``digest`` → ``DIGEST <sha256 hex> <key count> <last_applied>``
- ``latest`` → ``LATEST <index> <term> <checksum hex>`` or ``LATEST none``
- ``quit``   → stops the server, prints ``BYE`` and exits 0

Log records of ``d_engine_sm`` (transport at DEBUG) are printed as
``LOG <logger> <LEVEL> <message>`` lines, so tests can await events (an ack,
a failed install) instead of sleeping.

Run::

    python tests/grpc_node.py --dir DIR [--state memory|sqlite] [--seed-keys N]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from d_engine_sm import MemoryStateMachine, _kv
from d_engine_sm._config import SnapshotConfig
from d_engine_sm._handler import StateMachineHandler
from d_engine_sm._state_machine import StateMachine

_out_lock = threading.Lock()


def emit(line: str) -> None:
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class _LineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().replace("\n", " ")
        emit(f"LOG {record.name} {record.levelname} {text}")


def config(directory: Path, chunk_size: int) -> SnapshotConfig:
    return SnapshotConfig(
        snapshots_dir=directory,
        chunk_size=chunk_size,
        fsync=False,
        chunk_timeout=5.0,
        max_log_entries_before_snapshot=10**9,
    )


def digest(items: Mapping[bytes, bytes]) -> str:
    """Order-independent digest of a key/value state."""
    h = hashlib.sha256()
    for key in sorted(items):
        value = items[key]
        h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    return h.hexdigest()


def state_items(sm: StateMachine) -> dict[bytes, bytes]:
    items = getattr(sm, "items", None)
    if items is None:
        raise TypeError(f"{type(sm).__name__} has no items()")
    result: dict[bytes, bytes] = items()
    return result


def seed(handler: StateMachineHandler, keys: int, value_size: int, seed_value: int) -> None:
    """Apply ``keys`` inserts of random (incompressible) values, then snapshot."""
    rng = random.Random(seed_value)
    entries = [
        _kv.command_entry(i, 2, _kv.insert(b"key-%06d" % i, rng.randbytes(value_size)))
        for i in range(1, keys + 1)
    ]
    handler.apply_chunk(entries)
    handler.create_snapshot()


def make_state(spec: str, directory: Path) -> StateMachine:
    if spec == "memory":
        return MemoryStateMachine()
    if spec == "sqlite":
        from d_engine_sm._sqlite import SqliteStateMachine

        return SqliteStateMachine(directory / "state.db", durability="off")
    raise ValueError(f"unknown state {spec!r}")


def memory_handler(directory: Path, chunk_size: int, *, seed_keys: int = 0) -> StateMachineHandler:
    """An in-process node on a memory state machine, seeded with ``seed_keys`` 4 KiB values."""
    handler = StateMachineHandler(
        make_state("memory", directory), config(directory / "snapshots", chunk_size), node_id=1
    )
    if seed_keys:
        seed(handler, seed_keys, 4096, 7)
    return handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--state", default="memory")
    parser.add_argument("--chunk-size", type=int, default=16 * 1024)
    parser.add_argument("--seed-keys", type=int, default=0)
    parser.add_argument("--value-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--node-id", type=int, default=2)
    args = parser.parse_args(argv)

    log_handler = _LineHandler()
    root = logging.getLogger("d_engine_sm")
    root.addHandler(log_handler)
    root.setLevel(logging.INFO)
    logging.getLogger("d_engine_sm.transport").setLevel(logging.DEBUG)

    from d_engine_sm.transport import grpc as transport

    sm = make_state(args.state, args.dir)
    handler = StateMachineHandler(
        sm, config(args.dir / "snapshots", args.chunk_size), node_id=args.node_id
    )
    if args.seed_keys:
        seed(handler, args.seed_keys, args.value_size, args.seed)
    server, port = transport.start_server(handler, "127.0.0.1:0", current_term=2)
    emit(f"PORT {port}")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "digest":
            items = state_items(sm)
            emit(f"DIGEST {digest(items)} {len(items)} {handler.last_applied()}")
        elif cmd == "latest":
            meta = handler.get_latest_snapshot_metadata()
            if meta is None:
                emit("LATEST none")
            else:
                lid = meta.last_included
                emit(f"LATEST {lid.index} {lid.term} {meta.checksum.hex()}")
        elif cmd == "quit":
            break
        else:
            emit(f"ERROR unknown command {cmd!r}")
    server.stop(None)
    handler.close()
    emit("BYE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
