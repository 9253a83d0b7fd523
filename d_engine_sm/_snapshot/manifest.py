"""The archive manifest: a small JSON member, first in the archive, saying what it holds.

``MANIFEST.d-engine-sm.json`` (at most :data:`MAX_MANIFEST_BYTES`) holds one
JSON object with exactly these keys::

    {"manifest_version": 1, "format": "d_engine_sm.memory", "format_version": 1,
     "keys": 1234, "unpacked_bytes": 56789, "library_version": "0.1.0"}

``format``/``format_version`` are the state machine's declaration
(:attr:`StateMachine.snapshot_format`; ``null`` when it declares none),
``keys`` is ``len(state_machine)`` at the snapshot's LogId (``null`` if it
cannot say), ``unpacked_bytes`` the sum of the snapshot's file sizes. It is
a claim, not a guarantee: the unpack caps are enforced on the real bytes
whatever it says. Archives without a manifest (older versions, d-engine
peers) are valid; the manifest is never written into the unpacked directory.

A receiver reads it while the first chunks arrive (:class:`ManifestSniffer`,
in the receiving thread, bounded) and refuses a snapshot of another format
at once (:func:`check`).
"""

from __future__ import annotations

import json
import tarfile
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Final

from d_engine_sm._state_machine import StateMachine, declared_format
from d_engine_sm.errors import CorruptSnapshotError, SnapshotFormatMismatch, UnsafeArchiveError

MANIFEST_NAME: Final = "MANIFEST.d-engine-sm.json"
MANIFEST_VERSION: Final = 1
MAX_MANIFEST_BYTES: Final = 4096
_BLOCK: Final = 512
_MAX_SNIFF_INPUT: Final = 1 << 20  # compressed bytes to look at before giving up
_FIELDS: Final = (
    "manifest_version",
    "format",
    "format_version",
    "keys",
    "unpacked_bytes",
    "library_version",
)


