"""The chunk engine (copy-on-write data files + SQLite metadata), the update rules and the resync diff rule."""

from __future__ import annotations

import os
import random
import zlib

import pytest

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
    assert eng.read(CID, 1, 2) == b"wo"
    assert sorted(os.listdir(tmp_path / "data")) == [f"{CID}.2"]  # the old version's file is gone
    eng.set_pending(CID, 3, None, chain_ver=4)  # pending removal
    eng.commit(CID, 3)
    assert eng.get(CID) is None and os.listdir(tmp_path / "data") == []


def test_data_written_apart_and_fd_outlives_commit(tmp_path):
    """The service writes a version's file on an I/O thread (write_version), then records it
    (set_pending(written=True)); a reader's fd opened before a newer commit still reads its own version."""
    eng = ChunkEngine(str(tmp_path))
    eng.set_pending(CID, 1, b"first", chain_ver=1)
    eng.commit(CID, 1)
    fd = eng.open_version(CID, 1)
    try:
        eng.set_pending(CID, 2, b"stale attempt", chain_ver=1)  # left pending, as by a crash mid-write
        eng.write_version(CID, 2, b"second")  # same version number: must survive set_pending
        eng.set_pending(CID, 2, b"second", chain_ver=1, crc=zlib.crc32(b"second"), written=True)
        eng.commit(CID, 2)
        assert eng.read(CID) == b"second" and eng.get(CID).crc == zlib.crc32(b"second")
        assert sorted(os.listdir(tmp_path / "data")) == [f"{CID}.2"]  # version 1 unlinked ...
        assert os.pread(fd, 100, 0) == b"first"  # ... yet the open fd still reads it
    finally:
        os.close(fd)


def test_crash_between_data_and_metadata_leaves_no_garbage(tmp_path):
    eng = ChunkEngine(str(tmp_path))
    eng.set_pending(CID, 1, b"committed", chain_ver=1)
    eng.commit(CID, 1)
    (tmp_path / "data" / f"{CID}.7").write_bytes(b"written, never recorded")  # the process died here
    eng.close()
    eng = ChunkEngine(str(tmp_path))  # restart
    assert os.listdir(tmp_path / "data") == [f"{CID}.1"]
    assert eng.read(CID) == b"committed"


def test_replace_and_dump(tmp_path):
    eng = ChunkEngine(str(tmp_path))
    eng.set_pending(CID, 4, b"stale", chain_ver=1)
    eng.replace(CID, 4, b"fresh", chain_ver=2)  # same version number, other bytes: written aside, renamed over
    assert eng.read(CID) == b"fresh"
    assert eng.dump() == {CID: [2, 4, 0, zlib.crc32(b"fresh")]}
    eng.replace(CID, 0, None, chain_ver=2)
    assert eng.dump() == {} and os.listdir(tmp_path / "data") == []


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
        fresh.conn, fresh._rows = eng.conn, {}
        assert [eng.get(x) for x in cids] == [fresh.get(x) for x in cids]
