"""``with`` / ``async with`` support for everything that has an idempotent ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

_C = TypeVar("_C", bound="Closing")
_A = TypeVar("_A", bound="AsyncClosing")


class Closing:
    """Mixin: ``__enter__`` returns the object, ``__exit__`` calls ``close()``."""

    def close(self) -> None:
        """Release resources. Idempotent; subclasses say whether it blocks."""
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing:
    """Mixin: ``__aenter__`` returns the object, ``__aexit__`` awaits ``close()``."""

    async def close(self) -> None:
        """Release resources. Idempotent; subclasses say whether it waits."""
        raise NotImplementedError

    async def __aenter__(self: _A) -> _A:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