@dataclass(frozen=True)
class Manifest:
    """What an archive says it holds (see the module docstring for the fields)."""

    format: str | None
    format_version: int | None
    keys: int | None
    unpacked_bytes: int
    library_version: str
    manifest_version: int = MANIFEST_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> Manifest:
        """Parse strictly: exact keys, exact types.

        Raises:
            CorruptSnapshotError: anything else (the message says what).
        """

        def bad(why: str) -> CorruptSnapshotError:
            return CorruptSnapshotError(source, f"bad {MANIFEST_NAME}: {why}")

        if len(data) > MAX_MANIFEST_BYTES:
            raise bad(f"larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad(f"not JSON ({e})") from e
        if not isinstance(obj, dict) or sorted(obj) != sorted(_FIELDS):
            raise bad(f"must be an object with exactly the keys {', '.join(_FIELDS)}")
        if obj["manifest_version"] != MANIFEST_VERSION or type(obj["manifest_version"]) is not int:
            raise bad(f"unsupported manifest_version {obj['manifest_version']!r}")
        _check(obj, "format", str, nullable=True, bad=bad)
        _check(obj, "format_version", int, nullable=True, bad=bad)
        _check(obj, "keys", int, nullable=True, bad=bad)
        _check(obj, "unpacked_bytes", int, nullable=False, bad=bad)
        _check(obj, "library_version", str, nullable=False, bad=bad)
        return cls(**{k: obj[k] for k in _FIELDS})


def _check(obj: dict[str, Any], key: str, kind: type, *, nullable: bool, bad: Any) -> None:
    value: object = obj[key]
    if value is None and nullable:
        return
    if kind is int and not (type(value) is int and value >= 0):
        raise bad(f"{key} must be a non-negative int")
    if kind is str and not (isinstance(value, str) and len(value) <= 256):
        raise bad(f"{key} must be a string of at most 256 characters")


def describe(manifest: Manifest | None) -> list[str]:
    """Lines for display (``snapshot inspect``/``list``); one line when absent.

    >>> describe(Manifest("d_engine_sm.memory", 1, 3, 120, "0.1.0"))[0]
    'format   d_engine_sm.memory v1'
    """
    if manifest is None:
        return ["manifest none (archive written without one: older version or another tool)"]
    fmt = "undeclared" if manifest.format is None else manifest.format
    if manifest.format is not None and manifest.format_version is not None:
        fmt += f" v{manifest.format_version}"
    keys = "unknown" if manifest.keys is None else str(manifest.keys)
    return [
        f"format   {fmt}",
        f"keys     {keys}",
        f"unpacked {manifest.unpacked_bytes} bytes (declared)",
        f"written  by d_engine_sm {manifest.library_version}"
        f" (manifest v{manifest.manifest_version})",
    ]


def summary(manifest: Manifest | None) -> str:
    """One short cell for a listing (``snapshot list``).

    >>> summary(Manifest("d_engine_sm.sqlite", 1, 12, 4096, "0.1.0"))
    'd_engine_sm.sqlite v1, 12 keys'
    >>> summary(None)
    '-'
    """
    if manifest is None:
        return "-"
    fmt = "undeclared" if manifest.format is None else manifest.format
    if manifest.format is not None and manifest.format_version is not None:
        fmt += f" v{manifest.format_version}"
    return fmt if manifest.keys is None else f"{fmt}, {manifest.keys} keys"


def check(
    manifest: Manifest,
    expected: tuple[str, int] | None,
    max_unpacked_bytes: int,
) -> None:
    """Refuse a snapshot this node cannot install, before it is unpacked.

    Args:
        manifest: what the archive says.
        expected: the receiving state machine's ``(format, version)``, or
            None when it declares none (then any format is let through).
        max_unpacked_bytes: the configured unpack cap.

    Raises:
        SnapshotFormatMismatch: another format, or a newer version of ours.
        UnsafeArchiveError: the declared unpacked size exceeds the cap.
    """
    if manifest.unpacked_bytes > max_unpacked_bytes:
        raise UnsafeArchiveError(
            MANIFEST_NAME,
            f"declares {manifest.unpacked_bytes} unpacked bytes, over the "
            f"{max_unpacked_bytes} byte cap",
        )
    if expected is None or manifest.format is None:
        return
    name, version = expected
    got_version = manifest.format_version
    if manifest.format != name or (got_version is not None and got_version > version):
        raise SnapshotFormatMismatch(
            expected=f"{name} v{version}",
            got=manifest.format if got_version is None else f"{manifest.format} v{got_version}",
        )


def new_manifest(sm: StateMachine, keys: int | None, unpacked_bytes: int) -> Manifest:
    """The manifest for a snapshot of ``sm`` (a StateMachine) being written now."""
    from d_engine_sm import __version__  # here: the package imports this module

    declared = declared_format(sm)
    return Manifest(
        format=declared[0] if declared else None,
        format_version=declared[1] if declared else None,
        keys=keys if keys is None or keys >= 0 else None,
        unpacked_bytes=unpacked_bytes,
        library_version=__version__,
    )


class ManifestSniffer:
    """Finds the manifest in the first bytes of an arriving archive.

    Feed it the archive's bytes in order; :attr:`done` turns True once it
    knows, and :attr:`manifest` is then the manifest or None (no manifest,
    or a stream it cannot read: the unpacker reports that). Decompresses at
    most one tar header plus :data:`MAX_MANIFEST_BYTES`, so memory and time
    stay small whatever arrives.
    """

    def __init__(self, source: str) -> None:
        self._source = source
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper
        self._out = bytearray()
        self._need = _BLOCK
        self._size: int | None = None
        self._fed = 0
        self.done = False
        self.manifest: Manifest | None = None

    def feed(self, data: bytes) -> None:
        """Look at the next bytes.

        Raises:
            CorruptSnapshotError: the manifest is there but malformed.
        """
        if self.done:
            return
        self._fed += len(data)
        pending = data
        try:
            while not self.done:
                want = self._need - len(self._out)
                if want <= 0:
                    self._advance()
                    continue
                if not pending or self._inflate.eof:
                    break
                self._out += self._inflate.decompress(pending, want)
                pending = self._inflate.unconsumed_tail
        except zlib.error:
            self._finish(None)  # not gzip after all: the unpacker says why
            return
        if not self.done and (self._fed > _MAX_SNIFF_INPUT or self._inflate.eof):
            self._finish(None)

    def _advance(self) -> None:
        if self._size is None:  # the first tar header is complete
            try:
                info = tarfile.TarInfo.frombuf(bytes(self._out[:_BLOCK]), "utf-8", "strict")
            except (tarfile.TarError, ValueError, UnicodeError):
                self._finish(None)
                return
            if info.name != MANIFEST_NAME or not info.isreg():
                self._finish(None)
                return
            if not 0 <= info.size <= MAX_MANIFEST_BYTES:
                raise CorruptSnapshotError(
                    self._source, f"{MANIFEST_NAME} declares {info.size} bytes"
                )
            self._size = info.size
            self._need = _BLOCK + info.size
            return
        body = bytes(self._out[_BLOCK : self._need])
        self._finish(Manifest.from_bytes(body, self._source))

    def _finish(self, manifest: Manifest | None) -> None:
        self.done = True
        self.manifest = manifest
        self._out = bytearray()
