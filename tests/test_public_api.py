"""The package's top level exports every public error and worker event."""

from __future__ import annotations

import types

import d_engine_sm
from d_engine_sm import _worker, errors


def test_every_public_error_is_importable_from_the_package() -> None:
    missing = [name for name in errors.__all__ if name not in d_engine_sm.__all__]
    assert missing == []
    for name in errors.__all__:
        assert getattr(d_engine_sm, name) is getattr(errors, name)


def test_every_worker_event_is_exported() -> None:
    events = [
        name
        for name, value in vars(_worker).items()
        # 3.10 counts generic aliases such as list[int] as types; they are no events.
        if isinstance(value, type)
        and not isinstance(value, types.GenericAlias)
        and issubclass(value, _worker.WorkerEvent)
    ]
    assert "SnapshotSkipped" in events
    for name in events:
        assert name in d_engine_sm.__all__
        assert getattr(d_engine_sm, name) is getattr(_worker, name)


def test_all_is_sorted_and_resolves() -> None:
    assert sorted(d_engine_sm.__all__) == d_engine_sm.__all__
    for name in d_engine_sm.__all__:
        assert hasattr(d_engine_sm, name), name
