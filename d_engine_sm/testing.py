"""A pytest conformance suite any :class:`~d_engine_sm.StateMachine` can run.

Subclass :class:`StateMachineConformance` in a test module (the class name
must start with ``Test`` for pytest to collect it)::

    from pathlib import Path
    from d_engine_sm.testing import StateMachineConformance

    def make_sm(path: Path) -> MySM:          # importable: the crash test's
        return MySM(path / "db")              # subprocess calls it too

    class TestMySM(StateMachineConformance):
        durable = True                        # data survives stop/reopen/kill
        factory = "mypkg.tests.factories:make_sm"   # or None: skip SIGKILL test

        def make_state_machine(self, path: Path) -> MySM:
            return make_sm(path)              # same path reopens the same storage

The tests follow d-engine's suite (S001-S012) plus TTL, undecodable
commands, noop/config entries, snapshot into a fresh instance, and SIGKILL
recovery. The state machine must execute d-engine's ``WriteCommand``
key/value commands (as the built-ins do).

TTL: when :meth:`StateMachineConformance.make_state_machine_with_clock`
is implemented (a state machine reading time from the given callable),
expiry is checked exactly; otherwise only that ``ttl_secs=0`` never
expires and a long TTL is readable.

Only pytest is required. A state machine is disposed of with ``close()``
when it has one, else ``stop()``.
"""

from __future__ import annotations

import gc
import importlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from d_engine_sm import _kv
from d_engine_sm._state_machine import StateMachine, overrides_prepare
from d_engine_sm._values import log_id
from d_engine_sm.proto import common_pb2, storage_pb2

Entry = common_pb2.Entry

_CRASH_BATCH = 25
_CRASH_KEYS = 97
_CRASH_LINES = 12  # reports read before the kill
_CRASH_DEADLINE = 60.0


def ins(index: int, key: bytes, value: bytes, *, ttl: int = 0, term: int = 1) -> Entry:
    """An Insert entry."""
    return _kv.command_entry(index, term, _kv.insert(key, value, ttl))


def dele(index: int, key: bytes, *, term: int = 1) -> Entry:
    """A Delete entry."""
    return _kv.command_entry(index, term, _kv.delete(key))


def cas(index: int, key: bytes, expected: bytes | None, new: bytes, *, term: int = 1) -> Entry:
    """A CompareAndSwap entry (``expected=None``: the key must be absent)."""
    return _kv.command_entry(index, term, _kv.compare_and_swap(key, expected, new))


def crash_workload(index: int) -> Entry:
    """Entry ``index`` of the deterministic SIGKILL workload (inserts and deletes)."""
    key = b"k%d" % (index % _CRASH_KEYS)
    if index % 7 == 0:
        return dele(index, key)
    return ins(index, key, b"v%d" % index)


def crash_expected(last: int) -> dict[bytes, bytes]:
    """The key/value state after applying ``crash_workload(1..last)``."""
    state: dict[bytes, bytes] = {}
    for index in range(1, last + 1):
        key = b"k%d" % (index % _CRASH_KEYS)
        if index % 7 == 0:
            state.pop(key, None)
        else:
            state[key] = b"v%d" % index
    return state


