"""A local cluster of node processes on 127.0.0.1 (``_node_proc``), for the
``cluster`` command, its benchmark and the tests.

Every process is started with a pipe on stdin, so it exits when this side
goes away; :meth:`Cluster.close` kills whatever is still running.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final

from d_engine_sm._closing import Closing

READY_TIMEOUT: Final = 30.0
EXIT_GRACE: Final = 5.0  # seconds a node whose output closed gets to exit


class NodeDied(RuntimeError):
    """The node process ended (or was killed) while a request was pending."""


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all bound at once, so distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NodeProc:
    """One node process and its request channel."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._argv = argv
        self._log = log
        self._lock = threading.Lock()
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._next = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        with open(self._log, "ab") as err:
            self.proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                start_new_session=True,
            )
        ready: Future[dict[str, Any]] = Future()
        threading.Thread(target=self._read, args=(self.proc, ready), daemon=True).start()
        _result(ready, READY_TIMEOUT)

    def _read(self, proc: subprocess.Popen[str], ready: Future[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                ready.set_result(msg)
                continue
            with self._lock:
                fut = self._pending.pop(msg["id"], None)
            if fut is not None:
                fut.set_result(msg)
        try:  # its output closed: it is exiting (reaped here so the code is known)
            rc: int | None = proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            rc = None
        state = "closed its output" if rc is None else f"exited rc={rc}"
        died = NodeDied(f"node process {state}; log: {self._log}")
        if not ready.done():
            ready.set_exception(died)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(died)

    def request(self, op: str, **kw: Any) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            fut.set_exception(NodeDied("node is not running"))
            return fut
        with self._lock:
            self._next += 1
            rid = self._next
            self._pending[rid] = fut
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"id": rid, "op": op, **kw}) + "\n")
                proc.stdin.flush()
            except OSError as exc:
                self._pending.pop(rid, None)
                fut.set_exception(NodeDied(f"node pipe closed: {exc}"))
        return fut

    def call(self, op: str, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
        """Run ``op`` (the node gets ``timeout`` too); RuntimeError with its message on failure."""
        out = _result(self.request(op, timeout=timeout, **kw), timeout + 10.0)
        if not out["ok"]:
            raise RuntimeError(out["error"])
        return out

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process (no clean shutdown) and reap it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the node to close cleanly; kill it if it does not in time."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


class Cluster(Closing):
    """``n`` nodes (``mode`` "dsm" or "plain") in ``root``; a context manager."""

    def __init__(
        self,
        root: Path,
        n: int = 3,
        *,
        mode: str = "dsm",
        options: dict[str, Any] | None = None,
        durability: str = "normal",
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        ports = free_ports(2 * n)
        self.addrs = [f"127.0.0.1:{p}" for p in ports[:n]]
        self.snap_addrs = [f"127.0.0.1:{p}" for p in ports[n:]]
        peers = ",".join(f"{a}={s}" for a, s in zip(self.addrs, self.snap_addrs, strict=True))
        self.nodes: list[NodeProc] = []
        for i, addr in enumerate(self.addrs):
            argv = [
                sys.executable, "-m", "d_engine_sm.integrations._node_proc",
                "--mode", mode,
                "--self", addr,
                "--partners", ",".join(a for a in self.addrs if a != addr),
                "--dir", str(self.node_dir(i)),
                "--durability", durability,
                "--log", str(self.root / f"node{i}.log"),
            ]  # fmt: skip
            if mode == "dsm":
                argv += ["--snapshot-addr", self.snap_addrs[i], "--snapshot-peers", peers]
            for key, value in (options or {}).items():
                argv += ["--option", f"{key}={json.dumps(value)}"]
            self.nodes.append(NodeProc(argv, self.root / f"node{i}.stderr"))

    def node_dir(self, i: int) -> Path:
        return self.root / f"node{i}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def wait_leader(self, timeout: float = 30.0, among: list[int] | None = None) -> int:
        """Index of the node all running ones agree leads."""
        deadline = time.monotonic() + timeout
        idx = among if among is not None else list(range(len(self.nodes)))
        while time.monotonic() < deadline:
            try:
                leaders = {
                    self.nodes[i].call("status", timeout=5)["leader"]
                    for i in idx
                    if self.nodes[i].running
                }
            except (RuntimeError, NodeDied, TimeoutError):
                leaders = {None}
            if len(leaders) == 1 and None not in leaders:
                leader = leaders.pop()
                if leader in self.addrs:
                    return self.addrs.index(leader)
            time.sleep(0.05)
        raise TimeoutError(f"no agreed leader within {timeout}s")

    def wipe(self, i: int) -> None:
        shutil.rmtree(self.node_dir(i), ignore_errors=True)

    def close(self) -> None:
        threads = [threading.Thread(target=n.stop, args=(20.0,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in self.nodes:
            n.kill()


def _result(fut: Future[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """``fut.result(timeout)``, raising the builtin ``TimeoutError`` on every Python.

    Before 3.11 ``concurrent.futures.TimeoutError`` is a class of its own, which
    ``except TimeoutError`` does not catch.
    """
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError as exc:
        raise TimeoutError(f"no answer from the node within {timeout:g} s") from exc
