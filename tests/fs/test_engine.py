"""The chunk engine (copy-on-write data files + SQLite metadata), the update rules and the resync diff rule."""

from __future__ import annotations

import os
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
