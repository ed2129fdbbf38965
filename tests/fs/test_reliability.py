"""Failures on a real cluster: kill -9 of a storage process during a stream of writes (every acknowledged write
stays readable with the right bytes, reads go on from the other replicas, the restarted process resyncs and serves
again with identical replicas), and kill -9 + restart of meta and of mgmtd (no committed metadata lost; clients
recover)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time

import pytest

from seekstack.fs.meta.layout import chunk_id
from seekstack.fs.protocol import call_sync
from seekstack.fs.testing import local_cluster

CHUNK = 32 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(
        tmp_path_factory.mktemp("fsrel") / "cluster",
        storage_nodes=3,
        replicas=3,
        targets_per_node=2,
        chunk_size=CHUNK,
        lease=1.0,
        client_timeout=2.0,
    ) as c:
        yield c  # on exit local_cluster stops it and fails if any of its processes survived


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def _replicas_identical(cluster, fs, names):
    """Every chunk of every file has the same bytes (and version) on each target of its chain."""
    import asyncio

    from seekstack.fs.protocol import RpcClient

    routing = fs.routing()

    async def read(t, cid):
        host, port = t["addr"].rsplit(":", 1)
        c = RpcClient(host, int(port), cluster.token)
        try:
            meta, data = await c.call_data("read", target=t["id"], chunk=cid, offset=0, length=CHUNK)
            return meta["exists"], bytes(data)
        finally:
            await c.close()

    for name in names:
        with fs.open(name) as f:
            ino, layout, size = f.ino, f.layout, f.size
        for idx in range((size + CHUNK - 1) // CHUNK):
            targets = routing["chains"][str(layout.chain_of(idx))]["targets"]
            assert all(t["state"] == "serving" for t in targets)
            got = {asyncio.run(read(t, chunk_id(ino, idx))) for t in targets}
            assert len(got) == 1, f"{name} chunk {idx} differs between replicas"


def test_kill9_storage_during_writes_then_resync(cluster, seed):
    fs = cluster.connect()
    try:
        fs.mkdir("/rel", exist_ok=True)
        acked: dict[str, str] = {}
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer():
            rng = random.Random(seed)
            i = 0
            try:
                while not stop.is_set() and i < 400:
                    data = rng.randbytes(rng.randrange(1, 3 * CHUNK))
                    name = f"/rel/f{i:04d}"
                    with fs.open(name, "wb") as f:
                        f.write(data)
                        if i % 3 == 0:  # also overwrite inside an existing chunk
                            patch = rng.randbytes(CHUNK // 2)
                            f.pwrite(patch, 7)
                            model = bytearray(data) + bytearray(max(0, 7 + len(patch) - len(data)))
                            model[7 : 7 + len(patch)] = patch
                            data = bytes(model)
                    acked[name] = sha(data)  # only after close returned: acknowledged
                    i += 1
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        try:
            _wait(lambda: len(acked) >= 5 or errors, 30, "first writes")
            cluster.kill("storage1", signal.SIGKILL)
            n_at_kill = len(acked)
            _wait(lambda: len(acked) >= n_at_kill + 10 or errors, 60, "writes continuing after kill -9")
            assert not errors
            # The node is down: every acknowledged write reads back from the remaining replicas.
            for name, digest in list(acked.items()):
                assert sha(fs.read_bytes(name)) == digest, name
            st = cluster.status()
            assert any(t["state"] in ("offline", "lastsrv") for c in st["chains"].values() for t in c["targets"])
            cluster.spawn("storage1")
            cluster.wait_serving(60)  # resynced and serving again
            n_back = len(acked)
            _wait(lambda: len(acked) >= n_back + 5 or errors, 60, "writes after the node returned")
        finally:
            stop.set()
            t.join(60)
        assert not errors
        for name, digest in acked.items():
            assert sha(fs.read_bytes(name)) == digest, name
        _replicas_identical(cluster, fs, list(acked))
    finally:
        fs.close()


def test_kill9_meta_and_restart(cluster):
    fs = cluster.connect()
    try:
        fs.mkdir("/metafail", exist_ok=True)
        data = os.urandom(50_000)
        fs.write_bytes("/metafail/before", data)
        cluster.kill("meta0", signal.SIGKILL)
        done = threading.Event()
        result = {}

        def blocked_call():  # issued while meta is down: the client retries until it is back
            try:
                fs.mkdir("/metafail/during")
                result["ok"] = True
            except BaseException as e:  # pragma: no cover
                result["err"] = e
            done.set()

        th = threading.Thread(target=blocked_call)
        th.start()
        cluster.spawn("meta0")
        assert done.wait(30) and result.get("ok"), result
        th.join()
        assert sorted(fs.listdir("/metafail")) == ["before", "during"]
        assert fs.read_bytes("/metafail/before") == data
        fs.write_bytes("/metafail/after", b"after")
        assert fs.read_bytes("/metafail/after") == b"after"
    finally:
        fs.close()


def test_kill9_mgmtd_and_restart(cluster):
    fs = cluster.connect()
    try:
        data = os.urandom(3 * CHUNK + 5)
        fs.write_bytes("/mgmtd-before", data)
        before = cluster.status()
        cluster.kill("mgmtd", signal.SIGKILL)
        cluster.spawn("mgmtd")
        after = cluster.wait_serving(30)
        # The chain table survived the restart (persisted in mgmtd's KV store).
        assert {c: [t["id"] for t in v["targets"]] for c, v in after["chains"].items()} == {
            c: [t["id"] for t in v["targets"]] for c, v in before["chains"].items()
        }
        assert fs.read_bytes("/mgmtd-before") == data
        fs.write_bytes("/mgmtd-after", data[::-1])
        assert fs.read_bytes("/mgmtd-after") == data[::-1]
        assert call_sync(cluster.mgmtd, cluster.token, "routing")["version"] >= before["version"]
    finally:
        fs.close()


def test_storage_stops_serving_without_a_lease(cluster):
    """While mgmtd is frozen, storage nodes cannot renew their lease and refuse I/O; once it is back they serve."""
    import errno

    from seekstack.fs.protocol import RpcError

    fs = cluster.connect()
    try:
        fs.write_bytes("/lease.bin", b"lease" * 1000)
        with fs.open("/lease.bin") as f:
            ino, layout = f.ino, f.layout
        t = fs.routing()["chains"][str(layout.chain_of(0))]["targets"][0]
        cluster.kill("mgmtd", signal.SIGSTOP)
        try:
            refused = []

            def probe():
                try:
                    call_sync(t["addr"], cluster.token, "read", target=t["id"], chunk=chunk_id(ino, 0), length=5)
                except RpcError as e:
                    refused.append(e.errno)
                    return True
                return False

            _wait(probe, 15, "storage kept serving without a lease")
            assert refused[-1] == errno.ESHUTDOWN
        finally:
            cluster.procs["mgmtd"].send_signal(signal.SIGCONT)
        cluster.wait_serving(30)
        assert fs.read_bytes("/lease.bin") == b"lease" * 1000
    finally:
        fs.close()


def test_sessions_of_a_crashed_client_are_pruned(cluster):
    """A client killed with files open for writing: meta notices it stopped heartbeating, settles the length of
    what it wrote (every acknowledged byte is on storage) and removes a file unlinked while it was open."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from seekstack.fs import connect\n"
        f"fs = connect({str(cluster.dir)!r})\n"
        "a = fs.open('/crash-kept.bin', 'wb'); a.write(b'k' * 70000)\n"
        "b = fs.open('/crash-gone.bin', 'wb'); b.write(b'g' * 70000)\n"
        "print(b.ino, flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        gone_ino = int(p.stdout.readline())
    finally:
        p.kill()
        p.wait()
    fs = cluster.connect()
    try:
        layout = None
        with fs.open("/crash-gone.bin") as f:
            layout = f.layout
        fs.unlink("/crash-gone.bin")  # deferred: the dead client still holds a write session
        routing = fs.routing()

        def settled():
            left = [
                c
                for cid in set(layout.stripe_chains())
                for t in routing["chains"][str(cid)]["targets"]
                for c in call_sync(t["addr"], cluster.token, "list_chunks", target=t["id"], inode=gone_ino)["chunks"]
            ]
            return fs.stat("/crash-kept.bin").st_size == 70000 and not left

        _wait(settled, 30, "sessions of the killed client were not pruned")
        assert fs.read_bytes("/crash-kept.bin") == b"k" * 70000
    finally:
        fs.close()


def test_whole_cluster_restart_keeps_data(cluster):
    """`fs down` + `fs up` on the same directory: every target restarts, one per chain becomes lastsrv and then
    serving, the others resync from it; files and metadata are intact."""
    fs = cluster.connect()
    data = os.urandom(5 * CHUNK + 3)
    fs.write_bytes("/restart.bin", data)
    fs.close()
    cluster.stop()
    cluster.start()
    with cluster.connect() as fs:
        assert fs.read_bytes("/restart.bin") == data
        assert "rel" in fs.listdir("/")
