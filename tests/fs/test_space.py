"""Disk space of removed data goes back to the file system: on a real local cluster (3 storage processes, 3
replicas), the storage targets' block files lose the allocated space (st_blocks) of unlinked, truncated and
overwritten files within seconds, later writes reuse the holes (the block files do not grow) and read back
byte for byte; a kill -9 between a commit and the punch loses nothing and leaks nothing; a file system that
cannot punch holes (a FUSE mount) just keeps the space."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time

import pytest

from seekstack.fs.storage.blocks import BlockFiles
from seekstack.fs.storage.engine import ChunkEngine
from seekstack.fs.testing import local_cluster, processes_mentioning

MiB = 1 << 20
CHUNK = MiB
REPLICAS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # 3 nodes x 2 targets / 3 replicas = 2 chains, each with one target per node: a file of an even number of
    # whole chunks puts the same number of blocks on every target, so the reuse check below is exact.
    with local_cluster(
        tmp_path_factory.mktemp("space") / "cluster",
        storage_nodes=3,
        replicas=REPLICAS,
        targets_per_node=2,
        chunk_size=CHUNK,
    ) as c:
        yield c


def _block_files(cluster) -> list[str]:
    return [str(p) for p in cluster.dir.glob("storage*/target*/blocks/k*.blk")]


def allocated(cluster) -> int:
    """Bytes allocated on disk for every block file of every target (st_blocks, not the apparent size)."""
    return sum(os.stat(p).st_blocks * 512 for p in _block_files(cluster))


def apparent(cluster) -> int:
    return sum(os.path.getsize(p) for p in _block_files(cluster))


def settle(cluster, until, timeout: float = 20.0) -> int:
    """Poll the allocated bytes until `until(bytes)` holds (chunk removal and punching run in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        now = allocated(cluster)
        if until(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_removed_files_give_space_back_and_it_is_reused(cluster, fs, seed):
    rng = random.Random(seed)
    fs.mkdir("/rm", exist_ok=True)
    base = allocated(cluster)
    doomed = {f"/rm/d{i}": rng.randbytes(2 * CHUNK) for i in range(4)}  # 8 MiB, 24 MiB with the replicas
    for path, data in doomed.items():
        fs.write_bytes(path, data)
    fs.write_bytes("/rm/keep", keep := rng.randbytes(2 * CHUNK))  # after the doomed blocks: no tail truncation
    removed = sum(map(len, doomed.values())) * REPLICAS
    full = allocated(cluster)
    assert full - base >= removed + 2 * CHUNK * REPLICAS
    size_before = apparent(cluster)
    for path in doomed:
        fs.unlink(path)
    now = settle(cluster, lambda b: b <= full - 0.9 * removed)
    assert now <= full - 0.9 * removed, f"only {(full - now) / MiB:.1f} of {removed / MiB:.0f} MiB given back"
    assert fs.read_bytes("/rm/keep") == keep
    # New files of the same shape land in the holes: the block files keep their size, the space comes back.
    again = {f"/rm/a{i}": rng.randbytes(2 * CHUNK) for i in range(4)}
    for path, data in again.items():
        fs.write_bytes(path, data)
    assert apparent(cluster) == size_before
    assert allocated(cluster) >= full - 2 * 4096 * len(_block_files(cluster))
    for path, data in {**again, "/rm/keep": keep}.items():
        assert sha(fs.read_bytes(path)) == sha(data)
    fs.remove("/rm", recursive=True)
    assert settle(cluster, lambda n: n <= base + 64 * 1024) <= base + 64 * 1024  # back to where it started


def test_truncated_and_overwritten_files_give_space_back(cluster, fs, seed):
    """Truncation frees the cut chunks; an overwrite's superseded chunk versions are freed once the new
    version commits; both leave about the live bytes x replicas allocated."""
    rng = random.Random(seed)
    base = allocated(cluster)
    data = bytearray(rng.randbytes(6 * CHUNK))
    fs.write_bytes("/tr.bin", data)
    full = allocated(cluster)
    fs.truncate("/tr.bin", CHUNK + 4096)  # 1 MiB + 4 KiB left: 5 chunks freed, one shrunk to 4 KiB
    del data[CHUNK + 4096 :]
    live = lambda n: n <= base + 1.1 * (CHUNK + 4096) * REPLICAS  # noqa: E731
    now = settle(cluster, live)
    assert live(now), f"{(now - base) / MiB:.1f} MiB left for a {len(data) / MiB:.1f} MiB file"
    assert full - now >= 0.9 * 5 * CHUNK * REPLICAS
    for _ in range(5):  # overwrite in place: every round supersedes both chunks' versions
        patch = rng.randbytes(len(data))
        with fs.open("/tr.bin", "r+b") as f:
            f.pwrite(patch, 0)
        data[:] = patch
    now = settle(cluster, live)
    assert live(now), f"{(now - base) / MiB:.1f} MiB left for a {len(data) / MiB:.1f} MiB file"
    assert sha(fs.read_bytes("/tr.bin")) == sha(bytes(data))
    fs.unlink("/tr.bin")
    assert settle(cluster, lambda n: n <= base + 64 * 1024) <= base + 64 * 1024


_CRASH = """
import os, signal, sys
from seekstack.fs.storage.engine import ChunkEngine
eng = ChunkEngine(sys.argv[1])
eng.set_pending("00" * 16, 1, b"a" * (1 << 20), chain_ver=1)
eng.commit("00" * 16, 1)
eng.set_pending("00" * 16, 2, b"b" * (1 << 20), chain_ver=1)
eng.commit("00" * 16, 2)  # frees version 1's block: its punch would come later
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill9_between_commit_and_punch(tmp_path):
    """The process dies after the commit that frees a block and before the punch: the committed version reads
    back, and the restarted engine finds the stale free block and gives its space back."""
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    blk = tmp_path / "blocks" / "k20.blk"
    assert blk.stat().st_blocks * 512 >= 2 * MiB  # both versions still allocated
    eng = ChunkEngine(str(tmp_path))
    assert eng.read("00" * 16) == b"b" * MiB
    assert eng.blocks.reclaim() == MiB
    assert blk.stat().st_blocks * 512 <= MiB + 64 * 1024 and eng.read("00" * 16) == b"b" * MiB
    eng.close()


def test_file_system_without_punch_keeps_the_space(cluster, tmp_path, seed):
    """On a file system that refuses FALLOC_FL_PUNCH_HOLE (our own FUSE mount: EOPNOTSUPP), freed blocks are
    reused as before and nothing fails; the space simply stays allocated."""
    pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("/dev/fuse is not usable here")
    from seekstack.fs.fuse import is_mounted, mount_main, umount_main

    mp = tmp_path / "mnt"
    mp.mkdir()
    assert mount_main([str(mp), "--data", str(cluster.dir)]) == 0
    try:
        bf = BlockFiles(str(mp))
        rng = random.Random(seed)
        a, b = bf.allocate(1 << 16), bf.allocate(1 << 16)
        first, other = rng.randbytes(1 << 16), rng.randbytes(1 << 16)
        bf.write(a, first)
        bf.write(b, other)
        bf.free(a)
        assert bf.reclaim() == 0 and not bf.can_punch
        assert bf.read(a, 0, 1 << 16) == first  # not punched: the bytes are still there
        assert bf.allocate(1 << 16) == a
        bf.write(a, again := rng.randbytes(1 << 16))
        assert bf.read(a, 0, 1 << 16) == again and bf.read(b, 0, 1 << 16) == other
        bf.free(b)
        assert bf.reclaim() == 0  # tried once only: no second refusal
        bf.close()
    finally:
        if is_mounted(mp):
            assert umount_main([str(mp)]) == 0
        deadline = time.monotonic() + 20  # the daemon exits once unmounted (the cluster fixture checks for it)
        while processes_mentioning(str(mp)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not processes_mentioning(str(mp)), "FUSE daemon still running after unmount"
