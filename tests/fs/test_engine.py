"""The chunk engine (copy-on-write blocks + SQLite metadata), the update rules and the resync diff rule."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from seekstack.fs.storage.blocks import NONE
from seekstack.fs.storage.engine import ChunkEngine, apply_update
from seekstack.fs.storage.resync import needs_send

CID = "00" * 16


def test_pending_commit_abort_and_versions(tmp_path):
    eng = ChunkEngine(str(tmp_path))
    eng.set_pending(CID, 1, b"one", chain_ver=3)
    assert eng.read(CID) == b""  # pending is invisible to readers of the committed version
    eng.commit(CID, 1)
    c = eng.get(CID)
    assert (c.committed, c.pending, c.length, c.crc, c.chain_ver) == (1, 0, 3, zlib.crc32(b"one"), 3)
    eng.set_pending(CID, 2, b"two!", chain_ver=3)
    assert eng.read(CID) == b"one" and eng.get(CID).pending == 2
    eng.abort(CID, 2)
    assert eng.read(CID) == b"one" and eng.get(CID).pending == 0
    eng.set_pending(CID, 2, b"two!", chain_ver=4)
    eng.commit(CID, 2)
    assert eng.read(CID, 1, 2) == b"wo" and eng.read(CID, 3) == b"!"
    assert eng.blocks.used_count() == 1  # the old version's and the aborted attempt's blocks are free again
    eng.set_pending(CID, 3, b"", chain_ver=4)  # empty content: no block at all
    eng.commit(CID, 3)
    assert eng.read(CID) == b"" and eng.get(CID).blk == NONE and eng.blocks.used_count() == 0
    eng.set_pending(CID, 4, None, chain_ver=4)  # pending removal
    eng.commit(CID, 4)
    assert eng.get(CID) is None and eng.blocks.used_count() == 0


def test_block_written_apart_and_held_block_outlives_commit(tmp_path):
    """The service reserves a block (set_pending(write=False)) and writes it after forwarding (write_block); a
    block a reader holds keeps its bytes through newer commits and is reused only once released."""
    eng = ChunkEngine(str(tmp_path))
    eng.set_pending(CID, 1, b"first", chain_ver=1)
    eng.commit(CID, 1)
    c = eng.get(CID)
    fd, off = eng.hold(c)
    blk = eng.set_pending(CID, 2, b"second", chain_ver=1, crc=zlib.crc32(b"second"), write=False)
    eng.write_block(blk, b"second")
    eng.commit(CID, 2)
    assert eng.read(CID) == b"second" and eng.get(CID).crc == zlib.crc32(b"second")
    eng.set_pending(CID, 3, b"third", chain_ver=1)  # reuses version 2's block, not the held one
    eng.commit(CID, 3)
    assert eng.get(CID).blk not in (c.blk, eng.get(CID).pending_blk)
    assert os.pread(fd, 5, off) == b"first"  # the held block still reads version 1
    eng.release(c.blk)
    assert eng.set_pending(CID, 4, b"fourth", chain_ver=1) == c.blk  # free again after the release
    eng.commit(CID, 4)
    assert eng.read(CID) == b"fourth" and eng.blocks.used_count() == 1


def test_crash_between_data_and_metadata_leaves_no_garbage(tmp_path):
    eng = ChunkEngine(str(tmp_path))
    eng.set_pending(CID, 1, b"committed", chain_ver=1)
    eng.commit(CID, 1)
    eng.set_pending(CID, 2, b"pending when the process died", chain_ver=1)
    orphan = eng.blocks.allocate(100)
    eng.blocks.write(orphan, b"x" * 100)  # written, never recorded: the process died here
    eng.close()
    eng = ChunkEngine(str(tmp_path))  # restart
    assert eng.read(CID) == b"committed" and eng.get(CID).pending == 0  # a pending version dies with the process
    assert eng.blocks.used_count() == 1  # the pending block and the orphan are free again
    eng.set_pending(CID, 2, b"next", chain_ver=1)
    eng.commit(CID, 2)
    assert eng.read(CID) == b"next" and eng.blocks.used_count() == 1


def test_replace_and_dump(tmp_path):
    eng = ChunkEngine(str(tmp_path))
    eng.set_pending(CID, 4, b"stale", chain_ver=1)
    eng.replace(CID, 4, b"fresh", chain_ver=2)  # same version number, other bytes
    assert eng.read(CID) == b"fresh"
    assert eng.dump() == {CID: [2, 4, 0, zlib.crc32(b"fresh")]}
    assert eng.blocks.used_count() == 1
    eng.replace(CID, 0, None, chain_ver=2)
    assert eng.dump() == {} and eng.blocks.used_count() == 0


def test_older_store_is_refused(tmp_path):
    import sqlite3

    conn = sqlite3.connect(tmp_path / "meta.db")
    conn.execute("CREATE TABLE chunks (id TEXT PRIMARY KEY, chain_ver INTEGER)")
    conn.close()
    with pytest.raises(RuntimeError, match="older seekstack"):
        ChunkEngine(str(tmp_path))


def test_apply_update():
    assert apply_update(b"abcdef", "write", 2, b"XY", 16) == b"abXYef"
    assert apply_update(b"ab", "write", 4, b"Z", 16) == b"ab\0\0Z"  # a gap reads as zeros
    assert apply_update(b"abcdef", "truncate", 3, b"", 16) == b"abc"
    assert apply_update(b"ab", "truncate", 4, b"", 16) == b"ab\0\0"
    assert apply_update(b"ab", "remove", 0, b"", 16) is None
    with pytest.raises(ValueError, match="overflows"):
        apply_update(b"", "write", 10, b"1234567", 16)
    with pytest.raises(ValueError, match="op"):
        apply_update(b"", "append", 0, b"", 16)


def test_resync_transfer_rule(tmp_path):
    eng = ChunkEngine(str(tmp_path))
    eng.replace(CID, 5, b"data", chain_ver=3)
    c = eng.get(CID)
    crc = zlib.crc32(b"data")
    assert needs_send(c, None)  # only here
    assert not needs_send(c, [3, 5, 0, crc])  # identical
    assert needs_send(c, [3, 4, 0, crc])  # remote behind
    assert needs_send(c, [3, 5, 6, crc])  # remote has a pending version
    assert needs_send(c, [2, 5, 0, crc])  # our chain version is newer
    assert needs_send(c, [3, 5, 0, crc ^ 1])  # same version, other bytes


def test_row_cache_matches_the_database(tmp_path, seed):
    """Random pending/commit/abort/replace sequences: the engine's in-memory rows always equal what its SQLite
    database says (read back by a second engine on the same directory)."""
    rng = random.Random(seed)
    eng = ChunkEngine(str(tmp_path))
    cids = [f"{i:032x}" for i in range(3)]
    for _ in range(200):
        cid, op = rng.choice(cids), rng.random()
        c = eng.get(cid)
        if op < 0.4:
            ver = (max(c.committed, c.pending) if c else 0) + 1
            eng.set_pending(cid, ver, None if rng.random() < 0.1 else rng.randbytes(rng.randrange(50)), chain_ver=1)
        elif op < 0.7 and c is not None and c.pending:
            eng.commit(cid, c.pending)
        elif op < 0.85 and c is not None and c.pending:
            eng.abort(cid, c.pending)
        elif op >= 0.85:
            eng.replace(cid, rng.randrange(1, 9), None if rng.random() < 0.2 else rng.randbytes(9), chain_ver=2)
        fresh = ChunkEngine.__new__(ChunkEngine)
        fresh.conn, fresh._rows, fresh._pend = eng.conn, {}, {}
        named = {b for r in eng.conn.execute("SELECT blk, pending_blk FROM chunks") for b in r}
        for x in cids:
            mine, disk = eng.get(x), fresh.get(x)
            if mine is not None and mine.pending:  # pending versions live in memory: the database has the base
                if mine.committed:
                    got = (disk.committed, disk.length, disk.crc, disk.blk)
                    assert got == (mine.committed, mine.length, mine.crc, mine.blk)
                else:
                    assert disk is None
                named.add(mine.pending_blk)
            else:
                assert mine == disk
        assert eng.blocks.used_count() == len(named - {NONE})  # no block leaked or shared
        for x in cids:
            c = eng.get(x)
            if c is not None and c.committed:
                assert zlib.crc32(eng.read(x)) == c.crc