def load_factory(spec: str) -> Callable[[Path], StateMachine]:
    """Import ``"module:attribute"``."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"factory must look like 'module:callable', got {spec!r}")
    factory: Callable[[Path], StateMachine] = getattr(importlib.import_module(module), attr)
    return factory


def crash_child_main(argv: list[str] | None = None) -> None:
    """Subprocess body of the SIGKILL test: apply batches forever, report each.

    Args (argv): factory spec, storage path, batch size. Prints the last
    index of every batch after ``apply_chunk`` returns, flushed.
    """
    spec, path, batch_text = argv if argv is not None else sys.argv[1:4]
    batch = int(batch_text)
    sm = load_factory(spec)(Path(path))
    first = sm.last_applied().index + 1
    out = sys.stdout
    for start in range(first, first + 10_000_000, batch):
        sm.apply_chunk([crash_workload(i) for i in range(start, start + batch)])
        out.write(f"{start + batch - 1}\n")
        out.flush()


def run_until_killed(
    factory: str, path: Path, *, batch: int = _CRASH_BATCH, lines: int = _CRASH_LINES
) -> int:
    """Run :func:`crash_child_main` in a subprocess, SIGKILL it after ``lines``
    reports, and return the last index it reported (all output drained).

    Raises:
        AssertionError: the child exited or fell silent before ``lines`` reports.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    code = "from d_engine_sm.testing import crash_child_main; crash_child_main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, factory, str(path), str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + _CRASH_DEADLINE
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while seen.count(b"\n") < lines:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError("crash child reported too slowly")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    err = proc.stderr.read().decode(errors="replace")
                    raise AssertionError(f"crash child exited early: {err[-2000:]}")
                seen += chunk
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=_CRASH_DEADLINE)
        seen += proc.stdout.read()  # what it printed before dying
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"child ended with {proc.returncode}"
    complete = seen[: seen.rfind(b"\n")].split(b"\n")
    return int(complete[-1])


def dispose(sm: StateMachine) -> None:
    """``close()`` when the state machine has one, else ``stop()``."""
    close = getattr(sm, "close", None)
    if callable(close):
        close()
    else:
        sm.stop()


def _lid(sm: StateMachine) -> tuple[int, int]:
    last = sm.last_applied()
    return (int(last.index), int(last.term))


