"""Transactional KV stores for metadata: SQLite (default), PostgreSQL, FoundationDB (untested).

>>> kv = open_store("sqlite://:memory:")
>>> kv.run(lambda t: t.set(b"k", b"v"))
"""

from __future__ import annotations

from seekstack.fs.kv.base import Conflict, KVStore, Transaction, prefix_end


def open_store(url: str) -> KVStore:
    """`sqlite:///abs/path.db`, `sqlite://:memory:`, `postgresql://...`, or `fdb://[cluster_file]`."""
    if url.startswith("sqlite://"):
        from seekstack.fs.kv.sqlite import SqliteStore

        path = url[len("sqlite://") :]
        return SqliteStore(path or ":memory:")
    if url.startswith(("postgresql://", "postgres://")):
        from seekstack.fs.kv.postgres import PostgresStore

        return PostgresStore(url)
    if url.startswith("fdb://"):
        from seekstack.fs.kv.fdb import FdbStore

        return FdbStore(url[len("fdb://") :] or None)
    raise ValueError(f"url: unknown KV store scheme in {url!r} (sqlite://, postgresql://, fdb://)")


__all__ = ["Conflict", "KVStore", "Transaction", "open_store", "prefix_end"]
