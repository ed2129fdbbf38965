"""SQLite backend: the embedded default for one machine.

Read-write transactions start with `BEGIN IMMEDIATE`, so SQLite's single-writer lock makes them serial (hence
serializable) across threads and processes sharing one database file; a busy lock surfaces as `Conflict` and the
transaction is retried. Read-only transactions read one WAL snapshot.
"""

from __future__ import annotations

import sqlite3
import threading

from seekstack.fs.kv.base import Conflict, KVStore, Transaction


class _SqliteTxn(Transaction):
    def __init__(self, conn: sqlite3.Connection, write: bool):
        self.conn = conn
        self.write = write

    def get(self, key):
        row = self.conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set(self, key, value):
        if not self.write:
            raise PermissionError("set() in a read-only transaction")
        self.conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

    def clear(self, key):
        if not self.write:
            raise PermissionError("clear() in a read-only transaction")
        self.conn.execute("DELETE FROM kv WHERE k = ?", (key,))

    def range(self, begin, end, limit=0):
        sql = "SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k"
        args: tuple = (begin, end)
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        return [(bytes(k), bytes(v)) for k, v in self.conn.execute(sql, args)]


class SqliteStore(KVStore):
    """`SqliteStore(path)`; `":memory:"` for a private in-memory store (one connection, serialized by a lock)."""

    def __init__(self, path: str, busy_timeout_ms: int = 200):
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._memory_lock = threading.Lock() if path == ":memory:" else None
        self._shared = None
        conn = self._conn()
        with conn:
            conn.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def _conn(self) -> sqlite3.Connection:
        if self._memory_lock is not None:
            if self._shared is None:
                self._shared = self._open()
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives a process kill (the case we test); only power loss can drop the tail.
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _attempt(self, fn, write):
        if self._memory_lock is not None:
            with self._memory_lock:
                return self._attempt_locked(fn, write)
        return self._attempt_locked(fn, write)

    def _attempt_locked(self, fn, write):
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.OperationalError as e:
            raise Conflict(str(e)) from e
        try:
            result = fn(_SqliteTxn(conn, write))
            conn.execute("COMMIT")
            return result
        except sqlite3.OperationalError as e:
            _rollback(conn)
            if "locked" in str(e) or "busy" in str(e):
                raise Conflict(str(e)) from e
            raise
        except BaseException:
            _rollback(conn)
            raise

    def close(self):
        conn = getattr(self._local, "conn", None) or self._shared
        if conn is not None:
            conn.close()


def _rollback(conn):
    try:
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError:
        pass
