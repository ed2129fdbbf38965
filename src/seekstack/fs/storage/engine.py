"""Chunk engine for one storage target: chunk data in blocks of a few large files (`blocks.py`), chunk metadata in
SQLite.

Updates are copy-on-write, as in 3FS: a pending version is written to a fresh block and kept in memory; commit is
one metadata statement (the row now names the new block) after which the old version's block is freed. So the
metadata always names complete blocks, and a crash leaves at worst unreferenced blocks, free again at start-up.
A freed block's disk space is given back (a punched hole, `blocks.py`) a moment later, so every `free` here comes
after the statement that stops naming the block: a kill -9 in between leaves a stale free block, never a hole
where committed data should be.

>>> import tempfile
>>> eng = ChunkEngine(tempfile.mkdtemp())
>>> _ = eng.set_pending("00" * 16, 1, b"abc", chain_ver=1)
>>> eng.commit("00" * 16, 1)
>>> eng.read("00" * 16)
b'abc'
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from dataclasses import dataclass

from seekstack.fs.crc import crc32
from seekstack.fs.meta.layout import chunk_id
from seekstack.fs.storage.blocks import NONE, BlockFiles

ROW_CACHE = 1 << 16  # rows kept in memory per target (dropped wholesale when full)
_COLUMNS = (
    "id, chain_ver, committed, length, crc, pending, pending_remove, pending_length, pending_crc, blk, pending_blk"
)


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
    blk: int = NONE  # block of the committed bytes
    pending_blk: int = NONE  # block of the pending bytes


class ChunkEngine:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.conn = sqlite3.connect(os.path.join(root, "meta.db"), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a committed statement survives kill -9 of this process (not a power cut) — what we test.
        self.conn.execute("PRAGMA synchronous = NORMAL")
        cols = [r[1] for r in self.conn.execute("PRAGMA table_info(chunks)")]
        if cols and "blk" not in cols:
            raise RuntimeError(f"{root}: chunk store of an older seekstack (a file per chunk version); start afresh")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, chain_ver INTEGER NOT NULL, "
            "committed INTEGER NOT NULL, length INTEGER NOT NULL, crc INTEGER NOT NULL, pending INTEGER NOT NULL, "
            "pending_remove INTEGER NOT NULL, pending_length INTEGER NOT NULL, pending_crc INTEGER NOT NULL, "
            "blk INTEGER NOT NULL, pending_blk INTEGER NOT NULL)"
        )
        # Write-through copy of the rows (this process is the only writer of its database): every chunk update
        # used to re-read its row up to three times, the largest per-chunk cost after the bytes themselves.
        self._rows: dict[str, Chunk | None] = {}
        self._pend: dict[str, tuple[Chunk, Chunk | None]] = {}  # chunk -> (state with its pending version, base)
        self.blocks = BlockFiles(root)
        self.blocks.reset(b for r in self.conn.execute("SELECT blk, pending_blk FROM chunks") for b in r)

    # ---------------------------------------------------------------- queries
    def get(self, cid: str) -> Chunk | None:
        """The chunk's state (committed, and pending if an update is under way), as a copy."""
        p = self._pend.get(cid)
        if p is not None:
            return dataclasses.replace(p[0])
        if cid in self._rows:
            c = self._rows[cid]
            return None if c is None else dataclasses.replace(c)  # a copy: callers may keep it across updates
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM chunks WHERE id = ?", (cid,)).fetchone()
        c = None if row is None else Chunk(*row[:6], bool(row[6]), *row[7:])
        if len(self._rows) >= ROW_CACHE:
            self._rows.clear()
        self._rows[cid] = c
        return None if c is None else dataclasses.replace(c)

    def read(self, cid: str, offset: int = 0, length: int = -1) -> bytes:
        """Bytes of the committed version (`length` < 0: to its end)."""
        c = self.get(cid)
        if c is None or c.committed == 0:
            return b""
        offset = min(max(offset, 0), c.length)
        length = c.length - offset if length < 0 else min(length, c.length - offset)
        return self.blocks.read(c.blk, offset, length)

    def hold(self, c: Chunk) -> tuple[int, int]:
        """(fd, file offset) of `c`'s committed bytes, kept from reuse until `release(c.blk)`: a reader (sendfile
        on the loop, a pread on an I/O thread) sees this version even if a commit frees its block meanwhile."""
        self.blocks.hold(c.blk)
        return self.blocks.span(c.blk)

    def release(self, blk: int) -> None:
        self.blocks.release(blk)

    def dump(self) -> dict[str, list[int]]:
        """chunk id -> [chain_ver, committed, pending, crc] for every chunk (the resync diff input)."""
        rows = self.conn.execute("SELECT id, chain_ver, committed, pending, crc FROM chunks")
        out = {r[0]: [r[1], r[2], r[3], r[4]] for r in rows}
        for cid, (c, _) in self._pend.items():  # updates under way (in memory only)
            out[cid] = [c.chain_ver, c.committed, c.pending, c.crc]
        return out

    def chunks_of(self, inode: int) -> list[tuple[str, int]]:
        """(chunk id, committed length) of one file's committed chunks, in index order (one key range)."""
        lo, hi = chunk_id(inode, 0), chunk_id(inode, 0xFFFFFFFF)
        rows = self.conn.execute(
            "SELECT id, length FROM chunks WHERE id >= ? AND id <= ? AND committed > 0 ORDER BY id", (lo, hi)
        )
        return [(r[0], r[1]) for r in rows]

    # ---------------------------------------------------------------- updates
    def set_pending(
        self, cid: str, ver: int, data: bytes | None, chain_ver: int, crc: int | None = None, write: bool = True
    ) -> int:
        """Store pending version `ver` (`data=None`: a pending removal) next to the committed one in a fresh
        block, and return that block; `crc` is the data's CRC32 if the caller already has it. `write=False`
        only reserves the block: the caller writes it (`write_block`, e.g. after forwarding) before committing.

        The pending version lives in memory only: a crash loses it with the process, which is what a pending
        version means anyway (never acknowledged; the restarted target is resynced, and its block is free again
        at start-up). So each update of each replica costs one SQLite statement (the commit), not two."""
        old = self.get(cid)
        if old is not None and old.pending:
            self.blocks.free(old.pending_blk)  # an aborted or superseded attempt
        base = self._pend[cid][1] if cid in self._pend else old
        n = len(data) if data is not None else 0
        blk = self.blocks.allocate(n)
        if write and n:
            self.blocks.write(blk, data)
        crc = _crc(data) if crc is None else crc
        view = Chunk(cid, chain_ver, 0, 0, 0, 0, False) if old is None else old
        view = dataclasses.replace(
            view,
            chain_ver=chain_ver,
            pending=ver,
            pending_remove=data is None,
            pending_length=n,
            pending_crc=crc,
            pending_blk=blk,
        )
        self._pend[cid] = (view, base)
        return blk

    def write_block(self, blk: int, data) -> None:
        """Write a block reserved by `set_pending(..., write=False)`; thread-safe (touches no shared state)."""
        self.blocks.write(blk, data)

    def commit(self, cid: str, ver: int):
        """Make pending version `ver` the committed one (a pending removal deletes the chunk): one statement."""
        old = self.get(cid)
        if old is None or old.pending != ver:
            return
        if old.pending_remove:
            self.conn.execute("DELETE FROM chunks WHERE id = ?", (cid,))
            new = None
        else:
            new = dataclasses.replace(
                old,
                committed=ver,
                length=old.pending_length,
                crc=old.pending_crc,
                blk=old.pending_blk,
                pending=0,
                pending_remove=False,
                pending_length=0,
                pending_crc=0,
                pending_blk=NONE,
            )
            self.conn.execute(
                f"INSERT OR REPLACE INTO chunks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, 0, 0, 0, ?, ?)",
                (cid, new.chain_ver, ver, new.length, new.crc, new.blk, NONE),
            )
        del self._pend[cid]  # only once the statement went through
        self._rows[cid] = new
        self.blocks.free(old.blk)  # after the statement: until then the row still names it

    def abort(self, cid: str, ver: int):
        c = self.get(cid)
        if c is None or c.pending != ver:
            return
        _, base = self._pend.pop(cid)
        self._rows[cid] = base  # the committed state, as the database has it
        self.blocks.free(c.pending_blk)

    def replace(self, cid: str, ver: int, data: bytes | None, chain_ver: int):
        """Full-chunk replace used by resync: committed := (ver, data), pending dropped; `None` deletes."""
        old = self.get(cid)
        self._rows.pop(cid, None)  # read back from the database on next use
        self._pend.pop(cid, None)
        if data is None:
            self.conn.execute("DELETE FROM chunks WHERE id = ?", (cid,))
        else:
            blk = self.blocks.allocate(len(data))
            self.blocks.write(blk, data)
            self.conn.execute(
                f"INSERT OR REPLACE INTO chunks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, 0, 0, 0, ?, ?)",
                (cid, chain_ver, ver, len(data), crc32(data), blk, NONE),
            )
        if old is not None:
            self.blocks.free(old.blk)
            self.blocks.free(old.pending_blk)

    def close(self):
        self.conn.close()
        self.blocks.close()


def _crc(data: bytes | None) -> int:
    return crc32(data) if data is not None else 0


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
