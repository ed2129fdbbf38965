"""Chunk engine for one storage target: chunk data in per-version files, chunk metadata in SQLite.

Updates are copy-on-write, as in 3FS: a pending version is written to a fresh file, then recorded in the metadata
row; commit is one metadata statement (committed := pending) after which the old version's file is deleted. So
the metadata always names complete files, and a crash leaves at worst unreferenced files, removed at start-up.

>>> import tempfile
>>> eng = ChunkEngine(tempfile.mkdtemp())
>>> eng.set_pending("00" * 16, 1, b"abc", chain_ver=1)
>>> eng.commit("00" * 16, 1)
>>> eng.read("00" * 16)
b'abc'
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import zlib
from dataclasses import dataclass

from seekstack.fs.meta.layout import chunk_id, parse_chunk_id

ROW_CACHE = 1 << 16  # rows kept in memory per target (dropped wholesale when full)


@dataclass
class Chunk:
    id: str
    chain_ver: int
    committed: int  # committed version (0: none yet)
    length: int  # committed length
    crc: int  # CRC32 of the committed bytes
    pending: int  # pending version, 0 if none
    pending_remove: bool
    pending_length: int = 0
    pending_crc: int = 0


class ChunkEngine:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        self.conn = sqlite3.connect(os.path.join(root, "meta.db"), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a committed statement survives kill -9 of this process (not a power cut) — what we test.
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, chain_ver INTEGER NOT NULL, "
            "committed INTEGER NOT NULL, length INTEGER NOT NULL, crc INTEGER NOT NULL, pending INTEGER NOT NULL, "
            "pending_remove INTEGER NOT NULL, pending_length INTEGER NOT NULL, pending_crc INTEGER NOT NULL)"
        )
        # Write-through copy of the rows (this process is the only writer of its database): every chunk update
        # used to re-read its row up to three times, the largest per-chunk cost after the bytes themselves.
        self._rows: dict[str, Chunk | None] = {}
        self._collect_garbage()

    def _path(self, cid: str, ver: int) -> str:
        return os.path.join(self.root, "data", f"{cid}.{ver}")

    def _collect_garbage(self):
        """Delete data files no metadata row names (left by a crash between file write and metadata commit)."""
        live = set()
        for cid, c, p in self.conn.execute("SELECT id, committed, pending FROM chunks"):
            live.update({f"{cid}.{c}", f"{cid}.{p}"})
        for name in os.listdir(os.path.join(self.root, "data")):
            if name not in live:
                os.unlink(os.path.join(self.root, "data", name))

    def _write_file(self, cid: str, ver: int, data: bytes):
        with open(self._path(cid, ver), "wb", buffering=0) as f:
            f.write(data)

    def write_version(self, cid: str, ver: int, data) -> None:
        """Write the data file of version `ver` only (no metadata), so the service can do it on an I/O thread;
        `set_pending(..., written=True)` then records it. Touches no SQLite state, so it is thread-safe."""
        self._write_file(cid, ver, data)

    def open_version(self, cid: str, ver: int) -> int:
        """An fd on version `ver`'s data file: it keeps the bytes readable on an I/O thread even if a commit
        unlinks the file meanwhile (copy-on-write: the file itself never changes)."""
        return os.open(self._path(cid, ver), os.O_RDONLY)

    def _unlink(self, cid: str, ver: int):
        try:
            os.unlink(self._path(cid, ver))
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------- queries
    def get(self, cid: str) -> Chunk | None:
        if cid in self._rows:
            c = self._rows[cid]
            return None if c is None else dataclasses.replace(c)  # a copy: callers may keep it across updates
        row = self.conn.execute(
            "SELECT id, chain_ver, committed, length, crc, pending, pending_remove, pending_length, pending_crc "
            "FROM chunks WHERE id = ?",
            (cid,),
        ).fetchone()
        c = None if row is None else Chunk(*row[:6], bool(row[6]), row[7], row[8])
        if len(self._rows) >= ROW_CACHE:
            self._rows.clear()
        self._rows[cid] = c
        return None if c is None else dataclasses.replace(c)

    def read(self, cid: str, offset: int = 0, length: int = -1, ver: int | None = None) -> bytes:
        """Bytes of the committed version (or version `ver`)."""
        if ver is None:
            c = self.get(cid)
            if c is None or c.committed == 0:
                return b""
            ver = c.committed
        with open(self._path(cid, ver), "rb", buffering=0) as f:
            if offset:
                f.seek(offset)
            return f.read() if length < 0 else f.read(length)

    def dump(self) -> dict[str, list[int]]:
        """chunk id -> [chain_ver, committed, pending, crc] for every chunk (the resync diff input)."""
        rows = self.conn.execute("SELECT id, chain_ver, committed, pending, crc FROM chunks")
        return {r[0]: [r[1], r[2], r[3], r[4]] for r in rows}

    def next_committed(self, cid: str, limit: int) -> list[tuple[str, int]]:
        """(chunk id, committed version) of up to `limit` chunks of the same file after `cid`, in index order."""
        inode, _ = parse_chunk_id(cid)
        rows = self.conn.execute(
            "SELECT id, committed FROM chunks WHERE id > ? AND id <= ? AND committed > 0 ORDER BY id LIMIT ?",
            (cid, chunk_id(inode, 0xFFFFFFFF), limit),
        )
        return [(r[0], r[1]) for r in rows]

    def version_path(self, cid: str, ver: int) -> str:
        return self._path(cid, ver)

    def chunks_of(self, inode: int) -> list[tuple[str, int]]:
        """(chunk id, committed length) of one file's committed chunks, in index order (one key range)."""
        lo, hi = chunk_id(inode, 0), chunk_id(inode, 0xFFFFFFFF)
        rows = self.conn.execute(
            "SELECT id, length FROM chunks WHERE id >= ? AND id <= ? AND committed > 0 ORDER BY id", (lo, hi)
        )
        return [(r[0], r[1]) for r in rows]

    # ---------------------------------------------------------------- updates
    def set_pending(
        self, cid: str, ver: int, data: bytes | None, chain_ver: int, crc: int | None = None, written: bool = False
    ):
        """Store pending version `ver` (`data=None`: a pending removal) next to the committed one; `crc` is the
        data's CRC32 if the caller already has it; `written`: its data file is already there (`write_version`)."""
        old = self.get(cid)
        if old is not None and old.pending and old.pending != old.committed and not (written and old.pending == ver):
            self._unlink(cid, old.pending)  # an aborted or superseded attempt
        if data is not None and not written:
            self._write_file(cid, ver, data)
        crc = _crc(data) if crc is None else crc
        self._rows.pop(cid, None)  # if the statement fails, the next get reads the row again
        self.conn.execute(
            "INSERT INTO chunks (id, chain_ver, committed, length, crc, pending, pending_remove, pending_length, "
            "pending_crc) VALUES (?, ?, 0, 0, 0, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "chain_ver = excluded.chain_ver, pending = excluded.pending, pending_remove = excluded.pending_remove, "
            "pending_length = excluded.pending_length, pending_crc = excluded.pending_crc",
            (cid, chain_ver, ver, int(data is None), len(data or b""), crc),
        )
        if old is None:
            old = Chunk(cid, chain_ver, 0, 0, 0, 0, False)
        self._rows[cid] = dataclasses.replace(
            old,
            chain_ver=chain_ver,
            pending=ver,
            pending_remove=data is None,
            pending_length=len(data or b""),
            pending_crc=crc,
        )

    def commit(self, cid: str, ver: int):
        """Make pending version `ver` the committed one (a pending removal deletes the chunk)."""
        old = self.get(cid)
        if old is None or old.pending != ver:
            return
        self._rows.pop(cid, None)
        if old.pending_remove:
            self.conn.execute("DELETE FROM chunks WHERE id = ?", (cid,))
            self._rows[cid] = None
        else:
            self.conn.execute(
                "UPDATE chunks SET committed = pending, length = pending_length, crc = pending_crc, pending = 0 "
                "WHERE id = ? AND pending = ?",
                (cid, ver),
            )
            self._rows[cid] = dataclasses.replace(
                old, committed=ver, length=old.pending_length, crc=old.pending_crc, pending=0
            )
        if old.committed and old.committed != ver:
            self._unlink(cid, old.committed)

    def abort(self, cid: str, ver: int):
        c = self.get(cid)
        if c is None or c.pending != ver:
            return
        self._rows.pop(cid, None)
        if c.committed == 0:
            self.conn.execute("DELETE FROM chunks WHERE id = ?", (cid,))
            self._rows[cid] = None
        else:
            self.conn.execute("UPDATE chunks SET pending = 0 WHERE id = ?", (cid,))
            self._rows[cid] = dataclasses.replace(c, pending=0)
        if ver != c.committed:
            self._unlink(cid, ver)

    def replace(self, cid: str, ver: int, data: bytes | None, chain_ver: int):
        """Full-chunk replace used by resync: committed := (ver, data), pending dropped; `None` deletes."""
        old = self.get(cid)
        self._rows.pop(cid, None)  # read back from the database on next use
        if data is None:
            self.conn.execute("DELETE FROM chunks WHERE id = ?", (cid,))
        else:
            tmp_ver = ver if old is None or ver not in (old.committed, old.pending) else -ver
            self._write_file(cid, tmp_ver, data)
            if tmp_ver != ver:  # same version number already on disk: write aside, then rename over
                os.replace(self._path(cid, tmp_ver), self._path(cid, ver))
            self.conn.execute(
                "INSERT OR REPLACE INTO chunks (id, chain_ver, committed, length, crc, pending, pending_remove, "
                "pending_length, pending_crc) VALUES (?, ?, ?, ?, ?, 0, 0, 0, 0)",
                (cid, chain_ver, ver, len(data), zlib.crc32(data)),
            )
        if old is not None:
            for v in {old.committed, old.pending} - {0, ver if data is not None else None}:
                self._unlink(cid, v)

    def close(self):
        self.conn.close()


def _crc(data: bytes | None) -> int:
    return zlib.crc32(data) if data is not None else 0


def apply_update(old: bytes, op: str, offset: int, data: bytes, chunk_size: int) -> bytes | None:
    """New chunk content (bytes-like) after `op`: write (zero-filling a gap), truncate (to `offset` bytes), or
    remove (None)."""
    if op == "write":
        if offset < 0 or offset + len(data) > chunk_size:
            raise ValueError(f"write of {len(data)} bytes at {offset} overflows chunk size {chunk_size}")
        if offset == 0 and len(data) >= len(old):
            return data  # the whole chunk is new: keep the receive buffer, no copy
        if offset > len(old):
            old = old + bytes(offset - len(old))
        return old[:offset] + bytes(data) + old[offset + len(data) :]
    if op == "truncate":
        if not 0 <= offset <= chunk_size:
            raise ValueError(f"truncate length {offset} outside [0, {chunk_size}]")
        return old[:offset] + bytes(max(0, offset - len(old)))
    if op == "remove":
        return None
    raise ValueError(f"op: unknown chunk operation {op!r}")
