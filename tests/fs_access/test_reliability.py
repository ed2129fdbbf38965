"""A storage process is killed (SIGKILL) while reads run through the FUSE mount, the batched (USRBIO) API and the
KVCache: every read completes with the right bytes from the other replicas; nothing wrong is ever returned."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from seekstack.fs.cluster import Cluster
from seekstack.fs.kvcache import KVCacheStore, prefix_key
from seekstack.fs.usrbio import Ior, Iov, dereg_fd, prep_io, reg_fd, submit_ios, wait_for_ios

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def rcluster(tmp_path_factory):
    c = Cluster(
        tmp_path_factory.mktemp("fsaccrel") / "cluster", storage_nodes=3, replicas=3, chunk_size=CHUNK, lease=1.0
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _batched_reader(fs, path, data, stop, errors, counts, seed):
    rng = np.random.default_rng(seed)
    f = fs.open(path)
    fd = reg_fd(f)
    n, size = 16, 8192
    try:
        with Iov(n * size) as iov, Ior(n) as ior:
            while not stop.is_set():
                offs = rng.integers(0, len(data) - size, n)
                for i, off in enumerate(offs):
                    prep_io(ior, iov, True, i * size, fd, int(off), size, userdata=i)
                submit_ios(ior)
                for c in wait_for_ios(ior, n, min_results=n, timeout=90):
                    off = int(offs[c.userdata])
                    if c.result != size or bytes(iov.view(c.userdata * size, size)) != data[off : off + size]:
                        errors.append(("batched", off, c.result))
                counts["batched"] += n
    except Exception as e:  # reported by the test, not lost in the thread
        errors.append(("batched", repr(e)))
    finally:
        dereg_fd(fd)
        f.close()


def _mount_reader(path, data, stop, errors, counts, seed):
    rng = np.random.default_rng(seed)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                off = int(rng.integers(0, len(data) - 20000))
                got = os.pread(fd, 20000, off)
                if got != data[off : off + 20000]:
                    errors.append(("mount", off, len(got)))
                counts["mount"] += 1
        finally:
            os.close(fd)
    except Exception as e:
        errors.append(("mount", repr(e)))


def test_reads_survive_a_storage_kill(rcluster, tmp_path, seed):
    pytest.importorskip("pyfuse3")
    from seekstack.fs.fuse import is_mounted, mount_main, umount_main

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, 40 * CHUNK + 123, dtype=np.uint8).tobytes()
    fs = rcluster.connect()
    fs.write_bytes("/big.bin", data)
    store = KVCacheStore(fs, "/kv", capacity_bytes=64 << 20)
    keys = [prefix_key([i, 7]) for i in range(24)]
    vals = [rng.bytes(20_000 + i) for i in range(24)]
    for k, v in zip(keys, vals):
        store.put(k, v)
    mp = tmp_path / "mnt"
    mp.mkdir()
    mounted = os.access("/dev/fuse", os.R_OK | os.W_OK) and mount_main([str(mp), "--data", str(rcluster.dir)]) == 0
    stop, errors = threading.Event(), []
    counts = {"batched": 0, "mount": 0}
    threads = [threading.Thread(target=_batched_reader, args=(fs, "/big.bin", data, stop, errors, counts, seed))]
    if mounted:
        threads.append(threading.Thread(target=_mount_reader, args=(mp / "big.bin", data, stop, errors, counts, seed)))
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while counts["batched"] < 64 and time.monotonic() < deadline:
            time.sleep(0.01)
        rcluster.kill("storage1")
        before = dict(counts)
        kv_after = store.get_many(keys)  # the KVCache's batched get during the failure
        deadline = time.monotonic() + 60
        # keep reading until both paths made progress past the kill (not a fixed sleep)
        while time.monotonic() < deadline and not errors:
            if counts["batched"] >= before["batched"] + 128 and (not mounted or counts["mount"] >= before["mount"] + 8):
                break
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
        if mounted and is_mounted(mp):
            assert umount_main([str(mp)]) == 0
        store.close()
        fs.close()
    assert not errors, errors[:5]
    assert counts["batched"] >= before["batched"] + 128
    if mounted:
        assert counts["mount"] >= before["mount"] + 8
    assert kv_after == vals  # all blocks have live replicas: every get hits, with the right bytes
