"""Block files of the chunk engine: size classes, allocation and reuse, blocks held by readers, the O_DIRECT path
for aligned payload buffers and the page-cache path for everything else — every write checked against the bytes
read back with plain `os.pread` on the block file."""

from __future__ import annotations

import os
import random
import tempfile

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
