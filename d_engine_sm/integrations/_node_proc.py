"""One cluster node as a process, driven by JSON lines on stdin (for the
``cluster`` command, its benchmark and the tests).

``python -m d_engine_sm.integrations._node_proc --mode dsm|plain --self A
--partners B,C --dir DIR [--snapshot-addr S --snapshot-peers A=S,...]
[--option name=json ...]``

Prints ``{"ready": true}`` once the node runs, then answers each request
``{"id": n, "op": ..., ...}`` with ``{"id": n, "ok": bool, ...}`` (requests
run concurrently). Exits when stdin closes, so a dying parent leaves nothing
running. ``plain`` is PySyncObj on its own: a replicated dict with its
pickle dump, the baseline the figures compare against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated  # type: ignore[import-untyped]

_out_lock = threading.Lock()
# Set when the driver is gone (stdin closed, or nobody reads the answers) or
# asked to quit: long requests give up, so the process never outlives it.
_stopping = threading.Event()


class Stopping(RuntimeError):
    """The node is shutting down; a long request gave up."""


def _reply(message: dict[str, Any]) -> None:
    line = json.dumps(message)
    with _out_lock:
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # the driver died (or closed its end)
            _stopping.set()


def _poll_until(done: Callable[[], bool], deadline: float, timeout_message: str) -> None:
    """Wait, checking every 10 ms, until ``done()``; TimeoutError past ``deadline``
    (monotonic); given up when the node is stopping."""
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(timeout_message)
        if _stopping.wait(0.01):
            raise Stopping("the node is stopping")


def _acquire(sem: threading.BoundedSemaphore) -> None:
    """``sem.acquire()``, given up when the node is stopping."""
    while not sem.acquire(timeout=0.1):
        if _stopping.is_set():
            raise Stopping("the node is stopping")


class _Window:
    """At most ``size`` proposals in flight; counts outcomes."""

    def __init__(self, size: int) -> None:
        self.sem = threading.BoundedSemaphore(size)
        self.lock = threading.Lock()
        self.errors = 0
        self.max_index = 0
        self.done = 0

    def callback(self, result: Any, error: int) -> None:
        with self.lock:
            self.done += 1
            if error != FAIL_REASON.SUCCESS:
                self.errors += 1
            elif isinstance(result, int) and result > self.max_index:
                self.max_index = result
        self.sem.release()


class _Plain(SyncObj):  # type: ignore[misc]
    def __init__(self, self_addr: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, partners, conf)
        # Attributes set before SyncObj.__init__ are left out of its dump: the
        # dict is created after it (or by the first apply, on the tick thread).
        self.__dict__.setdefault("data", {})

    @property
    def items(self) -> dict[str, str]:
        return self.__dict__.get("data", {})  # type: ignore[no-any-return]

    @replicated  # type: ignore[untyped-decorator]
    def set(self, key: str, value: str) -> int:
        self.__dict__.setdefault("data", {})[key] = value
        return int(self.raftLastApplied) + 1


class Node:
    """The node under test, either flavour, behind one request interface."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.mode = args.mode
        self.dir = Path(args.dir)
        options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
        partners = [p for p in args.partners.split(",") if p]
        if self.mode == "plain":
            self.dir.mkdir(parents=True, exist_ok=True)
            conf = SyncObjConf(
                journalFile=str(self.dir / "raft.journal"),
                fullDumpFile=str(self.dir / "raft.dump"),
                **options,
            )
            self.plain = _Plain(args.self, partners, conf)
            return
        from d_engine_sm import SnapshotConfig, SqliteStateMachine, StateMachineHandler
        from d_engine_sm.integrations.pysyncobj import RaftNode

        self.sm = SqliteStateMachine(self.dir / "state.db", durability=args.durability)
        self.handler = StateMachineHandler(
            self.sm,
            SnapshotConfig(snapshots_dir=self.dir / "snapshots", fsync=args.durability != "off"),
        )
        peers = dict(p.split("=", 1) for p in args.snapshot_peers.split(",") if p)
        self.node = RaftNode(
            args.self,
            partners,
            self.handler,
            self.dir,
            snapshot_addr=args.snapshot_addr or None,
            snapshot_peers=peers,
            **options,
        )

    # -- requests ------------------------------------------------------------
    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        return dict(getattr(self, "op_" + op)(req))

    def op_status(self, _req: dict[str, Any]) -> dict[str, Any]:
        if self.mode == "plain":
            st = self.plain.getStatus()
            leader = st.get("leader")
            return {
                "leader": None if leader is None else str(leader),
                "term": st["raft_term"],
                "commit_index": st["commit_idx"],
                "last_applied": st["last_applied"],
            }
        return self.node.status()

    def op_cpu(self, _req: dict[str, Any]) -> dict[str, Any]:
        """CPU seconds of this process and of each of its threads, by thread name."""
        tick = os.sysconf("SC_CLK_TCK")
        threads: dict[str, float] = {}
        for t in threading.enumerate():
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # not Linux, or the thread just ended
                continue
            name = re.sub(r"_\d+$", "", t.name)  # pools number their threads
            threads[name] = threads.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        times = os.times()
        return {
            "process": times.user + times.system,
            "children": times.children_user + times.children_system,  # plain's dump forks
            "threads": threads,
        }

    def op_put(self, req: dict[str, Any]) -> dict[str, Any]:
        from d_engine_sm import commands

        r = self.node.propose(
            commands.insert(req["key"].encode(), req["value"].encode()), req.get("timeout", 5.0)
        )
        return {"index": r.index, "succeeded": r.succeeded}

    def op_cas(self, req: dict[str, Any]) -> dict[str, Any]:
        from d_engine_sm import commands

        expected = req["expected"]
        cmd = commands.compare_and_swap(
            req["key"].encode(),
            None if expected is None else expected.encode(),
            req["new"].encode(),
        )
        r = self.node.propose(cmd, req.get("timeout", 5.0))
        return {"index": r.index, "succeeded": r.succeeded}

    def op_get(self, req: dict[str, Any]) -> dict[str, Any]:
        found = self.node.read([req["key"].encode()], timeout=req.get("timeout", 5.0))
        return {"value": found[0].value.decode() if found else None}

    def op_load(self, req: dict[str, Any]) -> dict[str, Any]:
        """Write ``count`` keys with ``window`` proposals in flight; wait until applied here."""
        count, prefix, size = req["count"], req["prefix"], req["value_size"]
        window = _Window(req.get("window", 1000))
        # Distinct random values (a pool), so archives and dumps are not all repetition.
        pool = [os.urandom(size // 2 + 1).hex()[:size] for _ in range(4096)]
        started = time.perf_counter()
        for i in range(count):
            _acquire(window.sem)
            key = f"{prefix}{i:09d}"
            if self.mode == "plain":
                self.plain.set(key, pool[i % 4096], callback=window.callback)  # pyright: ignore[reportCallIssue]
            else:
                from d_engine_sm import commands

                self.node.propose_async(
                    commands.insert(key.encode(), pool[i % 4096].encode()), callback=window.callback
                )
        for _ in range(req.get("window", 1000)):
            _acquire(window.sem)
        self._wait_applied(window.max_index, req.get("timeout", 300.0))
        return {"seconds": time.perf_counter() - started, "count": count, "errors": window.errors}

    def _applied(self) -> int:
        if self.mode == "plain":
            return int(self.plain.raftLastApplied)
        return self.handler.last_applied()

    def _wait_applied(self, index: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.mode != "plain":
            self.handler.wait_applied(index, timeout)
            return
        message = f"index {index} not applied in {timeout}s"
        _poll_until(lambda: self._applied() >= index, deadline, message)

    def op_wait(self, req: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        self._wait_applied(req["index"], req.get("timeout", 120.0))
        return {"seconds": time.perf_counter() - started}

    def op_digest(self, _req: dict[str, Any]) -> dict[str, Any]:
        if self.mode == "plain":
            items = sorted((k.encode(), v.encode()) for k, v in list(self.plain.items.items()))
        else:
            items = sorted(self.sm.items().items())
        sha = hashlib.sha256()
        for k, v in items:
            sha.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
        return {"digest": sha.hexdigest(), "keys": len(items), "last_applied": self._applied()}

    def op_compact(self, req: dict[str, Any]) -> dict[str, Any]:
        """Force a log compaction and time it until its snapshot/dump exists."""
        timeout = req.get("timeout", 300.0)
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        if self.mode == "plain":
            dump = self.dir / "raft.dump"
            before = dump.stat().st_mtime_ns if dump.exists() else 0
            self.plain.forceLogCompaction()
            _poll_until(
                lambda: dump.exists() and dump.stat().st_mtime_ns != before, deadline, "no dump"
            )
            return {"seconds": time.perf_counter() - started, "bytes": dump.stat().st_size}
        before = self.node.status()["snapshots_created"]
        self.node.force_compaction()
        _poll_until(
            lambda: self.node.status()["snapshots_created"] != before, deadline, "no snapshot"
        )
        meta = self.handler.get_latest_snapshot_metadata()
        size = 0
        if meta is not None:
            lid = meta.last_included
            from d_engine_sm._snapshot.naming import archive_name

            name = archive_name(self.handler.config.snapshots_dir_prefix, lid.index, lid.term)
            size = (self.dir / "snapshots" / name).stat().st_size
        return {"seconds": time.perf_counter() - started, "bytes": size}

    def close(self) -> None:
        if self.mode == "plain":
            self.plain.destroy_synchronous()
            return
        self.node.close()
        self.handler.close()
        self.sm.close()


def _serve(node: Node) -> None:
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="node-req")

    def run(req: dict[str, Any]) -> None:
        try:
            out = node.handle(req)
            out.update(id=req["id"], ok=True)
        except Exception as exc:  # reported to the driver, which decides
            out = {"id": req["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            out["maybe_applied"] = bool(getattr(exc, "maybe_applied", True))
        _reply(out)

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        pool.submit(run, req)
    # Quit or EOF: nobody waits for long requests any more. They give up, and
    # closing the node (next) fails the rest, so the pool's threads end.
    _stopping.set()
    pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d-engine-sm-node")
    parser.add_argument("--mode", choices=("dsm", "plain"), default="dsm")
    parser.add_argument("--self", required=True)
    parser.add_argument("--partners", default="")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--snapshot-addr", default="")
    parser.add_argument("--snapshot-peers", default="")
    parser.add_argument("--durability", default="normal")
    parser.add_argument("--option", action="append", default=[])
    parser.add_argument("--log", default="")
    args = parser.parse_args(argv)
    if args.log:
        logging.basicConfig(
            filename=args.log,
            level=logging.INFO,
            format="%(asctime)s %(threadName)s %(name)s %(message)s",
        )
    node = Node(args)
    _reply({"ready": True, "pid": os.getpid()})
    try:
        _serve(node)
    finally:
        node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
