"""Block files of the chunk engine: size classes, allocation and reuse, blocks held by readers, the O_DIRECT path
for aligned payload buffers and the page-cache path for everything else — every write checked against the bytes
read back with plain `os.pread` on the block file — and freed blocks giving their space back (st_blocks) without
ever punching a block that a reader holds or that was reused."""

from __future__ import annotations

import os
import random
import tempfile
import time

import pytest

from seekstack.fs.protocol import payload_buffer
from seekstack.fs.storage.blocks import ALIGN, NONE, BlockFiles, direct_view, size_shift, split


def _on_disk(bf: BlockFiles, loc: int, n: int) -> bytes:
    """The bytes of a block, read independently of BlockFiles (a fresh fd on the file)."""
    shift, index = split(loc)
    with open(os.path.join(bf.dir, f"k{shift}.blk"), "rb") as f:
        f.seek(index << shift)
        return f.read(n)


def test_size_classes_and_reuse(tmp_path):
    assert [size_shift(n) for n in (1, 4096, 4097, 1 << 20, (1 << 20) + 1)] == [12, 12, 13, 20, 21]
    bf = BlockFiles(str(tmp_path))
    assert bf.allocate(0) == NONE
    a, b = bf.allocate(5000), bf.allocate(8192)
    assert split(a) == (13, 0) and split(b) == (13, 1) and bf.used_count() == 2
    bf.free(a)
    assert bf.allocate(100) != a and bf.allocate(6000) == a  # reused within its class only
    bf.hold(b)
    bf.free(b)  # a reader holds it: not reusable yet
    assert bf.allocate(8000) not in (a, b)
    bf.release(b)
    assert bf.allocate(8000) == b


