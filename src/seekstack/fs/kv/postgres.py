"""PostgreSQL backend at SERIALIZABLE isolation, for several meta machines sharing one store.

Serialization failures (SQLSTATE 40001) and deadlocks (40P01) become `Conflict`, which `KVStore.run` retries —
the same optimistic contract FoundationDB gives 3FS. Needs `psycopg` 3 (the `fs` extra).
"""

from __future__ import annotations

import threading

from seekstack.fs.kv.base import Conflict, KVStore, Transaction

# Any fixed 64-bit number; it names the lock that serializes creating the table.
_CREATE_LOCK_ID = 0x5EE5_57AC_0000_0001


class _PgTxn(Transaction):
    def __init__(self, cur):
        self.cur = cur

    def get(self, key):
        self.cur.execute("SELECT v FROM kv WHERE k = %s", (key,))
        row = self.cur.fetchone()
        return None if row is None else bytes(row[0])

    def set(self, key, value):
        self.cur.execute(
            "INSERT INTO kv (k, v) VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v", (key, value)
        )

    def clear(self, key):
        self.cur.execute("DELETE FROM kv WHERE k = %s", (key,))

    def range(self, begin, end, limit=0):
        sql = "SELECT k, v FROM kv WHERE k >= %s AND k < %s ORDER BY k"
        args: tuple = (begin, end)
        if limit:
            sql += " LIMIT %s"
            args += (limit,)
        self.cur.execute(sql, args)
        return [(bytes(k), bytes(v)) for k, v in self.cur.fetchall()]


class PostgresStore(KVStore):
    """`PostgresStore("postgresql://user@127.0.0.1:5432/db")`; one connection per thread."""

    def __init__(self, dsn: str):
        import psycopg

        self.dsn = dsn
        self._psycopg = psycopg
        self._local = threading.local()
        # CREATE TABLE IF NOT EXISTS is not race-free: two meta processes starting together can both pass the
        # check and one fails on the catalog (UniqueViolation, DuplicateTable or DuplicateObject for the row type).
        # A transaction-scoped advisory lock makes the creation one-at-a-time.
        with psycopg.connect(dsn) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK_ID,))
                conn.execute("CREATE TABLE IF NOT EXISTS kv (k BYTEA PRIMARY KEY, v BYTEA NOT NULL)")

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = self._psycopg.connect(self.dsn)
            conn.isolation_level = self._psycopg.IsolationLevel.SERIALIZABLE
        return conn

    def _attempt(self, fn, write):
        errors = self._psycopg.errors
        conn = self._conn()
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    if not write:
                        cur.execute("SET TRANSACTION READ ONLY")
                    return fn(_PgTxn(cur))
        except (errors.SerializationFailure, errors.DeadlockDetected) as e:
            raise Conflict(str(e)) from e
        except self._psycopg.OperationalError:
            # A dropped connection: reconnect on the next attempt.
            self._local.conn = None
            raise

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