class StateMachineConformance:
    """Conformance tests for a StateMachine; subclass as ``Test…`` and implement
    :meth:`make_state_machine`.

    Attributes:
        durable: data and ``last_applied`` survive stop/reopen and a crash
            (enables the reopen tests).
        factory: ``"module:callable"`` building the state machine from the
            same path as :meth:`make_state_machine`, importable in a fresh
            interpreter (sys.path is passed on); enables the SIGKILL test
            when ``durable``. None skips it.
    """

    durable: ClassVar[bool] = False
    factory: ClassVar[str | None] = None

    def make_state_machine(self, path: Path) -> StateMachine:
        """A state machine stored under ``path`` (an existing empty dir at first)."""
        raise NotImplementedError("subclasses implement make_state_machine(path)")

    def make_state_machine_with_clock(
        self, path: Path, clock: Callable[[], float]
    ) -> StateMachine | None:
        """Like :meth:`make_state_machine` with a wall clock; None if unsupported."""
        return None

    # -- helpers ---------------------------------------------------------
    def _open(self, path: Path) -> StateMachine:
        path.mkdir(parents=True, exist_ok=True)
        return self.make_state_machine(path)

    def _need_durable(self) -> None:
        if not self.durable:
            pytest.skip("state machine is not durable")

    @staticmethod
    def _assert_state(
        sm: StateMachine, expected: dict[bytes, bytes], keys: Iterable[bytes]
    ) -> None:
        for key in keys:
            assert sm.get(key) == expected.get(key), f"key {key!r}"
        assert len(sm) == len(expected)

    # -- S001 ------------------------------------------------------------
    def test_start_stop(self, tmp_path: Path) -> None:
        """Fresh instances run; ``stop`` then ``start`` toggles ``is_running``."""
        sm = self._open(tmp_path / "sm")
        try:
            assert sm.is_running()
            sm.start()
            assert sm.is_running()
            sm.stop()
            assert not sm.is_running()
            sm.start()
            assert sm.is_running()
        finally:
            dispose(sm)

    # -- S002 / S003 -----------------------------------------------------
    def test_insert_then_delete(self, tmp_path: Path) -> None:
        """Insert then Delete a key; ``last_applied`` follows."""
        sm = self._open(tmp_path / "sm")
        try:
            assert [r.succeeded for r in sm.apply_chunk([ins(1, b"k", b"v")])] == [True]
            assert sm.get(b"k") == b"v"
            assert [r.succeeded for r in sm.apply_chunk([dele(2, b"k")])] == [True]
            assert sm.get(b"k") is None
            assert _lid(sm) == (2, 1)
        finally:
            dispose(sm)

    def test_get_many_matches_get(self, tmp_path: Path) -> None:
        """``get_many`` answers exactly like ``get`` per key, in order."""
        sm = self._open(tmp_path / "sm")
        try:
            sm.apply_chunk([ins(i, b"k%d" % i, b"v%d" % i) for i in range(1, 1201)])
            keys = [b"k%d" % i for i in range(0, 1300, 3)] + [b"k5", b"k5", b""]
            assert sm.get_many(keys) == [sm.get(k) for k in keys]
            assert sm.get_many([]) == []
        finally:
            dispose(sm)

    def test_chunk_applies_in_order(self, tmp_path: Path) -> None:
        """One result per entry, in order; an empty chunk changes nothing."""
        sm = self._open(tmp_path / "sm")
        try:
            results = sm.apply_chunk(
                [ins(1, b"k1", b"v1"), ins(2, b"k2", b"v2"), dele(3, b"k1"), ins(4, b"k3", b"v3")]
            )
            assert [(r.index, r.succeeded) for r in results] == [(i, True) for i in range(1, 5)]
            self._assert_state(sm, {b"k2": b"v2", b"k3": b"v3"}, [b"k1", b"k2", b"k3"])
            assert _lid(sm) == (4, 1)
            assert sm.apply_chunk([]) == []
            assert _lid(sm) == (4, 1)
        finally:
            dispose(sm)

    def test_overwrite_and_delete_within_one_chunk(self, tmp_path: Path) -> None:
        """Later writes in a chunk see earlier ones (last write wins)."""
        sm = self._open(tmp_path / "sm")
        try:
            sm.apply_chunk(
                [ins(1, b"a", b"1"), ins(2, b"a", b"2"), dele(3, b"b"), ins(4, b"b", b"x")]
            )
            sm.apply_chunk([dele(5, b"b"), ins(6, b"c", b""), ins(7, b"", b"empty-key")])
            self._assert_state(
                sm, {b"a": b"2", b"c": b"", b"": b"empty-key"}, [b"a", b"b", b"c", b""]
            )
        finally:
            dispose(sm)

    # -- S004 ------------------------------------------------------------
    def test_compare_and_swap(self, tmp_path: Path) -> None:
        """CAS succeeds only on a match (``None``: key absent) and sees earlier writes."""
        sm = self._open(tmp_path / "sm")
        try:
            ok = sm.apply_chunk([cas(1, b"lock", None, b"owner1")])
            assert ok[0].succeeded and sm.get(b"lock") == b"owner1"
            ok = sm.apply_chunk([cas(2, b"lock", b"owner1", b"owner2")])
            assert ok[0].succeeded and sm.get(b"lock") == b"owner2"
            miss = sm.apply_chunk([cas(3, b"lock", b"wrong", b"owner3")])
            assert not miss[0].succeeded and sm.get(b"lock") == b"owner2"
            present = sm.apply_chunk([cas(4, b"lock", None, b"owner4")])
            assert not present[0].succeeded and sm.get(b"lock") == b"owner2"
            absent = sm.apply_chunk([cas(5, b"none", b"x", b"y")])
            assert not absent[0].succeeded and sm.get(b"none") is None
            # Within one chunk CAS sees the writes before it.
            chained = sm.apply_chunk(
                [
                    ins(6, b"c", b"1"),
                    cas(7, b"c", b"1", b"2"),
                    dele(8, b"c"),
                    cas(9, b"c", None, b"3"),
                ]
            )
            assert [r.succeeded for r in chained] == [True, True, True, True]
            assert sm.get(b"c") == b"3"
            assert _lid(sm) == (9, 1)
        finally:
            dispose(sm)

    # -- payload kinds ---------------------------------------------------
    def test_noop_config_and_undecodable_entries(self, tmp_path: Path) -> None:
        """Noop, config and bad commands are applied; bad ones fail, changing nothing."""
        sm = self._open(tmp_path / "sm")
        try:
            sm.apply_chunk([ins(1, b"k", b"v")])
            config = Entry(
                index=3,
                term=2,
                payload=common_pb2.EntryPayload(config=common_pb2.MembershipChange()),
            )
            results = sm.apply_chunk(
                [
                    _kv.noop_entry(2, 2),
                    config,
                    _kv.command_entry(4, 2, b"\xff\xff\xff"),  # not a protobuf
                    _kv.command_entry(5, 2, b""),  # a WriteCommand with no operation
                    Entry(index=6, term=2),  # no payload at all
                ]
            )
            assert [(r.index, r.succeeded) for r in results] == [
                (2, True),
                (3, True),
                (4, False),
                (5, False),
                (6, True),
            ]
            self._assert_state(sm, {b"k": b"v"}, [b"k"])
            assert _lid(sm) == (6, 2)
        finally:
            dispose(sm)

    # -- TTL -------------------------------------------------------------
    def test_ttl(self, tmp_path: Path) -> None:
        """TTL 0 never expires; with a clock, expiry is exact; cleanup removes expired keys."""
        now = [1_000_000.0]
        sm = self.make_state_machine_with_clock(tmp_path / "sm", lambda: now[0])
        exact = sm is not None
        if sm is None:
            sm = self._open(tmp_path / "sm")
        try:
            sm.apply_chunk(
                [
                    ins(1, b"forever", b"a", ttl=0),
                    ins(2, b"short", b"b", ttl=5),
                    ins(3, b"long", b"c", ttl=3600),
                ]
            )
            assert sm.get(b"forever") == b"a"
            assert sm.get(b"long") == b"c"
            if not exact:
                return
            assert sm.get(b"short") == b"b"
            now[0] += 5  # expiry is inclusive
            assert sm.get(b"short") is None
            assert sm.get(b"long") == b"c"
            # An expired key is absent for CompareAndSwap too.
            assert sm.apply_chunk([cas(4, b"short", b"b", b"x")])[0].succeeded is False
            assert sm.apply_chunk([cas(5, b"gone", None, b"y", term=1)])[0].succeeded
            now[0] += 10
            sm.apply_chunk([ins(6, b"short", b"fresh")])  # no TTL: never expires
            now[0] += 10_000
            assert sm.get(b"short") == b"fresh"
            assert sm.get(b"long") is None
            cleaned = set(sm.lease_background_cleanup())
            assert cleaned <= {b"long"}
            assert sm.get(b"forever") == b"a"
        finally:
            dispose(sm)

    # -- S005 / S012 -----------------------------------------------------
    def test_reset(self, tmp_path: Path) -> None:
        """``reset`` empties the state and metadata; indices restart at 1."""
        sm = self._open(tmp_path / "sm")
        try:
            sm.apply_chunk([ins(1, b"a", b"1"), ins(2, b"b", b"2", term=2)])
            sm.persist_last_snapshot_metadata(
                storage_pb2.SnapshotMetadata(last_included=log_id(1, 1))
            )
            sm.reset()
            assert _lid(sm) == (0, 0)
            assert sm.snapshot_metadata() is None
            assert sm.is_running()
            self._assert_state(sm, {}, [b"a", b"b"])
            sm.apply_chunk([ins(1, b"c", b"3"), ins(2, b"d", b"4")])
            assert _lid(sm) == (2, 1)
            self._assert_state(sm, {b"c": b"3", b"d": b"4"}, [b"a", b"b", b"c", b"d"])
        finally:
            dispose(sm)

    def test_last_applied_and_entry_term(self, tmp_path: Path) -> None:
        """``last_applied`` tracks terms; ``entry_term`` is None outside what was applied."""
        sm = self._open(tmp_path / "sm")
        try:
            assert _lid(sm) == (0, 0)
            sm.apply_chunk([ins(1, b"a", b"1"), ins(2, b"a", b"2"), ins(3, b"a", b"3", term=2)])
            assert _lid(sm) == (3, 2)
            assert sm.entry_term(0) is None
            assert sm.entry_term(4) is None
            assert sm.entry_term(3) in (2, None)
            assert sm.entry_term(1) in (1, None)
        finally:
            dispose(sm)

    # -- S007 ------------------------------------------------------------
    def test_persist_metadata_and_flush(self, tmp_path: Path) -> None:
        """The persist methods and ``flush`` succeed and keep what they recorded."""
        sm = self._open(tmp_path / "sm")
        try:
            sm.apply_chunk([ins(1, b"a", b"1"), ins(2, b"b", b"2")])
            sm.persist_last_applied(log_id(2, 1))
            meta = storage_pb2.SnapshotMetadata(last_included=log_id(2, 1), checksum=bytes(32))
            sm.persist_last_snapshot_metadata(meta)
            sm.flush()
            assert _lid(sm) == (2, 1)
            assert sm.snapshot_metadata() == meta
        finally:
            dispose(sm)

    # -- S006: snapshot into a fresh instance ----------------------------
    def test_snapshot_into_fresh_instance(self, tmp_path: Path) -> None:
        """A snapshot installed elsewhere replaces the whole state, exactly at its LogId."""
        source = self._open(tmp_path / "source")
        target = self._open(tmp_path / "target")
        try:
            source.apply_chunk([ins(1, b"k1", b"v1"), ins(2, b"k2", b"v2"), dele(3, b"k1")])
            source.apply_chunk([ins(4, b"k3", b"v3", term=2)])
            last_included = source.last_applied()
            expected = {b"k2": b"v2", b"k3": b"v3"}
            source.prepare_snapshot()
            if overrides_prepare(source):
                # Applies may run after prepare: the snapshot must not see them.
                source.apply_chunk([ins(5, b"late", b"x", term=2), dele(6, b"k2", term=2)])
            snap_dir = tmp_path / "snap"
            snap_dir.mkdir()
            source.generate_snapshot_data(snap_dir, last_included)

            target.apply_chunk([ins(i, b"old%d" % i, b"o") for i in range(1, 8)])
            meta = storage_pb2.SnapshotMetadata(last_included=last_included, checksum=b"\x01" * 32)
            target.apply_snapshot_from_file(meta, snap_dir)
            keys = [b"k1", b"k2", b"k3", b"late"] + [b"old%d" % i for i in range(1, 8)]
            self._assert_state(target, expected, keys)
            assert _lid(target) == (4, 2)
            assert target.snapshot_metadata() == meta
            target.apply_chunk([ins(5, b"after", b"y", term=2)])
            assert target.get(b"after") == b"y"
            assert _lid(target) == (5, 2)
        finally:
            dispose(source)
            dispose(target)

    def test_prepare_install_changes_nothing_until_the_install(self, tmp_path: Path) -> None:
        """``prepare_install`` leaves the live state alone while applies go on; a
        prepared install that never follows changes nothing; the next one installs."""
        source = self._open(tmp_path / "source")
        target = self._open(tmp_path / "target")
        try:
            source.apply_chunk([ins(i, b"k%d" % i, b"v%d" % i, term=2) for i in range(1, 11)])
            last_included = source.last_applied()
            source.prepare_snapshot()
            snap = tmp_path / "snap"
            snap.mkdir()
            source.generate_snapshot_data(snap, last_included)
            abandoned, used = tmp_path / "abandoned", tmp_path / "used"
            shutil.copytree(snap, abandoned)
            shutil.copytree(snap, used)
            meta = storage_pb2.SnapshotMetadata(last_included=last_included, checksum=b"\x02" * 32)

            target.apply_chunk([ins(1, b"old", b"o")])
            target.prepare_install(meta, abandoned)  # no install follows (turned stale, say)
            target.apply_chunk([ins(2, b"during", b"d")])
            before = {b"old": b"o", b"during": b"d"}
            self._assert_state(target, before, [b"old", b"during", b"k1", b"k10"])
            assert _lid(target) == (2, 1)
            assert target.snapshot_metadata() is None
            shutil.rmtree(abandoned)  # as the handler does with its scratch directory

            target.prepare_install(meta, used)
            self._assert_state(target, before, [b"old", b"during", b"k1"])
            target.apply_snapshot_from_file(meta, used)
            expected = {b"k%d" % i: b"v%d" % i for i in range(1, 11)}
            self._assert_state(target, expected, [b"old", b"during", *expected])
            assert _lid(target) == (10, 2)
            assert target.snapshot_metadata() == meta
        finally:
            dispose(source)
            dispose(target)

    # -- S008 / S010: reopen after stop ----------------------------------
    def test_reopen_after_stop(self, tmp_path: Path) -> None:
        """(durable) Data, ``last_applied`` and snapshot metadata survive stop and reopen."""
        self._need_durable()
        sm = self._open(tmp_path / "sm")
        meta = storage_pb2.SnapshotMetadata(last_included=log_id(2, 1), checksum=b"\x02" * 32)
        try:
            sm.apply_chunk([ins(1, b"a", b"1"), ins(2, b"b", b"2"), dele(3, b"a", term=2)])
            sm.persist_last_snapshot_metadata(meta)
            sm.stop()
        finally:
            dispose(sm)
        again = self._open(tmp_path / "sm")
        try:
            assert _lid(again) == (3, 2)
            self._assert_state(again, {b"b": b"2"}, [b"a", b"b"])
            assert again.snapshot_metadata() == meta
            again.apply_chunk([ins(4, b"c", b"3", term=2)])
            assert again.get(b"c") == b"3"
        finally:
            dispose(again)

    # -- S009 / S011: dropped without stop or flush ----------------------
    def test_reopen_after_drop_without_stop(self, tmp_path: Path) -> None:
        """(durable) An instance dropped without ``stop`` or ``flush`` loses nothing."""
        self._need_durable()
        sm: Any = self._open(tmp_path / "sm")
        sm.apply_chunk([ins(1, b"a", b"1"), ins(2, b"b", b"2"), ins(3, b"c", b"3")])
        del sm
        gc.collect()
        again = self._open(tmp_path / "sm")
        try:
            assert _lid(again) == (3, 1)
            self._assert_state(again, {b"a": b"1", b"b": b"2", b"c": b"3"}, [b"a", b"b", b"c"])
        finally:
            dispose(again)

    # -- crash -----------------------------------------------------------
    def test_sigkill_recovery(self, tmp_path: Path) -> None:
        """(durable, ``factory``) SIGKILL loses no returned batch; state matches its index."""
        self._need_durable()
        if self.factory is None:
            pytest.skip("no factory: cannot rebuild the state machine in a subprocess")
        if not hasattr(signal, "SIGKILL"):
            pytest.skip("needs SIGKILL")
        path = tmp_path / "sm"
        path.mkdir()
        reported = run_until_killed(self.factory, path)
        sm = self.make_state_machine(path)
        try:
            last = sm.last_applied().index
            assert last >= reported, f"lost applies: last_applied {last} < reported {reported}"
            expected = crash_expected(last)
            keys = [b"k%d" % i for i in range(_CRASH_KEYS)]
            self._assert_state(sm, expected, keys)
            # And it carries on from there.
            sm.apply_chunk([crash_workload(last + 1)])
            assert sm.last_applied().index == last + 1
        finally:
            dispose(sm)