def test_direct_and_page_cache_writes_read_back(tmp_path, seed):
    rng = random.Random(seed)
    bf = BlockFiles(str(tmp_path))
    for n in (1, 4095, 4096, 70_000, 1 << 20, (1 << 20) - 1):
        data = rng.randbytes(n)
        aligned = payload_buffer(n)  # what the RPC layer receives a payload into
        aligned[:] = data
        for src in (data, aligned):  # bytes: page cache; an aligned payload buffer (>= 64 KiB): O_DIRECT
            loc = bf.allocate(n)
            bf.write(loc, src)
            assert bf.read(loc, 0, n) == data == _on_disk(bf, loc, n)
            assert bf.read(loc, n // 3, 7) == data[n // 3 : n // 3 + 7]
    with pytest.raises(ValueError, match="data"):
        bf.write(bf.allocate(10), b"x" * 8192)


def test_direct_view_needs_an_aligned_padded_buffer():
    buf = payload_buffer(100_000)
    view = direct_view(buf)
    assert view is not None and len(view) % ALIGN == 0 and len(view) >= 100_000
    assert direct_view(buf[1:]) is None  # not at the start of its buffer: misaligned
    assert direct_view(memoryview(bytes(8192))) is None  # read-only
    assert direct_view(b"abc") is None


def test_restart_frees_what_no_metadata_names(tmp_path):
    bf = BlockFiles(str(tmp_path))
    keep, lost = bf.allocate(1 << 16), bf.allocate(1 << 16)
    bf.write(keep, b"k" * (1 << 16))
    bf.write(lost, b"l" * (1 << 16))
    bf.close()
    bf = BlockFiles(str(tmp_path))
    bf.reset([keep])  # only `keep` is named by the metadata
    assert bf.used_count() == 1 and bf.read(keep, 0, 3) == b"kkk"
    assert bf.allocate(1 << 16) == lost  # the orphan is free again


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_file_system_without_direct_io_falls_back_to_the_page_cache(seed):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:  # tmpfs refuses O_DIRECT opens
        bf = BlockFiles(d)
        data = random.Random(seed).randbytes(1 << 17)
        buf = payload_buffer(len(data))
        buf[:] = data
        loc = bf.allocate(len(data))
        bf.write(loc, buf)
        assert bf.read(loc, 0, len(data)) == data == _on_disk(bf, loc, len(data))
        bf.close()


# ---------------------------------------------------------------- giving freed space back (hole punching)
MiB = 1 << 20


def _allocated(bf: BlockFiles, loc: int) -> int:
    """Bytes the file system has allocated for the block file holding `loc` (st_blocks, not the apparent size)."""
    return os.stat(os.path.join(bf.dir, f"k{split(loc)[0]}.blk")).st_blocks * 512


def _written(bf: BlockFiles, rng, n: int = MiB) -> tuple[int, bytes]:
    loc, data = bf.allocate(n), rng.randbytes(n)
    bf.write(loc, data)
    return loc, data


def test_freed_blocks_are_punched_and_reused(tmp_path, seed):
    """Freed blocks give their space back (holes reading as zeros) and come back, correctly rewritten through
    both write paths; a block reused before its punch is never punched (a reuse cancels it)."""
    rng = random.Random(seed)
    bf = BlockFiles(str(tmp_path))
    blocks = [_written(bf, rng) for _ in range(4)]
    full = _allocated(bf, blocks[0][0])
    assert full >= 4 * MiB
    for loc, _ in blocks[1:3]:
        bf.free(loc)
    assert bf.reclaim() == 2 * MiB
    assert _allocated(bf, blocks[0][0]) <= full - 2 * MiB
    for loc, _ in blocks[1:3]:
        assert _on_disk(bf, loc, MiB) == bytes(MiB)  # a hole
    for loc, data in (blocks[0], blocks[3]):
        assert bf.read(loc, 0, MiB) == data == _on_disk(bf, loc, MiB)  # the neighbours are untouched
    # Reuse: the punched blocks come back lowest first, one written through the page cache, one with O_DIRECT.
    again = [bf.allocate(MiB), bf.allocate(MiB)]
    assert again == [blocks[1][0], blocks[2][0]]
    plain, aligned = rng.randbytes(MiB - 5), payload_buffer(MiB)
    aligned[:] = rng.randbytes(MiB)
    bf.write(again[0], plain)
    bf.write(again[1], aligned)
    assert _on_disk(bf, again[0], MiB - 5) == plain and _on_disk(bf, again[1], MiB) == bytes(aligned)
    assert _allocated(bf, again[0]) >= full
    # Freed and reallocated before any punch: the same block, bytes and space kept, nothing left to punch.
    bf.free(again[0])
    assert bf.allocate(MiB) == again[0] and bf.reclaim() == 0
    assert _on_disk(bf, again[0], MiB - 5) == plain
    assert bf.used_count() == 4
    bf.close()


def test_block_held_by_a_reader_is_punched_only_after_release(tmp_path, seed):
    """A reader streaming a block (hold, as the storage service does for sendfile) keeps its bytes and space
    through a free and any number of reclaim passes; the punch comes once it releases the block."""
    rng = random.Random(seed)
    bf = BlockFiles(str(tmp_path))
    (loc, data), (keep, kept) = _written(bf, rng), _written(bf, rng)
    full = _allocated(bf, loc)
    bf.hold(loc)
    fd, off = bf.span(loc)
    bf.free(loc)  # the commit of a newer version frees it while the reader still sends it
    assert bf.reclaim() == 0 and bf.reclaim() == 0
    assert os.pread(fd, MiB, off) == data and _allocated(bf, loc) == full
    assert bf.allocate(MiB) not in (loc, keep)  # not reusable either
    bf.release(loc)
    assert bf.reclaim() == MiB
    assert _on_disk(bf, loc, MiB) == bytes(MiB) and _allocated(bf, loc) <= full - MiB
    assert bf.read(keep, 0, MiB) == kept
    bf.close()


def test_free_tail_blocks_truncate_the_file(tmp_path, seed):
    rng = random.Random(seed)
    bf = BlockFiles(str(tmp_path))
    locs = [_written(bf, rng, 5000)[0] for _ in range(6)]  # 8 KiB blocks
    path = os.path.join(bf.dir, f"k{split(locs[0])[0]}.blk")
    for loc in (locs[5], locs[3], locs[4]):
        bf.free(loc)
    bf.reclaim()
    assert os.path.getsize(path) == 3 * 8192  # blocks 3-5 were the free tail
    bf.free(locs[1])
    bf.reclaim()
    assert os.path.getsize(path) == 3 * 8192  # a hole in the middle keeps the size
    assert [split(bf.allocate(8000))[1] for _ in range(3)] == [1, 3, 4]  # the hole first, then past the end
    bf.close()


def test_restart_punches_the_stale_free_blocks(tmp_path, seed):
    """A crash after a commit freed a block but before its punch (or between a block write and its commit)
    leaves a free block with data: the restarted engine finds it (SEEK_DATA) and punches it; holes stay holes."""
    rng = random.Random(seed)
    bf = BlockFiles(str(tmp_path))
    locs = [_written(bf, rng)[0] for _ in range(4)]
    bf.free(locs[0])
    assert bf.reclaim() == MiB  # punched before the "crash"
    bf.close()  # the process dies: blocks 1 and 2 are named by no metadata
    bf = BlockFiles(str(tmp_path))
    bf.reset([locs[3]])
    assert bf.used_count() == 1
    assert bf.reclaim() == 2 * MiB  # only the two stale blocks, not the old hole
    assert all(_on_disk(bf, loc, MiB) == bytes(MiB) for loc in locs[:3])
    assert _allocated(bf, locs[3]) <= 1 * MiB + (64 << 10)
    bf.close()


def test_event_loop_punches_in_the_background(tmp_path, seed):
    """Under a running event loop, frees are punched `punch_delay` later on the punch thread, held blocks only
    after their release, while other blocks are allocated and written meanwhile."""
    import asyncio

    rng = random.Random(seed)

    async def scenario():
        bf = BlockFiles(str(tmp_path))
        bf.punch_delay = 0.05
        blocks = [_written(bf, rng) for _ in range(8)]
        full = _allocated(bf, blocks[0][0])
        bf.hold(blocks[0][0])
        for loc, _ in blocks[:6]:
            bf.free(loc)
        fresh = _written(bf, rng)  # reuses the newest freed block (5) before its punch
        assert fresh[0] == blocks[5][0]
        deadline = time.monotonic() + 10
        while _allocated(bf, fresh[0]) > full - 4 * MiB and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert _allocated(bf, fresh[0]) <= full - 4 * MiB  # blocks 1-4: the held one and the reused one stay
        assert bf.read(blocks[0][0], 0, MiB) == blocks[0][1] and bf.read(fresh[0], 0, MiB) == fresh[1]
        bf.release(blocks[0][0])
        while _allocated(bf, fresh[0]) > full - 5 * MiB and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert _on_disk(bf, blocks[0][0], MiB) == bytes(MiB)
        for loc, data in blocks[6:] + [fresh]:
            assert _on_disk(bf, loc, MiB) == data
        bf.free(fresh[0])
        bf.close()  # with a punch pending: nothing runs after the close

    asyncio.run(scenario())
