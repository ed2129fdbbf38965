"""The transactional key-value interface the metadata service relies on (FoundationDB's contract, in miniature).

A `Transaction` reads and writes byte keys; `KVStore.run(fn)` executes `fn(txn)` serializably and retries it when
the backend reports a conflict, so callers write plain straight-line code.

>>> from seekstack.fs.kv import open_store
>>> kv = open_store("sqlite://:memory:")
>>> kv.run(lambda t: t.set(b"a", b"1"))
>>> kv.run(lambda t: t.get(b"a"))
b'1'
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Conflict(Exception):
    """The transaction lost a serialization race; it had no effect and may be retried."""


class Transaction:
    """One serializable transaction. Keys and values are bytes; `range` scans `[begin, end)` in key order."""

    def get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def set(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    def clear(self, key: bytes) -> None:
        raise NotImplementedError

    def range(self, begin: bytes, end: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError

    def prefix(self, prefix: bytes, limit: int = 0) -> list[tuple[bytes, bytes]]:
        """All pairs whose key starts with `prefix` (a range scan)."""
        return self.range(prefix, prefix_end(prefix), limit)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\xff" * (len(prefix) + 1)
    p[-1] += 1
    return bytes(p)


class KVStore:
    """A store that runs transactions. Subclasses implement `_attempt(fn, write)` (one try, raising `Conflict`)."""

    max_retries = 64

    def run(self, fn: Callable[[Transaction], T], *, write: bool = True) -> T:
        """Run `fn(txn)` serializably, retrying on `Conflict` with jittered backoff. `fn` must be side-effect free
        outside the transaction because it may run several times."""
        delay = 0.001
        for _ in range(self.max_retries):
            try:
                return self._attempt(fn, write)
            except Conflict:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.1)
        raise Conflict(f"transaction still conflicting after {self.max_retries} retries")

    def read(self, fn: Callable[[Transaction], T]) -> T:
        """A read-only transaction."""
        return self.run(fn, write=False)

    def _attempt(self, fn: Callable[[Transaction], T], write: bool) -> T:
        raise NotImplementedError

    def close(self) -> None:
        pass
