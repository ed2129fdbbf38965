"""FoundationDB backend — UNTESTED: FoundationDB's client library (libfdb_c) cannot be installed on the project's
machines, so this adapter has never run. It maps the interface onto the official `fdb` bindings, whose own retry
loop (`@fdb.transactional`) gives the conflict-and-retry behaviour; importing it without libfdb_c raises.
"""

from __future__ import annotations

from seekstack.fs.kv.base import KVStore, Transaction

UNTESTED = True


class _FdbTxn(Transaction):
    def __init__(self, tr):
        self.tr = tr

    def get(self, key):
        v = self.tr[key]
        return bytes(v) if v.present() else None

    def set(self, key, value):
        self.tr[key] = value

    def clear(self, key):
        del self.tr[key]

    def range(self, begin, end, limit=0):
        return [(bytes(kv.key), bytes(kv.value)) for kv in self.tr.get_range(begin, end, limit=limit)]


class FdbStore(KVStore):
    """`FdbStore(cluster_file=None)`; untested (see the module docstring)."""

    def __init__(self, cluster_file: str | None = None):
        import fdb  # raises without the FoundationDB client library

        fdb.api_version(710)
        self._fdb = fdb
        self.db = fdb.open(cluster_file)

    def run(self, fn, *, write=True):
        @self._fdb.transactional
        def body(tr):
            return fn(_FdbTxn(tr))

        return body(self.db)
